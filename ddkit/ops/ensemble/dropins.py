"""Drop-ins for ``ensemble_boxes`` 1.0.9 (one image) and their ``*_batch`` twins (many images in one call)."""
from __future__ import annotations

from typing import Any, List, Sequence

import numpy as np

from ddkit.ops.ensemble.args import (Device, ImageInput, Result, Weights, _conf_type, _flag, _method, _real,
                                     _sigma, _unit, _weights)
from ddkit.ops.ensemble.batch import _collect, _split
from ddkit.ops.ensemble.suppress import _nms_run
from ddkit.ops.ensemble.nmw import _nmw
from ddkit.ops.ensemble.wbf import _wbf


def _wbf_batch(batch: Any, weights: Weights, iou_thr: Any, skip_box_thr: Any, conf_type: Any, allows_overflow: Any,
               device: Device, single: bool, fn: str) -> List[Result]:
    iou_thr = _unit("iou_thr", iou_thr)
    skip_box_thr = _real("skip_box_thr", skip_box_thr)
    conf_type = _conf_type(conf_type)
    allows_overflow = _flag("allows_overflow", allows_overflow)
    bt = _collect(batch, device, single)
    wn = _weights(weights, bt.n_models)
    boxes, scores, labels, _, img = _wbf(bt, wn, iou_thr, skip_box_thr, conf_type, allows_overflow, True, "numpy",
                                         fn)
    return [tuple(p) for p in _split(bt.xp, img, bt.n_images, [boxes, scores, labels])]


def weighted_boxes_fusion(boxes_list: Sequence[Any], scores_list: Sequence[Any], labels_list: Sequence[Any],
                          weights: Weights = None, iou_thr: float = 0.55, skip_box_thr: float = 0.0,
                          conf_type: str = "avg", allows_overflow: bool = False) -> Result:
    """Weighted boxes fusion (Solovyev et al., 2021) of several models' detections on one image.

    Drop-in for ``ensemble_boxes.weighted_boxes_fusion`` (1.0.9): same arguments, same results (see the module
    docstring for the deliberate differences: errors instead of ``exit()``, no NaN on zero-score clusters...).

    Boxes scoring below ``skip_box_thr`` are dropped, reversed corners swapped, coordinates clipped to ``[0, 1]``
    and zero-area boxes dropped (one summary warning per call). Per label, boxes are taken by decreasing
    ``score * weights[model]``; each joins the existing cluster whose fused box overlaps it most if that IoU is
    ``> iou_thr`` (else it starts a cluster), and the cluster's fused box becomes the score-weighted mean of its
    boxes. Fused scores follow ``conf_type`` (``'avg'``, ``'max'``, ``'box_and_model_avg'``,
    ``'absent_model_aware_avg'``) and ``allows_overflow`` exactly as in ``ensemble_boxes`` (so with unequal weights,
    ``allows_overflow=False`` does not guarantee scores <= 1).

    Args:
        boxes_list (list of array[N_m, 4]): per model, boxes ``(x1, y1, x2, y2)`` normalized to ``[0, 1]``.
        scores_list (list of array[N_m]): per model, the scores.
        labels_list (list of array[N_m]): per model, the labels (cast with ``int()``).
        weights (list of float, optional): one non-negative weight per model; ``None`` means all 1.
        iou_thr (float): IoU in ``[0, 1]`` above which a box joins a cluster.
        skip_box_thr (float): boxes with a score below it are ignored.
        conf_type (str): how fused scores are computed.
        allows_overflow (bool): with ``'avg'``, scale by the number of boxes instead of ``min(boxes, models)``.

    Returns:
        (ndarray[K, 4] float64, ndarray[K] float64, ndarray[K] float64): fused boxes, scores and labels by
        decreasing score.

    Raises:
        ValueError: naming the bad argument.
    """
    return _wbf_batch([(boxes_list, scores_list, labels_list)], weights, iou_thr, skip_box_thr, conf_type,
                      allows_overflow, None, True, "weighted_boxes_fusion")[0]


def weighted_boxes_fusion_batch(batch: Sequence[ImageInput], weights: Weights = None, iou_thr: float = 0.55,
                                skip_box_thr: float = 0.0, conf_type: str = "avg", allows_overflow: bool = False,
                                *, device: Device = None) -> List[Result]:
    """:func:`weighted_boxes_fusion` of many images at once.

    Args:
        batch (list of (boxes_list, scores_list, labels_list)): one tuple per image, as the arguments of
            :func:`weighted_boxes_fusion` (numpy arrays, lists, or CPU/CUDA tensors).
        weights, iou_thr, skip_box_thr, conf_type, allows_overflow: as in :func:`weighted_boxes_fusion`, shared by
            all images.
        device (str or torch.device, optional): where to compute; default: the device of the input tensors, else
            the CPU.

    Returns:
        list of (ndarray[K_i, 4], ndarray[K_i], ndarray[K_i]): per image, what :func:`weighted_boxes_fusion` returns.
    """
    return _wbf_batch(batch, weights, iou_thr, skip_box_thr, conf_type, allows_overflow, device, False,
                      "weighted_boxes_fusion_batch")


def _nmw_batch(batch: Any, weights: Weights, iou_thr: Any, skip_box_thr: Any, device: Device, single: bool,
               fn: str) -> List[Result]:
    iou_thr = _unit("iou_thr", iou_thr)
    skip_box_thr = _real("skip_box_thr", skip_box_thr)
    bt = _collect(batch, device, single)
    wn = _weights(weights, bt.n_models)
    boxes, scores, labels, _, img = _nmw(bt, wn, iou_thr, skip_box_thr, True, "numpy", fn)
    out = []
    for b, s, lab in _split(bt.xp, img, bt.n_images, [boxes, scores, labels]):
        out.append((b, s, lab) if len(s) else (np.zeros((0, 4)), np.zeros((0,)), np.zeros((0,))))
    return out


def non_maximum_weighted(boxes_list: Sequence[Any], scores_list: Sequence[Any], labels_list: Sequence[Any],
                         weights: Weights = None, iou_thr: float = 0.55, skip_box_thr: float = 0.0) -> Result:
    """Non-maximum weighted (Zhou et al., 2017) of several models' detections on one image.

    Drop-in for ``ensemble_boxes.non_maximum_weighted`` (1.0.9). Inputs are filtered and fixed as in
    :func:`weighted_boxes_fusion`, scores are multiplied by ``weights / max(weights)``. Per label, by decreasing
    score, a box whose IoU with an earlier cluster's *first* box is ``> iou_thr`` joins the cluster it overlaps most;
    otherwise it starts a cluster. A cluster becomes the average of its boxes weighted by ``score * IoU(box, first)``
    with the first box's score.

    Args:
        boxes_list (list of array[N_m, 4]): per model, boxes ``(x1, y1, x2, y2)`` normalized to ``[0, 1]``.
        scores_list (list of array[N_m]): per model, the scores.
        labels_list (list of array[N_m]): per model, the labels (cast with ``int()``).
        weights (list of float, optional): one non-negative weight per model; ``None`` means all 1.
        iou_thr (float): IoU in ``[0, 1]`` above which a box joins a cluster.
        skip_box_thr (float): boxes with a score below it are ignored.

    Returns:
        (ndarray[K, 4], ndarray[K], ndarray[K]): boxes, scores, labels by decreasing score; float32 as in
        ``ensemble_boxes`` (float64 zeros when empty).

    Raises:
        ValueError: naming the bad argument.
    """
    return _nmw_batch([(boxes_list, scores_list, labels_list)], weights, iou_thr, skip_box_thr, None, True,
                      "non_maximum_weighted")[0]


def non_maximum_weighted_batch(batch: Sequence[ImageInput], weights: Weights = None, iou_thr: float = 0.55,
                               skip_box_thr: float = 0.0, *, device: Device = None) -> List[Result]:
    """:func:`non_maximum_weighted` of many images at once.

    Args:
        batch (list of (boxes_list, scores_list, labels_list)): one tuple per image.
        weights, iou_thr, skip_box_thr: as in :func:`non_maximum_weighted`, shared by all images.
        device (str or torch.device, optional): where to compute; default: the inputs' device, else the CPU.

    Returns:
        list of (ndarray[K_i, 4], ndarray[K_i], ndarray[K_i]): per image, what :func:`non_maximum_weighted` returns.
    """
    return _nmw_batch(batch, weights, iou_thr, skip_box_thr, device, False, "non_maximum_weighted_batch")


def _nms_batch(batch: Any, method: Any, iou_thr: Any, sigma: Any, thresh: Any, weights: Weights, device: Device,
               single: bool, fn: str) -> List[Result]:
    method = _method(method)
    iou_thr = _unit("iou_thr", iou_thr)
    sigma = _sigma(sigma) if method == 2 else _real("sigma", sigma)
    thresh = _real("thresh", thresh)
    bt = _collect(batch, device, single)
    wn = _weights(weights, bt.n_models)
    boxes, scores, labels, _, img = _nms_run(bt, wn, method, iou_thr, sigma, thresh, True,
                                             "numba" if method == 3 else "stable", fn)
    out = []
    for b, s, lab in _split(bt.xp, img, bt.n_images, [boxes, scores, labels]):
        out.append((b, s, lab.astype(bt.labels_dtype, copy=False)))
    return out


def nms_method(boxes: Sequence[Any], scores: Sequence[Any], labels: Sequence[Any], method: int = 3,
               iou_thr: float = 0.5, sigma: float = 0.5, thresh: float = 0.001, weights: Weights = None) -> Result:
    """NMS (``method=3``) or soft-NMS (``1``: linear, ``2``: gaussian) of several models' detections on one image.

    Drop-in for ``ensemble_boxes.nms_method`` (1.0.9). With ``weights``, model ``m``'s scores become
    ``scores * weights[m] / sum(weights)`` (the caller's lists are not modified). Coordinates are clipped to
    ``[0, 1]``, reversed corners swapped and zero-area boxes dropped. Each label is processed on its own, labels in
    increasing order. NMS keeps, by decreasing score, the boxes whose IoU with every kept box is ``<= iou_thr``.
    Soft-NMS repeatedly selects the highest remaining score and multiplies the scores of the later boxes by
    ``1 - IoU`` where ``IoU > iou_thr`` (linear) or by ``exp(-IoU**2 / sigma)`` (gaussian); boxes whose final score
    is ``> thresh`` are kept, in selection order, **with their input (weighted) scores**, as ``ensemble_boxes`` does.

    Args:
        boxes (list of array[N_m, 4]): per model, boxes ``(x1, y1, x2, y2)`` normalized to ``[0, 1]``.
        scores (list of array[N_m]): per model, the scores.
        labels (list of array[N_m]): per model, the labels (compared by value).
        method (int): 1 linear soft-NMS, 2 gaussian soft-NMS, 3 NMS.
        iou_thr (float): IoU threshold in ``[0, 1]``.
        sigma (float): gaussian soft-NMS parameter (> 0).
        thresh (float): soft-NMS keeps boxes whose decayed score is above it (unused by NMS).
        weights (list of float, optional): one non-negative weight per model.

    Returns:
        (ndarray[K, 4], ndarray[K], ndarray[K]): boxes, scores and labels (input dtypes), by label then keep order.

    Raises:
        ValueError: naming the bad argument.
    """
    return _nms_batch([(boxes, scores, labels)], method, iou_thr, sigma, thresh, weights, None, True,
                      "nms_method")[0]


def nms(boxes: Sequence[Any], scores: Sequence[Any], labels: Sequence[Any], iou_thr: float = 0.5,
        weights: Weights = None) -> Result:
    """Class-wise NMS of several models' detections on one image; drop-in for ``ensemble_boxes.nms``.

    See :func:`nms_method` (``method=3``).
    """
    return _nms_batch([(boxes, scores, labels)], 3, iou_thr, 0.5, 0.001, weights, None, True, "nms")[0]


def soft_nms(boxes: Sequence[Any], scores: Sequence[Any], labels: Sequence[Any], method: int = 2,
             iou_thr: float = 0.5, sigma: float = 0.5, thresh: float = 0.001, weights: Weights = None) -> Result:
    """Class-wise soft-NMS of several models' detections on one image; drop-in for ``ensemble_boxes.soft_nms``.

    See :func:`nms_method` (default ``method=2``, gaussian). Like ``ensemble_boxes``, the returned scores are the
    input (weighted) scores of the kept boxes, not the decayed ones (use :func:`soft_nms_tensor` for those).
    """
    return _nms_batch([(boxes, scores, labels)], method, iou_thr, sigma, thresh, weights, None, True, "soft_nms")[0]


def nms_batch(batch: Sequence[ImageInput], iou_thr: float = 0.5, weights: Weights = None, *,
              device: Device = None) -> List[Result]:
    """:func:`nms` of many images at once.

    Args:
        batch (list of (boxes, scores, labels)): one tuple of per-model lists per image.
        iou_thr, weights: as in :func:`nms`, shared by all images.
        device (str or torch.device, optional): where to compute; default: the inputs' device, else the CPU.

    Returns:
        list of (ndarray[K_i, 4], ndarray[K_i], ndarray[K_i]): per image, what :func:`nms` returns.
    """
    return _nms_batch(batch, 3, iou_thr, 0.5, 0.001, weights, device, False, "nms_batch")


def soft_nms_batch(batch: Sequence[ImageInput], method: int = 2, iou_thr: float = 0.5, sigma: float = 0.5,
                   thresh: float = 0.001, weights: Weights = None, *, device: Device = None) -> List[Result]:
    """:func:`soft_nms` of many images at once.

    Args:
        batch (list of (boxes, scores, labels)): one tuple of per-model lists per image.
        method, iou_thr, sigma, thresh, weights: as in :func:`soft_nms`, shared by all images.
        device (str or torch.device, optional): where to compute; default: the inputs' device, else the CPU.

    Returns:
        list of (ndarray[K_i, 4], ndarray[K_i], ndarray[K_i]): per image, what :func:`soft_nms` returns.
    """
    return _nms_batch(batch, method, iou_thr, sigma, thresh, weights, device, False, "soft_nms_batch")
