"""Builtin loss terms (see :mod:`ddkit.engine.losses` for the protocol the trainer uses).

* ``hard_label``: the task's native supervised loss (cross-entropy, or a detector's own losses) on ground truth
  and pseudo-labels alike.
* ``soft_target``: Hinton, Vinyals, Dean 2015: ``T^2 * KL(softmax(t/T) || softmax(s/T))``, batch mean.
* ``detector_kd``: Chen et al. 2017 for two-stage detectors: soft targets on the student's RoIs (background
  weighted) + a box regression bounded by the teacher's error.
* ``hint``: FitNets (Romero et al. 2015): L2 or L1 between a teacher feature and an adapted student feature
  (features captured by forward hooks; the adaptation layer is a 1x1 conv or a linear layer created from the shapes
  seen in a dry forward pass and trained with the student); optional two-stage schedule (``stage_fraction``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddkit import ConfigError, hookimpl
from ddkit.engine.task import FeatureHook, LossContext, SetupContext, unwrap_model
from ddkit.types import LossSpec


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
    distance: Literal["l2", "l1"] = "l2"
    weight: float = 1.0
    stage_fraction: float = 0.0

    def __post_init__(self) -> None:
        _check_weight(self.weight)
        if not 0.0 <= self.stage_fraction < 1.0:
            raise ValueError(f"stage_fraction must be in [0, 1), got {self.stage_fraction}")


class Hint:
    """FitNets hint: ``mean |adapter(student_feature) - teacher_feature|^p`` (p = 2 for ``l2``, 1 for ``l1``).

    Features are module outputs named by path (``model.get_submodule``), e.g. ``features.3`` or
    ``backbone.body.layer3``, captured by forward hooks. The adaptation layer is created from the shapes of a dry
    forward pass: a 1x1 conv for ``[B, C, H, W]`` maps, a linear layer for ``[B, C]`` or ``[B, N, C]`` features.
    When the maps differ in size the adapted student map is resized (bilinear) to the teacher's.

    ``stage_fraction > 0`` makes the hint a first stage as in FitNets: for that fraction of the iterations only
    the hint trains (with its adapter), then the other terms (hard label, soft target) take over.
    """

    teacher_outputs = "features"

    def __init__(self, teacher_layer: str, student_layer: str, distance: str = "l2", weight: float = 1.0,
                 stage_fraction: float = 0.0):
        self.teacher_layer, self.student_layer = teacher_layer, student_layer
        self.distance, self.weight, self.stage_fraction = distance, weight, stage_fraction
        self.adapter: nn.Module | None = None
        self._hooks: list[FeatureHook] = []

    def __call__(self, student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
        """``student [B, Cs, ...], teacher [B, Ct, ...] -> scalar``; uses the adapter when there is one."""
        s = student_feature
        if self.adapter is not None:
            s = self.adapter(s)
        t = teacher_feature.detach().to(s.dtype)
        if s.ndim == 4 and s.shape[-2:] != t.shape[-2:]:
            s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
        if s.shape != t.shape:
            raise ConfigError(f"hint: adapted student feature {tuple(s.shape)} does not match teacher feature "
                              f"{tuple(t.shape)} ({self.student_layer} -> {self.teacher_layer})")
        if self.distance == "l1":
            return F.l1_loss(s.float(), t.float())
        return F.mse_loss(s.float(), t.float())

    @staticmethod
    def make_adapter(student_shape: torch.Size, teacher_shape: torch.Size) -> nn.Module:
        """A 1x1 conv (maps) or linear layer (vectors, tokens) from the student's channels to the teacher's."""
        if len(student_shape) != len(teacher_shape):
            raise ConfigError(f"hint: student feature {tuple(student_shape)} and teacher feature "
                              f"{tuple(teacher_shape)} have different ranks; pick layers of the same kind")
        cs, ct = int(student_shape[1] if len(student_shape) != 3 else student_shape[-1]), \
            int(teacher_shape[1] if len(teacher_shape) != 3 else teacher_shape[-1])
        if len(student_shape) == 4:
            return nn.Conv2d(cs, ct, kernel_size=1)
        if len(student_shape) in (2, 3):
            return nn.Linear(cs, ct)
        raise ConfigError(f"hint: features of rank {len(student_shape)} are not supported (use [B, C, H, W], "
                          "[B, C] or [B, N, C])")

    def setup(self, ctx: SetupContext) -> nn.Module:
        if ctx.teacher is None:
            raise ConfigError("hint needs a teacher")
        self.close()
        self.student_hook = FeatureHook(ctx.student, self.student_layer, "student")
        self.teacher_hook = FeatureHook(ctx.teacher, self.teacher_layer, "teacher")
        self._hooks = [self.student_hook, self.teacher_hook]
        ctx.dry_forward("student")
        ctx.dry_forward("teacher")
        s_shape, t_shape = self.student_hook.get().shape, self.teacher_hook.get().shape
        for h in self._hooks:
            h.clear()
        self.adapter = self.make_adapter(s_shape, t_shape).to(ctx.device)
        return self.adapter

    def compute(self, ctx: LossContext) -> Tensor:
        return self(self.student_hook.get(), self.teacher_hook.get())

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


# ---------------------------------------------------------------------------------------- two-stage detector KD
@dataclass
class DetectorKDParams:
    temperature: float = 1.0
    background_weight: float = 1.5
    regression_weight: float = 0.5
    margin: float = 0.0
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        for key in ("background_weight", "regression_weight", "margin"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        _check_weight(self.weight)


def detector_kd_terms(student_logits: Tensor, teacher_logits: Tensor, student_deltas: Tensor, teacher_deltas: Tensor,
                      labels: Tensor, targets: Tensor, temperature: float = 1.0, background_weight: float = 1.5,
                      margin: float = 0.0) -> tuple[Tensor, Tensor]:
    """Chen et al. 2017's two distillation terms on the same ``R`` sampled RoIs of ``C + 1`` classes (0 = background).

    * soft: class-weighted KL at temperature ``T``, ``T^2 * mean_r sum_c w_c p_t (log p_t - log p_s)`` with
      ``w_0 = background_weight`` and ``w_c = 1`` otherwise (the weighted cross-entropy of the paper, less the
      teacher's weighted entropy, a constant: 0 when the student matches the teacher);
    * bounded regression: over the ``P`` foreground RoIs, ``mean ||r_s - y||^2`` where
      ``||r_s - y||^2 + margin > ||r_t - y||^2`` (the student is penalised only where it is not already better than
      the teacher), else 0; ``r`` are the deltas of the RoI's ground-truth class.

    Args:
        student_logits, teacher_logits: ``[R, C + 1]``.
        student_deltas, teacher_deltas: ``[R, (C + 1) * 4]`` box deltas (torchvision's encoding).
        labels: ``[R]`` ground-truth class of each RoI (0 = background); targets: ``[R, 4]`` regression targets.
    Returns:
        ``(soft, bounded)`` scalars.
    """
    t = temperature
    log_ps = F.log_softmax(student_logits.float() / t, dim=-1)
    log_pt = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
    w = torch.ones(log_ps.shape[-1], device=log_ps.device)
    w[0] = background_weight
    soft = (w * log_pt.exp() * (log_pt - log_ps)).sum(-1).mean() * t * t if len(log_ps) else log_ps.sum() * 0
    pos = torch.nonzero(labels > 0).squeeze(1)
    if len(pos) == 0:
        return soft, student_deltas.sum() * 0
    cls = labels[pos]
    rs = student_deltas.float().reshape(len(student_deltas), -1, 4)[pos, cls]
    rt = teacher_deltas.detach().float().reshape(len(teacher_deltas), -1, 4)[pos, cls]
    y = targets.float()[pos]
    es, et = ((rs - y) ** 2).sum(-1), ((rt - y) ** 2).sum(-1)
    bounded = (es * (es + margin > et)).mean()
    return soft, bounded


class DetectorKD:
    """Knowledge distillation for torchvision's two-stage detectors (Faster / Keypoint R-CNN), after Chen et al.,
    *Learning Efficient Object Detection Models with Knowledge Distillation*, NeurIPS 2017: on the RoIs the student
    sampled for its own loss, the teacher's box head runs on the teacher's features, and the student learns its
    class distribution (soft targets, the background class weighted by ``background_weight``) and a
    box regression bounded by the teacher's error. Use with ``hard_label`` (the detector's own losses) and
    optionally ``hint``; the RPN is not distilled. Returns ``soft + regression_weight * bounded``.

    The student's sampled RoIs, their labels and targets are read by wrapping ``roi_heads.select_training_samples``
    on the student instance, its predictions by a hook on ``roi_heads.box_predictor``; the teacher runs its own
    transform and backbone, the RoIs are scaled by the two transforms' size ratio.
    """

    teacher_outputs = "model"  # the term runs the teacher itself
    stage_fraction = 0.0
    tasks = ("detection", "keypoints")

    def __init__(self, temperature: float = 1.0, background_weight: float = 1.5, regression_weight: float = 0.5,
                 margin: float = 0.0, weight: float = 1.0):
        self.temperature, self.background_weight = temperature, background_weight
        self.regression_weight, self.margin, self.weight = regression_weight, margin, weight
        self._roi_heads: nn.Module | None = None
        self._hooks: list = []
        self._sampled: tuple | None = None
        self._predicted: tuple[Tensor, Tensor] | None = None
        self._image_sizes: list | None = None

    def setup(self, ctx: SetupContext) -> None:
        if ctx.teacher is None:
            raise ConfigError("detector_kd needs a teacher")
        student, teacher = unwrap_model(ctx.student), unwrap_model(ctx.teacher)
        for role, m in (("student", student), ("teacher", teacher)):
            if not hasattr(getattr(m, "roi_heads", None), "box_predictor"):
                raise ConfigError(f"detector_kd distils two-stage detectors (fasterrcnn, keypointrcnn); the {role} "
                                  f"({type(m).__name__}) has no roi_heads.box_predictor")
        n_s = student.roi_heads.box_predictor.cls_score.out_features
        n_t = teacher.roi_heads.box_predictor.cls_score.out_features
        if n_s != n_t:
            raise ConfigError(f"detector_kd: the student predicts {n_s} classes and the teacher {n_t}; they must "
                              "share the dataset's categories")
        self.close()
        heads = student.roi_heads
        original = heads.select_training_samples

        def select_training_samples(proposals, targets):
            out = original(proposals, targets)
            self._sampled = out  # (proposals, matched_idxs, labels, regression_targets)
            return out

        heads.select_training_samples = select_training_samples  # an instance attribute; close() removes it
        self._roi_heads = heads

        def keep_sizes(module, args):
            if module.training:
                self._image_sizes = list(args[2])

        def keep_predictions(module, args, out):
            if module.training:
                self._predicted = out

        self._hooks = [heads.box_roi_pool.register_forward_pre_hook(keep_sizes),
                       heads.box_predictor.register_forward_hook(keep_predictions)]
        return None

    @torch.no_grad()
    def _teacher_predictions(self, teacher: nn.Module, images: list[Tensor], proposals: list[Tensor]):
        t_images, _ = teacher.transform(images)
        scaled = []
        for p, (sh, sw), (th, tw) in zip(proposals, self._image_sizes or [], t_images.image_sizes):
            scaled.append(p.detach() * p.new_tensor([tw / sw, th / sh, tw / sw, th / sh]))
        feats = teacher.backbone(t_images.tensors)
        heads = teacher.roi_heads
        return heads.box_predictor(heads.box_head(heads.box_roi_pool(feats, scaled, t_images.image_sizes)))

    def compute(self, ctx: LossContext) -> Tensor:
        if self._sampled is None or self._predicted is None:
            raise RuntimeError("detector_kd: the student's RoI head did not run in training mode this step")
        proposals, _, labels, targets = self._sampled
        s_logits, s_deltas = self._predicted
        t_logits, t_deltas = self._teacher_predictions(unwrap_model(ctx.teacher), list(ctx.batch["images"]),
                                                       proposals)
        soft, bounded = detector_kd_terms(s_logits, t_logits, s_deltas, t_deltas, torch.cat(labels),
                                          torch.cat(targets), self.temperature, self.background_weight, self.margin)
        self._sampled = self._predicted = None
        ctx.logs["detector_kd/soft"], ctx.logs["detector_kd/bounded"] = soft.detach(), bounded.detach()
        return soft + self.regression_weight * bounded

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self._roi_heads is not None:
            self._roi_heads.__dict__.pop("select_training_samples", None)
            self._roi_heads = None


@hookimpl
def ddkit_losses():
    yield LossSpec(name="hard_label", factory=HardLabel, params=HardLabelParams,
                   summary="the task's native supervised loss (ground truth and pseudo-labels)")
    yield LossSpec(name="soft_target", factory=SoftTarget, params=SoftTargetParams,
                   summary="Hinton KD: T^2 * KL(softmax(t/T) || softmax(s/T))")
    yield LossSpec(name="hint", factory=Hint, params=HintParams,
                   summary="FitNets hint: L2/L1 between a teacher feature and an adapted student feature",
                   examples=({"teacher_layer": "1", "student_layer": "1"},))
    yield LossSpec(name="detector_kd", factory=DetectorKD, params=DetectorKDParams,
                   summary="Chen et al. 2017 two-stage detector KD: weighted soft targets + teacher-bounded regression",
                   examples=({"temperature": 1.0},))
