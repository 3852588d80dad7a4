"""Distillation losses as pure tensor functions, in the style of torchvision.ops.

* :func:`dense_soft_targets`: Hinton et al.'s soft targets (2015) in the sigmoid form that one-stage detectors use,
  per anchor and class, as in Tang et al., *Learning Efficient Detector with Semi-supervised Adaptive
  Distillation*, 2019, without their adaptive weights. The ``dense_kd`` (torchvision RetinaNet / FCOS) and
  ``yolo_kd`` (Ultralytics YOLO) loss terms apply it to their detectors' class logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["dense_soft_targets"]


def dense_soft_targets(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``[N, A, K], [N, A, K] -> scalar``: ``T^2 * sum_{n,a,k} KL(Bern(sigmoid(t/T)) || Bern(sigmoid(s/T)))`` divided
    by ``max(1, sum_{n,a} max_k sigmoid(t))`` (the teacher's expected number of object anchors). 0 when the student
    matches the teacher.

    Args:
        student_logits (Tensor[N, A, K]): the student's class logits (before the sigmoid) of ``N`` images, ``A``
            anchors or locations and ``K`` classes; the gradient flows into them.
        teacher_logits (Tensor[N, A, K]): the teacher's at the same anchors (detached).
        temperature (float): ``T > 0``; both logits are divided by it.

    Returns:
        Tensor[]: the loss, float32.
    """
    t = temperature
    s, z = student_logits.float() / t, teacher_logits.detach().float() / t
    pt = torch.sigmoid(z)
    # KL(p_t || p_s) = BCE(s, p_t) - BCE(z, p_t), both with logits (stable)
    kl = F.binary_cross_entropy_with_logits(s, pt, reduction="none") \
        - F.binary_cross_entropy_with_logits(z, pt, reduction="none")
    objects = torch.sigmoid(teacher_logits.detach().float()).amax(-1).sum().clamp(min=1.0)
    return kl.sum() * t * t / objects
