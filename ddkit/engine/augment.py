"""Training-time augmentation: a random horizontal flip and a random whole-pixel shift per sample.

Each draw uses its own generator seeded from ``(seed, rank, iteration, kind)``, so augmentation never touches the
global RNG (dropout's) and a resumed run draws the same flips and shifts as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch

from ddkit.engine.task import Task
from ddkit.errors import ConfigError
from ddkit.types import DatasetInfo


def mix_seed(*values: Any) -> int:
    """A 63-bit seed from any reprs: a stable hash (not Python's salted ``hash``)."""
    h = hashlib.blake2b(repr(values).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") % (2 ** 63)


def shift_image(image: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """``[C, H, W]`` moved ``dx`` pixels right and ``dy`` down; uncovered pixels are 0."""
    out = torch.zeros_like(image)
    h, w = image.shape[-2:]
    if abs(dx) >= w or abs(dy) >= h:
        return out
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        image[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


class Augment:
    """``samples -> samples`` for iteration ``it``: flip with probability ``hflip`` (the task moves boxes and
    keypoints), then shift by ``[-translate, translate]`` pixels on each axis (only for tasks that declare
    ``supports_translate``: the shift does not move boxes or keypoints)."""

    def __init__(self, task: Task, info: DatasetInfo, hflip: float, translate: int, seed: int, rank: int):
        if translate > 0 and not getattr(task, "supports_translate", False):
            raise ConfigError(f"train.translate shifts images without moving boxes or keypoints: the task "
                              f"{task.name!r} does not support it; set translate: 0")
        self.task, self.info, self.hflip, self.translate = task, info, hflip, translate
        self.seed, self.rank = seed, rank

    @property
    def random(self) -> bool:
        return self.hflip > 0 or self.translate > 0

    def __call__(self, samples: list[Any], it: int) -> list[Any]:
        if self.hflip > 0:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.rank, it, "hflip"))
            flips = (torch.rand(len(samples), generator=g) < self.hflip).tolist()
            samples = [self.task.hflip(im, t, self.info) if f else (im, t) for (im, t), f in zip(samples, flips)]
        if self.translate > 0:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.rank, it, "translate"))
            shifts = torch.randint(-self.translate, self.translate + 1, (len(samples), 2), generator=g).tolist()
            samples = [(shift_image(im, dx, dy), t) for (im, t), (dx, dy) in zip(samples, shifts)]
        return samples
