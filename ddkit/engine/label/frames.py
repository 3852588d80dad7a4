"""The size a teacher runs each view at.

A view that keeps the image's size (identity, hflip, translate, photometric) runs as a plain prediction does: the
model resizes it to its own input size (YOLO's ``imgsz``, an R-CNN's ``min_size`` / ``max_size``), so a TTA of
``[identity]`` is the plain model. A ``scale`` view of ``factors`` runs at that share of the model's own input size,
as Ultralytics' test-time scales are shares of ``imgsz``: the task says what that size is (``task.input_size(model,
(H, W))``, asked of the task) and the view's image is resized to it here. A view that sets a pixel size
(``sets_pixel_size``: the paper's shorter sides of 400..1200 pixels), or a factor view of a task that cannot say,
runs at the view image's own size. Before session 20 every view ran at its image's own size, so a YOLO teacher of
``imgsz`` 128 labelled 640-pixel photos at 640 pixels (AP 0 where its plain prediction had 79).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ddkit.ops.geometry import scale_boxes, scale_keypoints
from ddkit.types import Instances

__all__ = ["ViewFrames", "model_frames", "to_view_frame"]


@dataclass
class ViewFrames:
    """One view's images as one teacher gets them: ``native`` (run at their own size) and, per image, the
    ``(sx, sy)`` from the view's frame to the resized one (``None``: not resized here)."""

    images: list[Tensor]
    native: bool
    ratios: list[tuple[float, float] | None]


def model_frames(task: Any, model: nn.Module, view: Any, view_images: Sequence[Tensor],
                 sizes: Sequence[tuple[int, int]]) -> ViewFrames:
    """``view_images`` (the view of images of original ``sizes`` ``(H, W)``) at the size ``model`` runs them."""
    input_size = getattr(task, "input_size", None)
    n = len(view_images)
    keeps_size = all(tuple(x.shape[-2:]) == tuple(s) for x, s in zip(view_images, sizes))
    if keeps_size:
        return ViewFrames(list(view_images), native=False, ratios=[None] * n)
    if input_size is None or getattr(view, "sets_pixel_size", False):
        return ViewFrames(list(view_images), native=True, ratios=[None] * n)
    images, ratios = [], []
    for x, (h0, w0) in zip(view_images, sizes):
        th0, tw0 = input_size(model, (h0, w0))  # the model's own size for the untransformed image
        h, w = x.shape[-2:]
        th, tw = max(1, round(h * th0 / h0)), max(1, round(w * tw0 / w0))
        if (th, tw) == (h, w):
            images.append(x)
            ratios.append(None)
            continue
        # bilinear without antialiasing: the resize of torchvision's detection transform and of YOLO's letterbox
        images.append(F.interpolate(x[None].float(), size=(th, tw), mode="bilinear", align_corners=False)[0]
                      .clamp(0, 1).to(x.dtype))
        ratios.append((tw / w, th / h))
    return ViewFrames(images, native=True, ratios=ratios)


def to_view_frame(inst: Instances, ratio: tuple[float, float] | None, view_size: tuple[int, int]) -> Instances:
    """Predictions in a resized frame (``ratio = (sx, sy)`` from the view's frame) back in the view's frame."""
    if ratio is None:
        return inst
    sx, sy = ratio
    kps = None if inst.keypoints is None else scale_keypoints(inst.keypoints, 1 / sx, 1 / sy)
    return Instances(scale_boxes(inst.boxes, 1 / sx, 1 / sy), inst.scores, inst.labels, kps, view_size)
