"""``detector_kd``: knowledge distillation for torchvision's two-stage detectors (Faster / Keypoint R-CNN), after
Chen, Choi, Yu, Han, Chandraker, *Learning Efficient Object Detection Models with Knowledge Distillation*,
NeurIPS 2017, on both stages of the detector:

* the classifier on the student's sampled RoIs and the RPN on the student's sampled anchors: class-weighted soft
  targets (the background class weighted by ``background_weight``), blended with the detector's own hard loss as
  ``mu * hard + (1 - mu) * soft``;
* the box regression of both on the foreground RoIs / object anchors, ``regression_weight`` times, added to the
  detector's own smooth-L1 loss: with ``regression_target: ground_truth`` (the paper's) the student's error to the
  ground truth, counted only where it is not already better than the teacher's; with ``regression_target:
  teacher`` the student's distance to the teacher's deltas (plain imitation, no bound). Off by default
  (``regression_weight: 0``): on the first synthetic benchmark either target at 0.5 turned the soft terms' gain
  over a 300-iteration student into a loss; imitation gained about 1 AP on the harder one with a stronger teacher
  (README, "Knowledge distillation for detectors").
* with ``mimic_weight > 0``, Li, Jin, Yan 2017 (*Mimicking Very Efficient Network for Object Detection*)'s feature
  mimic: the squared distance between the student's RoI-pooled features, through a 1x1 adapter to the teacher's
  width, and the teacher's pooled on the same sampled RoIs (:func:`roi_mimic`): a hint on the regions the heads
  read, where FitNets' hint on the neck imitates every cell. On by default (``mimic_weight: 0.5``, since session
  31): the one setting measured to gain over the student alone on every seed of the synthetic benchmarks, where
  Chen et al.'s terms alone (``mimic_weight: 0``, the default before) did not (README). ``mimic_until < 1`` keeps
  it for that fraction of the iterations only (a first stage, after which the teacher's soft terms and boxes train
  the student alone).

The terms are pure functions (:func:`weighted_soft_ce`, :func:`bounded_regression`, :func:`imitation_regression`,
:func:`detector_kd_terms`, :func:`rpn_kd_terms`, :func:`roi_mimic`); :class:`DetectorKD` reads the student's
sampled RoIs / anchors, labels and targets by wrapping ``roi_heads.select_training_samples``, ``rpn.compute_loss``
and ``rpn.fg_bg_sampler`` on the student instance, and runs the teacher's heads on the same RoIs and anchors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddkit import ConfigError
from ddkit.engine.task import LossContext, SetupContext, unwrap_model


@dataclass
class DetectorKDParams:
    temperature: float = 1.0
    background_weight: float = 1.5
    mu: float = 0.5
    regression_weight: float = 0.0
    regression_loss: Literal["l2", "smooth_l1"] = "l2"
    regression_target: Literal["ground_truth", "teacher"] = "ground_truth"
    margin: float = 0.0
    rpn: bool = True
    mimic_weight: float = 0.5
    mimic_until: float = 1.0
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.mu <= 1.0:
            raise ValueError(f"mu must be in [0, 1], got {self.mu}")
        for key in ("background_weight", "regression_weight", "margin", "mimic_weight", "weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if not 0.0 < self.mimic_until <= 1.0:
            raise ValueError(f"mimic_until must be in (0, 1] (a fraction of the iterations), got {self.mimic_until}")


def weighted_soft_ce(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
                     background_weight: float = 1.5) -> Tensor:
    """``[N, K], [N, K] -> scalar``: ``T^2 * mean_n sum_k w_k p_t (log p_t - log p_s)`` at temperature ``T``, with
    ``w_0 = background_weight`` (class 0 is background) and ``w_k = 1`` otherwise: the paper's weighted
    cross-entropy less the teacher's weighted entropy (a constant), so 0 when the student matches the teacher."""
    if len(student_logits) == 0:
        return student_logits.sum() * 0
    t = temperature
    log_ps = F.log_softmax(student_logits.float() / t, dim=-1)
    log_pt = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
    w = torch.ones(log_ps.shape[-1], device=log_ps.device)
    w[0] = background_weight
    return (w * log_pt.exp() * (log_pt - log_ps)).sum(-1).mean() * t * t


def regression_error(deltas: Tensor, reference: Tensor, loss: str = "l2") -> Tensor:
    """``[P, 4], [P, 4] -> [P]``: each row's squared L2 distance (``l2``) or the smooth-L1 distance of
    torchvision's box losses (``smooth_l1``, beta 1/9)."""
    if loss == "smooth_l1":
        return F.smooth_l1_loss(deltas.float(), reference.float(), beta=1 / 9, reduction="none").sum(-1)
    return ((deltas.float() - reference.float()) ** 2).sum(-1)


def bounded_regression(student: Tensor, teacher: Tensor, targets: Tensor, margin: float, normalizer: int,
                       loss: str = "l2") -> Tensor:
    """``[P, 4] x 3 -> scalar``: ``sum_p e_s [e_s + margin > e_t] / normalizer`` where ``e`` is the
    :func:`regression_error` to the targets: the student is taught only where it is not already better than the
    teacher. ``normalizer`` is the number of sampled RoIs / anchors, as the detector's own box loss is
    normalised."""
    es, et = regression_error(student, targets, loss), regression_error(teacher.detach(), targets, loss)
    return (es * (es + margin > et)).sum() / max(normalizer, 1)


def imitation_regression(student: Tensor, teacher: Tensor, normalizer: int, loss: str = "l2") -> Tensor:
    """``[P, 4], [P, 4] -> scalar``: ``sum_p d(r_s, r_t) / normalizer``, the student's :func:`regression_error` to
    the teacher's deltas: the teacher's localisation, imitated wherever the student has an object."""
    return regression_error(student, teacher.detach(), loss).sum() / max(normalizer, 1)


def regression_term(student: Tensor, teacher: Tensor, targets: Tensor, normalizer: int, margin: float = 0.0,
                    loss: str = "l2", target: str = "ground_truth") -> Tensor:
    """``[P, 4] x 3 -> scalar``: :func:`bounded_regression` (``target="ground_truth"``, the paper's) or
    :func:`imitation_regression` (``target="teacher"``; ``targets`` and ``margin`` unused)."""
    if target == "teacher":
        return imitation_regression(student, teacher, normalizer, loss)
    return bounded_regression(student, teacher, targets, margin, normalizer, loss)


def roi_mimic(student_pooled: Tensor, teacher_pooled: Tensor) -> Tensor:
    """``[R, C, h, w], [R, C, h, w] -> scalar``: ``mean_r ||u_s - u_t||^2 / m`` over the ``R`` RoIs' pooled features
    of ``m = C h w`` values each (the student's already adapted to the teacher's ``C``): Li et al. 2017's mimic loss
    without its factor 1/2; 0 for no RoIs."""
    if len(student_pooled) == 0:
        return student_pooled.sum() * 0
    return (student_pooled.float() - teacher_pooled.detach().float()).square().mean()


def detector_kd_terms(student_logits: Tensor, teacher_logits: Tensor, student_deltas: Tensor, teacher_deltas: Tensor,
                      labels: Tensor, targets: Tensor, temperature: float = 1.0, background_weight: float = 1.5,
                      margin: float = 0.0, regression_loss: str = "l2", regression_target: str = "ground_truth"
                      ) -> tuple[Tensor, Tensor]:
    """The RoI head's two terms on the same ``R`` sampled RoIs of ``C + 1`` classes (0 = background).

    Args:
        student_logits, teacher_logits: ``[R, C + 1]``.
        student_deltas, teacher_deltas: ``[R, (C + 1) * 4]`` box deltas (torchvision's encoding).
        labels: ``[R]`` ground-truth class of each RoI (0 = background); targets: ``[R, 4]`` regression targets.
    Returns:
        ``(soft, regression)``: :func:`weighted_soft_ce` over the ``R`` RoIs, :func:`regression_term` over the
        foreground ones (the deltas of their ground-truth class) divided by ``R``.
    """
    soft = weighted_soft_ce(student_logits, teacher_logits, temperature, background_weight)
    pos = torch.nonzero(labels > 0).squeeze(1)
    shape = (len(labels), student_logits.shape[-1], 4)
    rs, rt = (d.reshape(shape)[pos, labels[pos]] for d in (student_deltas, teacher_deltas))
    return soft, regression_term(rs, rt, targets[pos], len(labels), margin, regression_loss, regression_target)


def rpn_kd_terms(student_objectness: Tensor, teacher_objectness: Tensor, student_deltas: Tensor,
                 teacher_deltas: Tensor, labels: Tensor, targets: Tensor, temperature: float = 1.0,
                 background_weight: float = 1.5, margin: float = 0.0, regression_loss: str = "l2",
                 regression_target: str = "ground_truth") -> tuple[Tensor, Tensor]:
    """The RPN's two terms on the same ``A`` sampled anchors.

    Args:
        student_objectness, teacher_objectness: ``[A]`` logits (torchvision's sigmoid objectness: the two-class
            softmax of ``(0, x)``, background first).
        student_deltas, teacher_deltas, targets: ``[A, 4]``; labels: ``[A]``, 1 = object, 0 = background.
    Returns:
        ``(soft, regression)``: :func:`weighted_soft_ce` of the two-class distributions, :func:`regression_term`
        over the object anchors divided by ``A``.
    """
    def two_class(x: Tensor) -> Tensor:
        return torch.stack([torch.zeros_like(x), x], dim=-1)

    soft = weighted_soft_ce(two_class(student_objectness), two_class(teacher_objectness), temperature,
                            background_weight)
    pos = torch.nonzero(labels > 0).squeeze(1)
    return soft, regression_term(student_deltas[pos], teacher_deltas[pos], targets[pos], len(labels), margin,
                                 regression_loss, regression_target)


class _Patches:
    """Instance attributes set on modules for the run, removed (or restored) by :meth:`undo`."""

    def __init__(self) -> None:
        self._undo: list[tuple[Any, str, Any]] = []

    def set(self, obj: Any, name: str, value: Any) -> None:
        self._undo.append((obj, name, obj.__dict__.get(name, _Patches)))
        setattr(obj, name, value)

    def undo(self) -> None:
        for obj, name, old in reversed(self._undo):
            if old is _Patches:
                obj.__dict__.pop(name, None)
            else:
                setattr(obj, name, old)
        self._undo = []


class TeacherBackbone:
    """The teacher's transform and backbone on a batch, re-using the features of a forward the trainer already ran
    for a hint term this step (a forward hook on ``backbone`` keeps its input and output)."""

    def __init__(self, teacher: nn.Module):
        self.teacher = teacher
        self._seen: tuple[Tensor, Any] | None = None
        self._handle = teacher.backbone.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args: Any, out: Any) -> None:
        self._seen = (args[0], out)

    @torch.no_grad()
    def __call__(self, images: list[Tensor]) -> tuple[Any, dict[str, Tensor]]:
        """``images -> (ImageList, {level: [B, C, H, W]})``."""
        t_images, _ = self.teacher.transform(images)
        seen, self._seen = self._seen, None
        if seen is not None and seen[0].shape == t_images.tensors.shape and torch.equal(seen[0], t_images.tensors):
            return t_images, seen[1]
        return t_images, self.teacher.backbone(t_images.tensors)

    def remove(self) -> None:
        self._handle.remove()


def paired_detectors(ctx: SetupContext, term: str, head: str, kinds: str, other: str,
                     num_classes: Callable[[nn.Module], int]) -> tuple[nn.Module, nn.Module]:
    """The unwrapped ``(student, teacher)`` of a detector KD term: both have the submodule ``head`` and predict as
    many classes, else a one-line :class:`ConfigError` naming ``kinds`` (what the term distils) and ``other`` (the
    term for the other kind)."""
    if ctx.teacher is None:
        raise ConfigError(f"{term} needs a teacher")
    models = {"student": unwrap_model(ctx.student), "teacher": unwrap_model(ctx.teacher)}
    for role, m in models.items():
        try:
            m.get_submodule(head)
        except AttributeError:
            raise ConfigError(f"{term} distils {kinds}; the {role} ({type(m).__name__}) has no {head} "
                              f"({other})") from None
    n_s, n_t = (num_classes(m) for m in models.values())
    if n_s != n_t:
        raise ConfigError(f"{term}: the student predicts {n_s} classes and the teacher {n_t}; they must share the "
                          "dataset's categories")
    return models["student"], models["teacher"]


class DetectorKD:
    """Chen et al. 2017 for torchvision's two-stage detectors, RoI head and RPN (see the module's docstring).

    Use with ``hard_label`` at weight 1 (the detector's own losses): with ``mu < 1`` this term takes ``1 - mu``
    of the detector's classification and objectness losses out and puts ``1 - mu`` of the soft losses in. The
    teacher runs its own transform and backbone; the student's RoIs are scaled by the two transforms' size ratio.
    The RPN terms (``rpn: true``) need the two RPNs' anchors to coincide (same input size, feature strides and
    anchor generator), which is checked at the first step.
    """

    teacher_outputs = "model"  # the term runs the teacher itself
    stage_fraction = 0.0
    tasks = ("detection", "keypoints")

    def __init__(self, temperature: float = 1.0, background_weight: float = 1.5, mu: float = 0.5,
                 regression_weight: float = 0.0, regression_loss: str = "l2",
                 regression_target: str = "ground_truth", margin: float = 0.0, rpn: bool = True,
                 mimic_weight: float = 0.5, mimic_until: float = 1.0, weight: float = 1.0):
        self.temperature, self.background_weight, self.mu = temperature, background_weight, mu
        self.regression_weight, self.regression_loss = regression_weight, regression_loss
        self.regression_target = regression_target
        self.margin, self.rpn, self.mimic_weight, self.weight = margin, rpn, mimic_weight, weight
        self.mimic_until = mimic_until
        self.adapter: nn.Module | None = None
        self._patches = _Patches()
        self._hooks: list = []
        self._teacher_backbone: TeacherBackbone | None = None
        self._seen: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------------- setup
    def setup(self, ctx: SetupContext) -> nn.Module | None:
        student, teacher = paired_detectors(ctx, "detector_kd", "roi_heads.box_predictor",
                                            "two-stage detectors (fasterrcnn, keypointrcnn)", "one-stage: dense_kd",
                                            lambda m: m.roi_heads.box_predictor.cls_score.out_features - 1)
        self.close()
        self._record(student.roi_heads, "select_training_samples", "rois")  # (proposals, idxs, labels, targets)
        heads = student.roi_heads
        self._hooks = [heads.box_roi_pool.register_forward_hook(self._keep_pooling),
                       heads.box_predictor.register_forward_hook(self._keep_predictions)]
        if self.rpn:
            self._record(student.rpn, "compute_loss", "anchors")  # args: (objectness, deltas, labels, targets)
            self._record(student.rpn, "fg_bg_sampler", "sampled")
        self._teacher_backbone = TeacherBackbone(teacher)
        if not self.mimic_weight:
            return None
        s_size, t_size = (m.roi_heads.box_roi_pool.output_size for m in (student, teacher))
        if s_size != t_size:
            raise ConfigError(f"detector_kd: the feature mimic compares RoI-pooled features, but the student pools "
                              f"{s_size} and the teacher {t_size}; give both the same RoI pooling, or set "
                              "mimic_weight: 0")
        self.adapter = nn.Conv2d(student.backbone.out_channels, teacher.backbone.out_channels, 1).to(ctx.device)
        return self.adapter

    def _record(self, obj: Any, name: str, key: str) -> None:
        """Wrap the callable ``obj.name`` (a method, or a callable attribute such as the RPN's sampler) so that each
        training call's arguments and result are kept under ``key``."""
        original = getattr(obj, name)

        def wrapper(*args: Any) -> Any:
            out = original(*args)
            self._seen[key] = (args, out)
            return out

        self._patches.set(obj, name, wrapper)

    def _keep_pooling(self, module: nn.Module, args: Any, out: Tensor) -> None:
        """The image sizes the student's RoIs refer to, and its pooled features (for the mimic)."""
        if module.training:
            self._seen["sizes"], self._seen["pooled"] = list(args[2]), out

    def _keep_predictions(self, module: nn.Module, args: Any, out: Any) -> None:
        if module.training:
            self._seen["predicted"] = out

    # ----------------------------------------------------------------------------------------------- compute
    def compute(self, ctx: LossContext) -> Tensor:
        seen, self._seen = self._seen, {}
        if "rois" not in seen or "predicted" not in seen:
            raise RuntimeError("detector_kd: the student's RoI head did not run in training mode this step")
        teacher = unwrap_model(ctx.teacher)
        t_images, feats = self._teacher_backbone(list(ctx.batch["images"]))
        hard, keep = ctx.student_out.losses, 1.0 - self.mu
        soft, regression, mimic = self._roi_terms(teacher, t_images, feats, seen, ctx)
        total = keep * (soft - hard["loss_classifier"].float()) + self.regression_weight * regression \
            + self.mimic_weight * mimic
        if self.rpn:
            rpn_soft, rpn_regression = self._rpn_terms(teacher, feats, seen, ctx)
            total = total + keep * (rpn_soft - hard["loss_objectness"].float()) \
                + self.regression_weight * rpn_regression
        return total

    def _roi_terms(self, teacher: nn.Module, t_images: Any, feats: dict[str, Tensor], seen: dict[str, Any],
                   ctx: LossContext) -> tuple[Tensor, Tensor, Tensor]:
        """``(soft, regression, mimic)`` on the student's sampled RoIs (``mimic`` 0 without an adapter and from
        ``mimic_until`` of the iterations on)."""
        _, (proposals, _, labels, targets) = seen["rois"]
        scaled = []
        for p, (sh, sw), (th, tw) in zip(proposals, seen.get("sizes") or [], t_images.image_sizes):
            scaled.append(p.detach() * p.new_tensor([tw / sw, th / sh, tw / sw, th / sh]))
        heads = teacher.roi_heads
        with torch.no_grad():
            t_pooled = heads.box_roi_pool(feats, scaled, t_images.image_sizes)
            t_logits, t_deltas = heads.box_predictor(heads.box_head(t_pooled))
        mimic = t_logits.new_zeros(())
        if self.adapter is not None and ctx.iteration < self.mimic_until * ctx.total_iterations:
            mimic = roi_mimic(self.adapter(seen["pooled"]), t_pooled)
            ctx.logs["detector_kd/mimic"] = mimic.detach()
        s_logits, s_deltas = seen["predicted"]
        labels, targets = torch.cat(labels), torch.cat(targets)
        soft, regression = detector_kd_terms(s_logits, t_logits, s_deltas, t_deltas, labels, targets,
                                             self.temperature, self.background_weight, self.margin,
                                             self.regression_loss, self.regression_target)
        fg = labels > 0
        ctx.logs["detector_kd/soft"], ctx.logs["detector_kd/regression"] = soft.detach(), regression.detach()
        if fg.any():  # how often the teacher is right on the student's foreground RoIs
            ctx.logs["detector_kd/teacher_fg_acc"] = (t_logits[fg].argmax(-1) == labels[fg]).float().mean()
        return soft, regression, mimic

    def _rpn_terms(self, teacher: nn.Module, feats: dict[str, Tensor], seen: dict[str, Any],
                   ctx: LossContext) -> tuple[Tensor, Tensor]:
        from torchvision.models.detection.rpn import concat_box_prediction_layers

        (s_obj, s_deltas, labels, targets), _ = seen["anchors"]
        _, (pos_masks, neg_masks) = seen["sampled"]
        with torch.no_grad():
            t_obj, t_deltas = concat_box_prediction_layers(*teacher.rpn.head(list(feats.values())))
        if t_obj.shape != s_obj.shape:
            raise ConfigError(f"detector_kd: the teacher's RPN has {len(t_obj)} anchors on this batch and the "
                              f"student's {len(s_obj)}; the RPN terms need the same input size, feature strides "
                              "and anchors (or set rpn: false)")
        idx = torch.nonzero(torch.cat(pos_masks) | torch.cat(neg_masks)).squeeze(1)
        soft, regression = rpn_kd_terms(s_obj.flatten()[idx], t_obj.flatten()[idx], s_deltas[idx], t_deltas[idx],
                                        torch.cat(labels)[idx], torch.cat(targets)[idx], self.temperature,
                                        self.background_weight, self.margin, self.regression_loss,
                                        self.regression_target)
        ctx.logs["detector_kd/rpn_soft"], ctx.logs["detector_kd/rpn_regression"] = soft.detach(), regression.detach()
        return soft, regression

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._patches.undo()
        if self._teacher_backbone is not None:
            self._teacher_backbone.remove()
            self._teacher_backbone = None
        self._seen, self.adapter = {}, None
