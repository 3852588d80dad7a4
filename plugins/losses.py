"""Builtin loss terms."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from ddkit import hookimpl
from ddkit.types import LossSpec


@dataclass
class SoftTargetParams:
    temperature: float = 4.0
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


class SoftTarget:
    """Hinton et al. 2015: ``T^2 * KL(softmax(t/T) || softmax(s/T))``, averaged over the batch."""

    def __init__(self, temperature: float = 4.0, weight: float = 1.0):
        self.temperature = temperature
        self.weight = weight

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """``student_logits [B, C], teacher_logits [B, C] -> scalar``."""
        t = self.temperature
        log_p_student = F.log_softmax(student_logits / t, dim=-1)
        log_p_teacher = F.log_softmax(teacher_logits.detach() / t, dim=-1)
        return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * t * t


@hookimpl
def ddkit_losses():
    yield LossSpec(name="soft_target", factory=SoftTarget, params=SoftTargetParams,
                   summary="Hinton KD: T^2 * KL(softmax(t/T) || softmax(s/T))")
