"""Builtin loss terms (see :mod:`ddkit.engine.losses` for the protocol the trainer uses).

* ``hard_label``: the task's native supervised loss (cross-entropy, or a detector's own losses) on ground truth
  and pseudo-labels alike.
* ``soft_target``: Hinton, Vinyals, Dean 2015: ``T^2 * KL(softmax(t/T) || softmax(s/T))``, batch mean.
* ``detector_kd``: Chen et al. 2017 for two-stage detectors, RoI head and RPN (:mod:`ddkit_plugins.detector_kd`).
* ``dense_kd``: soft class targets on a one-stage detector's anchors (:mod:`ddkit_plugins.dense_kd`).
* ``hint``: FitNets (Romero et al. 2015): L2 or L1 between a teacher feature and an adapted student feature
  (features captured by forward hooks; the adaptation layer is a 1x1 conv or a linear layer created from the shapes
  seen in a dry forward pass and trained with the student); optional two-stage schedule (``stage_fraction``);
  ``distance: pearson`` compares the features standardised per channel (Cao et al. 2022, PKD), ``channel_kl`` each
  channel's distribution over positions (CWD), ``attention`` where the maps are active (AT, no adapter);
  ``imitate: objects`` only the cells under a detector's ground-truth boxes (:mod:`ddkit_plugins.feature_masks`);
  ``adapter: mlp`` a non-linear projector instead of the linear adapter (Chen et al. 2022).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddkit import ConfigError, hookimpl
from ddkit.engine.task import FeatureHook, LossContext, SetupContext, get_submodule, unwrap_model
from ddkit.ops.distill import attention_transfer, channel_kl
from ddkit.types import LossSpec

from .dense_kd import DenseKD, DenseKDParams
from .detector_kd import DetectorKD, DetectorKDParams
from .feature_masks import GroundTruthBoxes


# distances between whole [B, C, H, W] maps (distributions over positions), not cell by cell
WHOLE_MAP_DISTANCES = ("channel_kl", "attention")


def _check_weight(weight: float) -> None:
    if weight < 0:
        raise ValueError(f"weight must be >= 0, got {weight}")


# ------------------------------------------------------------------------------------------------- hard label
@dataclass
class HardLabelParams:
    weight: float = 1.0

    def __post_init__(self) -> None:
        _check_weight(self.weight)


class HardLabel:
    """The task's native supervised loss: the sum of ``task.training_forward(...).losses`` (each component is
    logged as ``hard_label/<name>``)."""

    teacher_outputs = "none"
    stage_fraction = 0.0

    def __init__(self, weight: float = 1.0):
        self.weight = weight

    def __call__(self, losses: dict[str, Tensor]) -> Tensor:
        """``{name: scalar} -> scalar`` (their sum)."""
        if not losses:
            raise ValueError("hard_label: the task returned no losses")
        return torch.stack([v.float() for v in losses.values()]).sum()

    def compute(self, ctx: LossContext) -> Tensor:
        losses = ctx.student_out.losses
        if len(losses) > 1:
            for name, value in losses.items():
                ctx.logs[f"hard_label/{name}"] = value.detach()
        return self(losses)


# ------------------------------------------------------------------------------------------------ soft target
@dataclass
class SoftTargetParams:
    temperature: float = 4.0
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        _check_weight(self.weight)


class SoftTarget:
    """Hinton et al. 2015: ``T^2 * KL(softmax(t/T) || softmax(s/T))``, averaged over the batch.

    The ``T^2`` factor keeps the gradient's magnitude independent of ``T`` (the soft gradients scale as ``1/T^2``),
    so the term can be added to the hard-label loss with weights of order 1.
    """

    teacher_outputs = "logits"
    stage_fraction = 0.0

    def __init__(self, temperature: float = 4.0, weight: float = 1.0):
        self.temperature = temperature
        self.weight = weight

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """``student_logits [B, C], teacher_logits [B, C] -> scalar``."""
        t = self.temperature
        log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
        log_p_teacher = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
        return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * t * t

    def setup(self, ctx: SetupContext) -> None:
        if ctx.task.prediction_type != "probs":
            raise ConfigError(f"soft_target needs class logits; the task {ctx.task.name!r} has none "
                              "(for two-stage detectors use detector_kd, for any model hint)")
        return None

    def compute(self, ctx: LossContext) -> Tensor:
        return self(ctx.student_logits, ctx.teacher_logits)


# ------------------------------------------------------------------------------------------------------- hint
@dataclass
class HintParams:
    teacher_layer: str
    student_layer: str
    distance: Literal["l2", "l1", "pearson", "channel_kl", "attention"] = "l2"
    weight: float = 1.0
    stage_fraction: float = 0.0
    imitate: Literal["all", "objects"] = "all"
    temperature: float = 1.0
    adapter: Literal["linear", "mlp"] = "linear"

    def __post_init__(self) -> None:
        _check_weight(self.weight)
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.distance in WHOLE_MAP_DISTANCES and self.imitate != "all":
            raise ValueError(f"distance: {self.distance} compares whole maps (a distribution over positions); "
                             "use imitate: all")
        if self.distance == "attention" and self.adapter != "linear":
            raise ValueError("distance: attention compares channel means and needs no adapter; leave out adapter")
        if not 0.0 <= self.stage_fraction < 1.0:
            raise ValueError(f"stage_fraction must be in [0, 1), got {self.stage_fraction}")


def standardize_channels(x: Tensor, eps: float = 1e-6) -> Tensor:
    """``[B, C, ...] or [B, N, C] -> same shape``: each channel to zero mean and unit (unbiased) standard deviation
    over all its other positions (PKD's normalisation; channels last for token features ``[B, N, C]``)."""
    channel_dim = 2 if x.ndim == 3 else 1
    moved = x.movedim(channel_dim, 0)
    flat = moved.reshape(moved.shape[0], -1)
    flat = (flat - flat.mean(dim=1, keepdim=True)) / (flat.std(dim=1, keepdim=True) + eps)
    return flat.reshape(moved.shape).movedim(0, channel_dim)


class Hint:
    """FitNets hint: ``mean |adapter(student_feature) - teacher_feature|^p`` (p = 2 for ``l2``, 1 for ``l1``).

    ``pearson`` (Cao et al. 2022, PKD) standardises both features per channel (zero mean, unit variance over the
    batch and positions) before half the mean squared difference, i.e. ``1 - ``the mean per-channel Pearson
    correlation: the teacher's scale and per-level magnitudes no longer set the loss, only the pattern does.

    ``channel_kl`` (Shu et al. 2021, CWD, for ``[B, C, H, W]`` maps) turns each channel into a distribution over
    its positions (softmax at ``temperature``) and takes the ``T^2``-scaled KL from the teacher's: where each
    channel fires most, not its values, is imitated (:func:`ddkit.ops.distill.channel_kl`).

    ``attention`` (Zagoruyko and Komodakis 2017, AT, for ``[B, C, H, W]`` maps) compares where the maps are active:
    the channel mean of the squared activations, normalised per image (:func:`ddkit.ops.distill.attention_transfer`).
    It needs no adapter, so a narrow student's channels are left free for its own heads.

    ``imitate: objects`` (torchvision detectors) imitates only the cells under ground-truth boxes, averaged over
    them (:mod:`ddkit_plugins.feature_masks`; Wang et al. 2019's fine-grained imitation with FGD's box masks).

    ``adapter: mlp`` puts a non-linear projector (1x1 conv or linear, ReLU, 1x1 conv or linear) where FitNets puts
    one linear layer: Chen et al. 2022 (*Improved Feature Distillation via Projector Ensemble*; one projector here,
    not their ensemble) find that a projector lets the student keep its own features for its task, where a linear
    adapter ties every student channel to the teacher's.

    Features are module outputs named by path (``model.get_submodule``), e.g. ``features.3`` or
    ``backbone.body.layer3``, captured by forward hooks. The adaptation layer is created from the shapes of a dry
    forward pass: a 1x1 conv for ``[B, C, H, W]`` maps, a linear layer for ``[B, C]`` or ``[B, N, C]`` features.
    When the maps differ in size the adapted student map is resized (bilinear) to the teacher's. A module that
    returns several maps (``backbone`` of a detector: its FPN levels) is imitated level by level through one
    shared adapter (the FPN's levels have one width): FitNets' hint on each level of a detector's neck.

    ``stage_fraction > 0`` makes the hint a first stage as in FitNets: for that fraction of the iterations only
    the hint trains (with its adapter), then the other terms (hard label, soft target) take over.
    """

    teacher_outputs = "features"

    def __init__(self, teacher_layer: str, student_layer: str, distance: str = "l2", weight: float = 1.0,
                 stage_fraction: float = 0.0, imitate: str = "all", temperature: float = 1.0,
                 adapter: str = "linear"):
        self.teacher_layer, self.student_layer = teacher_layer, student_layer
        self.distance, self.weight, self.stage_fraction, self.imitate = distance, weight, stage_fraction, imitate
        self.temperature, self.adapter_kind = temperature, adapter
        self.adapter: nn.Module | None = None
        self._hooks: list[Any] = []
        self._boxes: GroundTruthBoxes | None = None

    def __call__(self, student_feature: Tensor | list[Tensor], teacher_feature: Tensor | list[Tensor]) -> Tensor:
        """``student [B, Cs, ...], teacher [B, Ct, ...] -> scalar``; uses the adapter when there is one. Lists of
        maps (FPN levels) are matched level by level through the one adapter and the distances averaged."""
        students = student_feature if isinstance(student_feature, list) else [student_feature]
        teachers = teacher_feature if isinstance(teacher_feature, list) else [teacher_feature]
        if len(students) != len(teachers):
            raise ConfigError(f"hint: the student layer {self.student_layer} gives {len(students)} feature maps and "
                              f"the teacher layer {self.teacher_layer} {len(teachers)}; pick layers with as many levels")
        return torch.stack([self._distance(s, t) for s, t in zip(students, teachers)]).mean()

    def _distance(self, student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
        """One map (or vector) pair: the mean distance over every element, or over the object cells' channels."""
        s = student_feature
        if self.adapter is not None:
            s = self.adapter(s)
        t = teacher_feature.detach().to(s.dtype)
        if s.ndim == 4 and s.shape[-2:] != t.shape[-2:]:
            s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
        if self.distance in WHOLE_MAP_DISTANCES and (s.ndim != 4 or t.ndim != 4):
            raise ConfigError(f"hint: distance {self.distance} needs [B, C, H, W] maps; {self.student_layer} gives "
                              f"{tuple(s.shape)}, {self.teacher_layer} {tuple(t.shape)}")
        if self.distance == "attention":
            return attention_transfer(s, t)
        if s.shape != t.shape:
            raise ConfigError(f"hint: adapted student feature {tuple(s.shape)} does not match teacher feature "
                              f"{tuple(t.shape)} ({self.student_layer} -> {self.teacher_layer})")
        s, t = s.float(), t.float()
        if self.distance == "channel_kl":
            return channel_kl(s, t, self.temperature)
        if self.distance == "l1":
            diff = (s - t).abs()
        elif self.distance == "pearson":
            diff = (standardize_channels(s) - standardize_channels(t)).square() / 2
        else:
            diff = (s - t).square()
        if self._boxes is None:
            return diff.mean()
        mask = self._boxes.mask(tuple(t.shape[-2:]), t.device)
        return (diff * mask).sum() / (mask.sum() * t.shape[1]).clamp(min=1.0)

    @staticmethod
    def make_adapter(student_shape: torch.Size, teacher_shape: torch.Size, kind: str = "linear") -> nn.Module:
        """A 1x1 conv (maps) or linear layer (vectors, tokens) from the student's channels to the teacher's; for
        ``kind="mlp"`` two of them with a ReLU between (the hidden width the teacher's)."""
        if len(student_shape) != len(teacher_shape):
            raise ConfigError(f"hint: student feature {tuple(student_shape)} and teacher feature "
                              f"{tuple(teacher_shape)} have different ranks; pick layers of the same kind")
        cs, ct = int(student_shape[1] if len(student_shape) != 3 else student_shape[-1]), \
            int(teacher_shape[1] if len(teacher_shape) != 3 else teacher_shape[-1])
        if len(student_shape) not in (2, 3, 4):
            raise ConfigError(f"hint: features of rank {len(student_shape)} are not supported (use [B, C, H, W], "
                              "[B, C] or [B, N, C])")
        layer = partial(nn.Conv2d, kernel_size=1) if len(student_shape) == 4 else nn.Linear
        return nn.Sequential(layer(cs, ct), nn.ReLU(), layer(ct, ct)) if kind == "mlp" else layer(cs, ct)

    def check_models(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Before anything trains: both layers exist (the error names the closest module paths)."""
        for key, model, path in (("student_layer", student, self.student_layer),
                                 ("teacher_layer", teacher, self.teacher_layer)):
            try:
                if model is not None:
                    get_submodule(model, path, key.removesuffix("_layer"))
            except ConfigError as err:
                raise ConfigError(f"hint {key}: {err}") from None

    def setup(self, ctx: SetupContext) -> nn.Module | None:
        if ctx.teacher is None:
            raise ConfigError("hint needs a teacher")
        self.close()
        self.student_hook = FeatureHook(ctx.student, self.student_layer, "student")
        self.teacher_hook = FeatureHook(ctx.teacher, self.teacher_layer, "teacher")
        self._hooks = [self.student_hook, self.teacher_hook]
        if self.imitate == "objects":
            self._boxes = GroundTruthBoxes(unwrap_model(ctx.student))
            self._hooks.append(self._boxes)
        ctx.dry_forward("student")
        ctx.dry_forward("teacher")
        first = [v[0] if isinstance(v, list) else v for v in (self.student_hook.get(), self.teacher_hook.get())]
        s_shape, t_shape = first[0].shape, first[1].shape
        for h in self._hooks:
            h.clear()
        if self.distance in WHOLE_MAP_DISTANCES and (len(s_shape) != 4 or len(t_shape) != 4):
            raise ConfigError(f"hint: distance {self.distance} needs [B, C, H, W] maps; student layer "
                              f"{self.student_layer!r} gives {tuple(s_shape)}, teacher layer {self.teacher_layer!r} "
                              f"{tuple(t_shape)}")
        if self.distance == "attention":  # compares channel means: nothing to adapt
            return None
        self.adapter = self.make_adapter(s_shape, t_shape, self.adapter_kind).to(ctx.device)
        return self.adapter

    def compute(self, ctx: LossContext) -> Tensor:
        return self(self.student_hook.get(), self.teacher_hook.get())

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._boxes = None


@hookimpl
def ddkit_losses():
    yield LossSpec(name="hard_label", factory=HardLabel, params=HardLabelParams,
                   summary="the task's native supervised loss (ground truth and pseudo-labels)")
    yield LossSpec(name="soft_target", factory=SoftTarget, params=SoftTargetParams,
                   summary="Hinton KD: T^2 * KL(softmax(t/T) || softmax(s/T))")
    yield LossSpec(name="hint", factory=Hint, params=HintParams,
                   summary="FitNets hint: L2, L1, Pearson (PKD), channel-wise KL (CWD) or attention transfer (AT) "
                           "between a teacher feature and an adapted student feature",
                   examples=({"teacher_layer": "1", "student_layer": "1"},
                             {"teacher_layer": "1", "student_layer": "1", "adapter": "mlp"}))
    yield LossSpec(name="detector_kd", factory=DetectorKD, params=DetectorKDParams,
                   summary="Chen et al. 2017 two-stage detector KD, RoI head and RPN: weighted soft targets, bounded "
                           "regression",
                   examples=({"temperature": 1.0},))
    yield LossSpec(name="dense_kd", factory=DenseKD, params=DenseKDParams,
                   summary="one-stage detector KD (RetinaNet, FCOS): per-anchor soft class targets",
                   examples=({"temperature": 1.0},))
