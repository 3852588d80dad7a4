"""Mixed precision as one small object: float16 autocast + GradScaler on CUDA, a no-op elsewhere."""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator, Sequence

import torch


class Amp:
    """Wraps the forward (``autocast``), ``backward`` and the optimizer + scheduler ``step`` of a training step.

    ``enabled``: ``amp`` of the train block, ``None`` = on when training on CUDA; never on the CPU.
    """

    state_key = "scaler"

    def __init__(self, device: torch.device, amp: bool | None):
        self.device = device
        self.enabled = device.type == "cuda" if amp is None else (amp and device.type == "cuda")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.enabled)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.enabled):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, scheduler: Any, params: Sequence[torch.Tensor],
             clip_grad_norm: float | None) -> None:
        """Clip (on unscaled gradients), step the optimizer (the scaler skips overflowing steps), step the LR."""
        if clip_grad_norm is not None:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
        self.scaler.step(optimizer)
        self.scaler.update()
        with warnings.catch_warnings():
            if self.enabled:  # the scaler skips the steps whose gradients overflowed: expected, not worth a warning
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.enabled else {}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.enabled and state:
            self.scaler.load_state_dict(state)
