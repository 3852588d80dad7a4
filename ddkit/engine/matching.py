"""Greedy matching of predicted boxes to ground truth (precision / recall of pseudo-labels)."""
from __future__ import annotations

import torch
from torch import Tensor


def greedy_match(boxes: Tensor, scores: Tensor, labels: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
                 iou_thr: float = 0.5) -> Tensor:
    """True-positive mask ``[N]`` of predictions ``boxes [N, 4]`` xyxy, ``scores [N]``, ``labels [N]`` against
    ``gt_boxes [M, 4]``, ``gt_labels [M]``: in descending score order (stable), each prediction takes the unmatched
    ground-truth box of its class with the highest IoU, if that IoU is >= ``iou_thr``."""
    from torchvision.ops import box_iou

    tp = torch.zeros(len(scores), dtype=torch.bool)
    if len(scores) == 0 or len(gt_labels) == 0:
        return tp
    iou = box_iou(boxes.double(), gt_boxes.double())
    iou[labels[:, None] != gt_labels[None, :]] = -1.0
    taken = torch.zeros(len(gt_labels), dtype=torch.bool)
    for i in torch.argsort(scores, descending=True, stable=True).tolist():
        row = iou[i].masked_fill(taken, -1.0)
        j = int(torch.argmax(row))
        if float(row[j]) >= iou_thr:
            taken[j] = True
            tp[i] = True
    return tp
