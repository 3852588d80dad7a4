"""Distillation losses as pure tensor functions, in the style of torchvision.ops.

* :func:`dense_soft_targets`: Hinton et al.'s soft targets (2015) in the sigmoid form that one-stage detectors use,
  per anchor and class, as in Tang et al., *Learning Efficient Detector with Semi-supervised Adaptive
  Distillation*, 2019, without their adaptive weights. The ``dense_kd`` (torchvision RetinaNet / FCOS) and
  ``yolo_kd`` (Ultralytics YOLO) loss terms apply it to their detectors' class logits.
* :func:`localization_distillation`: Zheng et al.'s LD (*Localization Distillation for Dense Object Detection*,
  CVPR 2022): the KL between teacher and student distributions of each box edge (Generalized Focal Loss heads,
  as YOLOv8's DFL bins), at a high temperature, weighted per anchor.
* :func:`channel_kl`: Shu et al.'s channel-wise distillation (*Channel-wise Knowledge Distillation for Dense
  Prediction*, ICCV 2021, CWD): each channel of a feature map as a distribution over its positions.
* :func:`attention_transfer`: Zagoruyko and Komodakis's attention transfer (*Paying More Attention to Attention*,
  ICLR 2017, AT): where a feature map is active (the channel mean of its squares, normalised), whatever its channels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["attention_transfer", "channel_kl", "dense_soft_targets", "localization_distillation"]


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


def localization_distillation(student_logits: Tensor, teacher_logits: Tensor, weights: Tensor,
                              temperature: float = 10.0) -> Tensor:
    """``[N, A, 4, R], [N, A, 4, R], [N, A] -> scalar``: ``T^2 * sum_{n,a} w_na * mean_side KL(softmax(t/T) ||
    softmax(s/T))`` over the ``R`` bins of each box edge, divided by ``max(1, sum w)``. 0 when the student matches
    the teacher.

    Args:
        student_logits (Tensor[N, A, 4, R]): the student's edge-distribution logits (``R`` bins per side); the
            gradient flows into them.
        teacher_logits (Tensor[N, A, 4, R]): the teacher's at the same anchors (detached).
        weights (Tensor[N, A]): how much each anchor counts (e.g. the teacher's object confidence), ``>= 0``.
        temperature (float): ``T > 0``; LD's default is 10.

    Returns:
        Tensor[]: the loss, float32.
    """
    t = temperature
    log_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_t = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean(-1)  # [N, A]
    w = weights.detach().float()
    return (w * kl).sum() * t * t / w.sum().clamp(min=1.0)


def channel_kl(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """``[B, C, H, W], [B, C, H, W] -> scalar``: each channel as a softmax over its ``H * W`` positions at
    ``temperature``; ``T^2 * KL(teacher || student)`` summed over the positions, averaged over the ``B * C``
    channels (CWD). 0 when the maps differ only by a per-channel offset."""
    t = temperature
    s_log = F.log_softmax(student.float().flatten(2) / t, dim=-1)
    t_log = F.log_softmax(teacher.detach().float().flatten(2) / t, dim=-1)
    return (t_log.exp() * (t_log - s_log)).sum(-1).mean() * t * t


def attention_map(x: Tensor) -> Tensor:
    """``[B, C, H, W] -> [B, H * W]``: the mean over channels of the squared activations, L2-normalised per image
    (AT's ``F_sum^2``, p = 2)."""
    return F.normalize(x.float().square().mean(1).flatten(1), dim=1)


def attention_transfer(student: Tensor, teacher: Tensor) -> Tensor:
    """``[B, Cs, H, W], [B, Ct, H, W] -> scalar``: the squared L2 distance between the two normalised attention maps
    (:func:`attention_map`), summed over the positions and averaged over the images: in ``[0, 2]``, 0 when one map's
    attention is the other's. The channel counts may differ: no adapter is needed."""
    diff = attention_map(student) - attention_map(teacher.detach())
    return diff.square().sum(1).mean()
