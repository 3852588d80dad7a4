"""Small box helpers shared by the detection aggregators (:mod:`ddkit.ops.ensemble`).

Boxes are ``[..., 4]`` ``(x1, y1, x2, y2)`` in any coordinate system. Pairwise IoU matrices come from
:func:`torchvision.ops.box_iou`; the element-wise variant here uses the very same arithmetic (same operations in the
same order), which is what the aggregators rely on to reproduce ``ensemble_boxes`` bit for bit.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_area as _tv_box_area
from torchvision.ops import box_iou as _tv_box_iou

__all__ = ["box_area", "box_iou", "elementwise_box_iou", "order_box_corners"]


def box_area(boxes: Tensor) -> Tensor:
    """Area ``(x2 - x1) * (y2 - y1)`` of every box.

    Args:
        boxes (Tensor[..., 4]): boxes in ``(x1, y1, x2, y2)`` format.

    Returns:
        Tensor[...]: the areas (negative for reversed boxes, see :func:`order_box_corners`).
    """
    if boxes.dim() == 2:
        return _tv_box_area(boxes)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of every box of ``boxes1`` with every box of ``boxes2`` (:func:`torchvision.ops.box_iou`).

    Args:
        boxes1 (Tensor[N, 4]): boxes in ``(x1, y1, x2, y2)`` format.
        boxes2 (Tensor[M, 4]): boxes in ``(x1, y1, x2, y2)`` format.

    Returns:
        Tensor[N, M]: ``iou[i, j] = inter / (area1[i] + area2[j] - inter)``.
    """
    return _tv_box_iou(boxes1, boxes2)


def elementwise_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of broadcast pairs of boxes: ``inter / (area1 + area2 - inter)``.

    The intersection is ``max(min(x2) - max(x1), 0) * max(min(y2) - max(y1), 0)``; the result is ``NaN`` only for
    two zero-area boxes.

    Args:
        boxes1 (Tensor[..., 4]): boxes in ``(x1, y1, x2, y2)`` format.
        boxes2 (Tensor[..., 4]): boxes broadcastable against ``boxes1``.

    Returns:
        Tensor[...]: the broadcast shape without the last dimension.
    """
    xa = torch.maximum(boxes1[..., 0], boxes2[..., 0])
    ya = torch.maximum(boxes1[..., 1], boxes2[..., 1])
    xb = torch.minimum(boxes1[..., 2], boxes2[..., 2])
    yb = torch.minimum(boxes1[..., 3], boxes2[..., 3])
    inter = (xb - xa).clamp(min=0) * (yb - ya).clamp(min=0)
    return inter / (box_area(boxes1) + box_area(boxes2) - inter)


def order_box_corners(boxes: Tensor) -> Tensor:
    """Swap reversed corners so that ``x1 <= x2`` and ``y1 <= y2`` (a new tensor; the input is not modified).

    Args:
        boxes (Tensor[..., 4]): boxes in ``(x1, y1, x2, y2)`` format, possibly with ``x2 < x1`` or ``y2 < y1``.

    Returns:
        Tensor[..., 4]: ``(min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))``.
    """
    lo = torch.minimum(boxes[..., 0:2], boxes[..., 2:4])
    hi = torch.maximum(boxes[..., 0:2], boxes[..., 2:4])
    return torch.cat([lo, hi], dim=-1)
