"""``dense_kd``: soft classification targets for one-stage detectors (torchvision's RetinaNet and FCOS).

Each anchor (RetinaNet) or location (FCOS) of the student is taught the teacher's per-class probabilities at the
same place: the Bernoulli KL of the sigmoid outputs at temperature ``T`` (Hinton et al.'s soft targets in the
sigmoid form one-stage detectors use, as in Tang et al., *Learning Efficient Detector with Semi-supervised
Adaptive Distillation*, 2019, without their adaptive focal weights), summed over anchors and classes and normalised
like the focal loss, by the teacher's expected number of object anchors: :func:`ddkit.ops.distill.dense_soft_targets`.
Feature imitation on the neck is the ``hint`` term on ``backbone`` (every FPN level through one adapter).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ddkit import ConfigError
from ddkit.engine.task import LossContext, SetupContext, unwrap_model
from ddkit.ops.distill import dense_soft_targets

from .detector_kd import TeacherBackbone, paired_detectors

__all__ = ["DenseKD", "DenseKDParams", "dense_soft_targets"]  # dense_soft_targets lives in ddkit.ops.distill


@dataclass
class DenseKDParams:
    temperature: float = 1.0
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")


class DenseKD:
    """Soft classification targets on a one-stage detector's dense predictions (see the module's docstring). The
    teacher is a one-stage detector of the same layout (anchors per location, strides, input size, classes): a
    RetinaNet or FCOS with a wider backbone."""

    teacher_outputs = "model"
    stage_fraction = 0.0
    tasks = ("detection",)

    def __init__(self, temperature: float = 1.0, weight: float = 1.0):
        self.temperature, self.weight = temperature, weight
        self._hook: Any = None
        self._teacher_backbone: TeacherBackbone | None = None
        self._student_logits: Tensor | None = None

    def setup(self, ctx: SetupContext) -> None:
        student, teacher = paired_detectors(ctx, "dense_kd", "head.classification_head",
                                            "one-stage detectors (retinanet, fcos)", "two-stage: detector_kd",
                                            lambda m: m.head.classification_head.num_classes)
        self.close()
        self._hook = student.head.register_forward_hook(self._keep)
        self._teacher_backbone = TeacherBackbone(teacher)
        return None

    def _keep(self, module: nn.Module, args: Any, out: dict[str, Tensor]) -> None:
        if module.training:
            self._student_logits = out["cls_logits"]

    def compute(self, ctx: LossContext) -> Tensor:
        s_logits, self._student_logits = self._student_logits, None
        if s_logits is None:
            raise RuntimeError("dense_kd: the student's head did not run in training mode this step")
        teacher = unwrap_model(ctx.teacher)
        _, feats = self._teacher_backbone(list(ctx.batch["images"]))
        with torch.no_grad():
            t_logits = teacher.head(list(feats.values()))["cls_logits"]
        if t_logits.shape != s_logits.shape:
            raise ConfigError(f"dense_kd: the teacher predicts {tuple(t_logits.shape)} class scores on this batch and "
                              f"the student {tuple(s_logits.shape)}; give both the same input size, strides and "
                              "anchors")
        return dense_soft_targets(s_logits, t_logits, self.temperature)

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._teacher_backbone is not None:
            self._teacher_backbone.remove()
            self._teacher_backbone = None
        self._student_logits = None
