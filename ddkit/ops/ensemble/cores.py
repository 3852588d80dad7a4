"""Tensor cores: one image in any coordinate system (pixels; no clipping), results on the input's device."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ddkit.ops.ensemble.args import Weights, _conf_type, _flag, _method, _real, _sigma, _unit, _weights
from ddkit.ops.ensemble.backends import Array
from ddkit.ops.ensemble.batch import _Batch, _tensor_batch
from ddkit.ops.ensemble.greedy import _areas, _order_corners
from ddkit.ops.ensemble.suppress import _hard_nms, _soft_nms_groups
from ddkit.ops.ensemble.nmw import _nmw
from ddkit.ops.ensemble.sort import _group_order, _segments, _stable_key_order
from ddkit.ops.ensemble.spatial import split_groups
from ddkit.ops.ensemble.wbf import _wbf


def _out_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.is_floating_point() else torch.float64


def wbf_tensor(boxes: Tensor, scores: Tensor, labels: Tensor, model_idx: Tensor, n_models: int,
               weights: Weights = None, iou_thr: float = 0.55, skip_box_thr: float = 0.0, conf_type: str = "avg",
               allows_overflow: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """Weighted boxes fusion of one image's detections from ``n_models`` models, in any coordinate system.

    The algorithm of :func:`weighted_boxes_fusion` without the ``[0, 1]`` clipping: boxes scoring below
    ``skip_box_thr`` and zero-area boxes are ignored, reversed corners are swapped, ties in scores are broken by
    input order. Runs on the tensors' device; for several images at once give each ``(image, label)`` its own
    label.

    Args:
        boxes (Tensor[N, 4]): ``(x1, y1, x2, y2)`` boxes (e.g. pixels).
        scores (Tensor[N]): scores.
        labels (Tensor[N]): integer labels (floats are truncated).
        model_idx (Tensor[N]): index in ``[0, n_models)`` of the model that produced each box.
        n_models (int): number of models (a model may have no box).
        weights (sequence of float, optional): ``n_models`` non-negative model weights; ``None`` means all 1.
        iou_thr (float): IoU in ``[0, 1]`` above which a box joins a cluster.
        skip_box_thr (float): boxes with a lower score are ignored.
        conf_type (str): ``'avg'``, ``'max'``, ``'box_and_model_avg'`` or ``'absent_model_aware_avg'``.
        allows_overflow (bool): see :func:`weighted_boxes_fusion`.

    Returns:
        (Tensor[K, 4], Tensor[K], Tensor[K]): fused boxes (dtype of ``boxes``), scores (dtype of ``scores``) and
        labels (dtype of ``labels``), by decreasing score.
    """
    iou_thr = _unit("iou_thr", iou_thr)
    skip_box_thr = _real("skip_box_thr", skip_box_thr)
    conf_type = _conf_type(conf_type)
    allows_overflow = _flag("allows_overflow", allows_overflow)
    if isinstance(n_models, (bool, np.bool_)) or not isinstance(n_models, (int, np.integer)) or n_models < 0:
        raise ValueError(f"n_models must be a non-negative int, got {n_models!r}")
    bt = _tensor_batch(boxes, scores, labels, model_idx, int(n_models))
    wn = _weights(weights, bt.n_models)
    b, s, _, lab, _ = _wbf(bt, wn, iou_thr, skip_box_thr, conf_type, allows_overflow, False, "stable", None)
    xp, dev = bt.xp, bt.device
    return (xp.tensor(b, dev).to(_out_dtype(boxes)), xp.tensor(s, dev).to(_out_dtype(scores)),
            xp.tensor(lab, dev).to(labels.dtype))


def nmw_tensor(boxes: Tensor, scores: Tensor, labels: Tensor, model_idx: Optional[Tensor] = None,
               n_models: Optional[int] = None, weights: Weights = None, iou_thr: float = 0.55,
               skip_box_thr: float = 0.0) -> Tuple[Tensor, Tensor, Tensor]:
    """Non-maximum weighted of one image's detections, in any coordinate system.

    The algorithm of :func:`non_maximum_weighted` without the ``[0, 1]`` clipping (scores scaled by
    ``weights / max(weights)``; ties broken by input order).

    Args:
        boxes (Tensor[N, 4]): ``(x1, y1, x2, y2)`` boxes.
        scores (Tensor[N]): scores.
        labels (Tensor[N]): integer labels (floats are truncated).
        model_idx (Tensor[N], optional): model of each box (default: all from one model).
        n_models (int, optional): number of models (default: ``model_idx.max() + 1``).
        weights (sequence of float, optional): non-negative model weights.
        iou_thr (float): IoU in ``[0, 1]`` above which a box joins a cluster.
        skip_box_thr (float): boxes with a lower score are ignored.

    Returns:
        (Tensor[K, 4], Tensor[K], Tensor[K]): boxes, scores, labels by decreasing score (dtypes of the inputs;
        boxes and scores computed in float32 precision like ``ensemble_boxes``).
    """
    iou_thr = _unit("iou_thr", iou_thr)
    skip_box_thr = _real("skip_box_thr", skip_box_thr)
    bt = _tensor_batch(boxes, scores, labels, model_idx, n_models)
    wn = _weights(weights, bt.n_models)
    b, s, _, lab, _ = _nmw(bt, wn, iou_thr, skip_box_thr, False, "stable", None)
    xp, dev = bt.xp, bt.device
    return (xp.tensor(b, dev).to(_out_dtype(boxes)), xp.tensor(s, dev).to(_out_dtype(scores)),
            xp.tensor(lab, dev).to(labels.dtype))


def _core_inputs(bt: _Batch) -> Tuple[Array, Array, Array]:
    """Corner-ordered float64 boxes, the positions of the non-degenerate ones and a group key per box."""
    xp = bt.xp
    b = _order_corners(xp, xp.cast(bt.boxes, xp.f64))
    lab = bt.labels
    key = xp.unique_inverse(lab) if xp.is_float(lab) else xp.cast(lab, xp.i64)
    return b, xp.nonzero(_areas(b) > 0), key


def nms_tensor(boxes: Tensor, scores: Tensor, labels: Tensor, iou_thr: float = 0.5) -> Tensor:
    """Class-wise greedy NMS (like :func:`torchvision.ops.batched_nms` with ``idxs=labels``).

    By decreasing score (ties: lower index first), a box is kept unless a kept box of the same label overlaps it
    with ``IoU > iou_thr``. Reversed corners are swapped; zero-area boxes are never kept. All labels (and, with
    labels offset per image, all images) are processed at once.

    Args:
        boxes (Tensor[N, 4]): ``(x1, y1, x2, y2)`` boxes.
        scores (Tensor[N]): scores.
        labels (Tensor[N]): labels (or any group ids, e.g. ``image * num_classes + label``).
        iou_thr (float): IoU threshold in ``[0, 1]``.

    Returns:
        Tensor[K] int64: indices of the kept boxes by decreasing score (on the device of ``boxes``).
    """
    iou_thr = _unit("iou_thr", iou_thr)
    bt = _tensor_batch(boxes, scores, labels)
    xp = bt.xp
    b, idx, key = _core_inputs(bt)
    order, keep = _hard_nms(xp, xp.take(b, idx), xp.take(bt.scores, idx), xp.take(key, idx), iou_thr, "stable")
    kept = xp.take(idx, xp.take(order, xp.nonzero(keep)))
    kept = xp.take(kept, xp.argsort(kept))
    kept = xp.take(kept, _group_order(xp, xp.zeros(kept.shape[0], xp.i64), xp.take(bt.scores, kept), "stable"))
    return xp.tensor(kept, bt.device)


def soft_nms_tensor(boxes: Tensor, scores: Tensor, labels: Tensor, method: int = 2, iou_thr: float = 0.5,
                    sigma: float = 0.5, thresh: float = 0.001) -> Tuple[Tensor, Tensor]:
    """Class-wise soft-NMS (Bodla et al., 2017) as ``ensemble_boxes`` runs it, in any coordinate system.

    Per label, in input order, repeatedly select the highest remaining score and decay the scores of the later
    boxes: ``* (1 - IoU)`` where ``IoU > iou_thr`` (``method=1``), ``* exp(-IoU**2 / sigma)`` (``method=2``).
    Boxes whose final score is ``> thresh`` are kept. ``method=3`` is plain greedy NMS (:func:`nms_tensor`;
    ``thresh`` unused). Reversed corners are swapped; zero-area boxes are never kept.

    Args:
        boxes (Tensor[N, 4]): ``(x1, y1, x2, y2)`` boxes.
        scores (Tensor[N]): scores.
        labels (Tensor[N]): labels (or any group ids).
        method (int): 1 linear, 2 gaussian, 3 hard NMS.
        iou_thr (float): IoU threshold in ``[0, 1]``.
        sigma (float): gaussian parameter (> 0).
        thresh (float): minimum decayed score.

    Returns:
        (Tensor[K] int64, Tensor[K]): indices of the kept boxes and their decayed scores, by decreasing decayed
        score (ties: by label, then selection order).
    """
    method = _method(method)
    iou_thr = _unit("iou_thr", iou_thr)
    sigma = _sigma(sigma) if method == 2 else _real("sigma", sigma)
    thresh = _real("thresh", thresh)
    if method == 3:
        keep = nms_tensor(boxes, scores, labels, iou_thr)
        return keep, scores[keep]
    bt = _tensor_batch(boxes, scores, labels)
    xp = bt.xp
    b, idx, key = _core_inputs(bt)
    order, final = _soft_nms_groups(xp, xp.take(b, idx), xp.take(bt.scores, idx), xp.take(key, idx), method,
                                    iou_thr, sigma, thresh)
    m = xp.nonzero(final > thresh)
    sel, dec = xp.take(idx, xp.take(order, m)), xp.take(final, m)
    o = _group_order(xp, xp.zeros(sel.shape[0], xp.i64), dec, "stable")
    return xp.tensor(xp.take(sel, o), bt.device), xp.tensor(xp.take(dec, o), bt.device).to(_out_dtype(scores))


def box_voting_tensor(boxes: Tensor, scores: Tensor, labels: Tensor, nms_thr: float = 0.5,
                      vote_thr: float = 0.8) -> Tuple[Tensor, Tensor, Tensor]:
    """Box voting (Gidaris & Komodakis, 2015; Detectron's ``box_voting`` with the ``'ID'`` scoring).

    Class-wise NMS (:func:`nms_tensor` with ``nms_thr``), then every kept box is replaced by the score-weighted mean
    of all boxes of its label (suppressed ones included, itself included) whose IoU with it is ``>= vote_thr``; it
    keeps its NMS score. Reversed corners are swapped; zero-area boxes are ignored. If the voters' scores sum to 0
    the kept box is left as is.

    Args:
        boxes (Tensor[N, 4]): ``(x1, y1, x2, y2)`` boxes.
        scores (Tensor[N]): scores (the voting weights).
        labels (Tensor[N]): labels (or any group ids).
        nms_thr (float): NMS IoU threshold in ``[0, 1]``.
        vote_thr (float): voting IoU threshold in ``[0, 1]``.

    Returns:
        (Tensor[K, 4], Tensor[K], Tensor[K]): voted boxes (corners ordered), scores and labels of the kept boxes by
        decreasing score.
    """
    nms_thr = _unit("nms_thr", nms_thr)
    vote_thr = _unit("vote_thr", vote_thr)
    keep_t = nms_tensor(boxes, scores, labels, nms_thr)
    bt = _tensor_batch(boxes, scores, labels)
    xp = bt.xp
    b, idx, key = _core_inputs(bt)
    keep = xp.asarray(keep_t)
    s = xp.cast(bt.scores, xp.f64)
    # every kept box against every non-degenerate box of its label (of its part when voters must overlap it)
    order = xp.take(idx, _stable_key_order(xp, xp.take(key, idx)))
    seg = _segments(xp, xp.take(key, order))
    split = split_groups(xp, xp.take(b, order), seg) if vote_thr > 0 else None
    if split is not None:
        order, seg = xp.take(order, split[0]), split[1]
    where = xp.full(bt.boxes.shape[0], -1, xp.i64)
    where[order] = xp.arange(order.shape[0])
    g = xp.take(seg.gidx, xp.take(where, keep))
    sizes = xp.take(seg.sizes, g)
    k = keep.shape[0]
    total = int(sizes.sum()) if k else 0
    voted = xp.take(b, keep)
    if total:
        rep = xp.repeat(xp.arange(k), sizes, total)
        off = xp.cumsum(sizes) - sizes
        member = xp.take(order, xp.take(xp.take(seg.starts, g), rep) + xp.arange(total) - xp.take(off, rep))
        top, oth = xp.take(voted, rep), xp.take(b, member)
        xa = xp.maximum(top[:, 0], oth[:, 0])
        ya = xp.maximum(top[:, 1], oth[:, 1])
        xb = xp.minimum(top[:, 2], oth[:, 2])
        yb = xp.minimum(top[:, 3], oth[:, 3])
        inter = xp.clip0(xb - xa) * xp.clip0(yb - ya)
        iou = inter / (_areas(top) + _areas(oth) - inter)
        m = xp.nonzero(iou >= vote_thr)
        rm, w = xp.take(rep, m), xp.take(s, xp.take(member, m))
        num = xp.stack([xp.bincount(rm, w * xp.take(oth[:, c], m), k) for c in range(4)], 1)
        den = xp.bincount(rm, w, k)
        voted = xp.where((den != 0)[:, None], num / xp.where(den == 0, 1.0, den)[:, None], voted)
    dev = bt.device
    return xp.tensor(voted, dev).to(_out_dtype(boxes)), scores[keep_t], labels[keep_t]
