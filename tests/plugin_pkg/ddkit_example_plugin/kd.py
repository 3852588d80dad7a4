"""A third-party KD loss: the mean squared difference between the student's and the teacher's class logits.

It reads the teacher (``teacher_outputs = "logits"``), so ddkit must hand it one under ``ddkit train`` and
``ddkit run`` although ddkit has never heard its name. It also logs the teacher's mean absolute logit, a value
that exists only when a teacher was really run.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ddkit import hookimpl
from ddkit.types import LossSpec


@dataclass
class LogitL2Params:
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")


class LogitL2:
    teacher_outputs = "logits"
    tasks = ("classification",)

    def __init__(self, weight: float = 1.0):
        self.weight = weight

    def compute(self, ctx) -> torch.Tensor:
        student, teacher = ctx.student_logits.float(), ctx.teacher_logits.detach().float()
        ctx.logs["example_logit_l2/teacher_abs"] = teacher.abs().mean()
        return ((student - teacher) ** 2).mean()


@hookimpl
def ddkit_losses():
    yield LossSpec(name="example_logit_l2", factory=LogitL2, params=LogitL2Params,
                   summary="mean squared difference of student and teacher logits (example third-party KD loss)")
