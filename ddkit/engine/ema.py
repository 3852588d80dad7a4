"""An exponential moving average (EMA) of the student's weights, as Ultralytics (``ModelEMA``), timm
(``--model-ema``) and detectron2 (``MODEL_EMA``) train: :class:`EMAHook` (``train.ema_decay > 0``).

The average is ``torch.optim.swa_utils.AveragedModel`` with buffers (BatchNorm's running statistics are averaged
too, as Ultralytics does) and Ultralytics' ramp: the ``n``-th update (``n`` = 0, 1, ...) keeps
:func:`ema_decay_at` ``= decay * (1 - exp(-n / tau))`` of the average, so the first update copies the weights and
the early average follows the fast-moving weights. Evaluations during training use the average; when the schedule
is complete it replaces the student's weights, so ``model.pt``, the final evaluation and the returned model are the
average. A checkpoint keeps the raw weights (the optimizer continues from them) and the average of every step so
far beside them; the final checkpoint of a complete schedule holds the average as its model, as ``model.pt`` does.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from ddkit.engine.hooks import HookBase
from ddkit.engine.task import unwrap_model


def ema_decay_at(updates: int, decay: float, tau: float) -> float:
    """The share of the average kept at update number ``updates`` (0-based): Ultralytics' ramp."""
    return decay * (1.0 - math.exp(-updates / tau))


class EMAHook(HookBase):
    """Updates the average after every step; see the module docstring."""

    state_key = "ema"

    def __init__(self, student: nn.Module, decay: float, tau: float):
        self.decay, self.tau = decay, tau
        self._keep = 0.0
        self.average = AveragedModel(unwrap_model(student), multi_avg_fn=self._lerp, use_buffers=True)

    def _lerp(self, averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: Any) -> None:
        """One dtype group of tensors: floats move ``1 - keep`` of the way to the weights; integer buffers
        (BatchNorm's step count) are copied."""
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1.0 - self._keep)
        else:
            for a, c in zip(averaged, current):
                a.copy_(c)

    def before_train(self) -> None:
        self.trainer.averaged = self.average.module

    @property
    def updates(self) -> int:
        """How many steps the average has taken (``AveragedModel``'s count, checkpointed with it)."""
        return int(self.average.n_averaged)

    def after_step(self) -> None:
        self._keep = ema_decay_at(self.updates, self.decay, self.tau)
        self.average.update_parameters(unwrap_model(self.trainer.student))

    def after_train(self) -> None:
        """A complete schedule: the student takes the average's weights (before the final checkpoint and
        ``model.pt`` are written)."""
        t = self.trainer
        if t.stop >= t.total and self.updates:
            unwrap_model(t.student).load_state_dict(self.average.module.state_dict())

    def state_dict(self) -> dict[str, Any]:
        return self.average.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """``None``: a checkpoint written without an average (EMA switched on at resume) starts it afresh."""
        if state:
            self.average.load_state_dict(state)
