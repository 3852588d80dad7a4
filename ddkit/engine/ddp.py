"""Data-parallel training (``torchrun``) as one small object; with one process every method is a no-op."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ddkit.engine.task import unwrap_model


class DDP:
    """``world`` processes, each on ``device``: wraps the student, averages the extras' gradients (loss-term
    adapters live outside the DDP module), checks that the ranks end with identical weights."""

    def __init__(self, world: int, device: torch.device):
        self.world, self.device = world, device

    def wrap(self, student: nn.Module, find_unused: bool) -> nn.Module:
        """The module the training step runs: ``student`` itself, or a ``DistributedDataParallel`` around it.

        ``find_unused``: some parameters get no gradient in some steps (a first-stage hint term)."""
        if self.world <= 1:
            return student
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(student, device_ids=ids, find_unused_parameters=find_unused)

    def average_grads(self, extras: nn.Module) -> None:
        if self.world <= 1:
            return
        for p in extras.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.world

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def check_in_sync(self, student: nn.Module, extras: nn.Module, note: Callable[[str], None] | None) -> None:
        """After DDP training every rank must hold the same weights; compare a float64 checksum across ranks."""
        if self.world <= 1:
            return
        params = list(unwrap_model(student).parameters()) + list(extras.parameters())
        value = torch.stack([p.detach().double().sum() + (p.detach().double() ** 2).sum() for p in params]).sum()
        gathered = [torch.zeros((), dtype=torch.float64, device=self.device) for _ in range(self.world)]
        torch.distributed.all_gather(gathered, value.to(self.device))
        values = [float(v) for v in gathered]
        if any(v != values[0] for v in values):
            raise RuntimeError(f"DDP ranks ended with different weights (checksums {values})")
        if note is not None:
            note(f"DDP: the {self.world} ranks hold identical weights (checksum {values[0]:.6g})")
