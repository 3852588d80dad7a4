"""Where a detector's hint imitates its teacher: the feature-map cells that ground-truth boxes cover.

Imitating every position of a detector's neck spends the student's few channels on background; Wang et al. 2019
(*Distilling Object Detectors with Fine-grained Feature Imitation*) imitate only near objects. Here the region is
the cells under the ground-truth boxes, as in FGD's foreground mask (Yang et al. 2022), not Wang et al.'s anchor IoU
rule, so it needs no anchors and serves any detector whose transform hands resized boxes to its heads (torchvision's).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ddkit import ConfigError


def box_mask(boxes: list[Tensor], image_size: tuple[int, int], feature_size: tuple[int, int]) -> Tensor:
    """``boxes``: per image ``[M_i, 4]`` (x1, y1, x2, y2) in the pixels of an ``image_size = (H, W)`` batch ->
    ``[B, 1, h, w]`` float mask for a ``feature_size = (h, w)`` map covering that batch: 1 on every cell a box
    overlaps (at least the one under each box), else 0."""
    (height, width), (h, w) = image_size, feature_size
    sy, sx = height / h, width / w
    mask = torch.zeros(len(boxes), 1, h, w)
    for i, image_boxes in enumerate(boxes):
        for x1, y1, x2, y2 in image_boxes.tolist():
            c0, r0 = min(max(math.floor(x1 / sx), 0), w - 1), min(max(math.floor(y1 / sy), 0), h - 1)
            c1, r1 = max(min(math.ceil(x2 / sx), w), c0 + 1), max(min(math.ceil(y2 / sy), h), r0 + 1)
            mask[i, 0, r0:r1, c0:c1] = 1.0
    return mask


class GroundTruthBoxes:
    """Keeps the boxes a torchvision detector's ``transform`` hands to its heads in training (resized with the
    images) and the padded batch's size, for :func:`box_mask`."""

    def __init__(self, model: nn.Module):
        transform = getattr(model, "transform", None)
        if not isinstance(transform, nn.Module):
            raise ConfigError(f"hint with imitate: objects needs a torchvision detector (its transform resizes the "
                              f"boxes); the student is a {type(model).__name__}: use imitate: all")
        self.value: tuple[tuple[int, int], list[Tensor]] | None = None
        self._handle = transform.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args: Any, out: Any) -> None:
        images, targets = out
        if module.training and targets is not None:
            self.value = (tuple(images.tensors.shape[-2:]), [t["boxes"].detach() for t in targets])

    def mask(self, feature_size: tuple[int, int], device: torch.device) -> Tensor:
        """``[B, 1, h, w]`` mask of this step's boxes on an ``(h, w)`` map."""
        if self.value is None:
            raise RuntimeError("hint: the student's transform did not run with targets this step")
        image_size, boxes = self.value
        return box_mask(boxes, image_size, feature_size).to(device)

    def clear(self) -> None:
        self.value = None

    def remove(self) -> None:
        self._handle.remove()
        self.value = None
