"""Inputs, grouping and output order shared by the fusions (WBF and NMW)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from ddkit.ops.ensemble.backends import Array, Backend
from ddkit.ops.ensemble.batch import _Batch, _warn
from ddkit.ops.ensemble.greedy import _areas, _order_corners
from ddkit.ops.ensemble.sort import _group_order, _pair_key, _segments, _Segments, _stable_key_order


@dataclass
class _Fusion:
    coords: Array   # [n, 4] float64, corners ordered (and clipped for the drop-ins)
    b1: Array       # [n] float64 weighted score
    wv: Array       # [n] float64 model weight
    model: Array    # [n]
    lab: Array      # [n] int64
    img: Array      # [n]
    scan: Array     # [n] position in the input (scan order)


def _fusion_inputs(bt: _Batch, wn: Optional[np.ndarray], thr: float, clip: bool, fn: Optional[str]) -> _Fusion:
    """``prefilter_boxes`` of ensemble_boxes, vectorized: drop scores < thr, swap reversed corners, clip to [0, 1]
    (drop-ins), drop zero-area boxes, weight the scores (``float(score) * weights[t]``, in numpy's dtypes)."""
    xp = bt.xp
    sc = bt.scores
    keep = ~(sc < thr)
    c = xp.cast(bt.boxes, xp.f64)
    oc = _order_corners(xp, c)
    out = None
    if clip:
        out = (oc < 0) | (oc > 1)
        if bool(out.any()):
            oc = xp.clip(oc, 0, 1)
    zero = _areas(oc) == 0
    if fn is not None and c.shape[0]:
        swapped = int((keep & ((c[:, 2] < c[:, 0]) | (c[:, 3] < c[:, 1]))).sum())
        clipped = int((keep[:, None] & out).sum()) if out is not None else 0
        _warn(fn, swapped, clipped, int((keep & zero).sum()))
    idx = xp.nonzero(keep & ~zero)
    lab = xp.take(bt.labels, idx)
    if xp.is_float(lab):
        lab = xp.trunc(lab)
    lab = xp.cast(lab, xp.i64)
    model = xp.take(bt.model, idx)
    s = xp.cast(xp.take(sc, idx), xp.f64)
    if wn is None:
        b1, wv = s, xp.full(s.shape[0], 1.0, xp.f64)
    else:
        wv = xp.take(xp.asarray(wn.astype(np.float64)), model)
        cdt = xp.dtype_of(np.result_type(1.0, wn.dtype))
        b1 = xp.cast(xp.cast(s, cdt) * xp.cast(wv, cdt), xp.f64)
    return _Fusion(xp.take(oc, idx), b1, wv, model, lab, xp.take(bt.img, idx), idx)


def _fusion_groups(xp: Backend, fu: _Fusion, n_images: int, tie: str) -> Tuple[_Fusion, _Segments, Array]:
    """Sort by (image, label) then weighted score descending (ties as ``tie``); returns the sorted inputs, their
    groups, and per group the scan position of its first box (the label's position in ensemble_boxes' dict)."""
    key = _pair_key(xp, fu.img, fu.lab, n_images)
    tv = xp.numpy(fu.b1) if tie in ("numpy", "numba") else None
    order = _group_order(xp, key, fu.b1, tie, tv)
    s = _Fusion(*(xp.take(getattr(fu, f), order) for f in ("coords", "b1", "wv", "model", "lab", "img", "scan")))
    seg = _segments(xp, xp.take(key, order))
    first = xp.segment_min(s.scan, seg.starts)
    return s, seg, first


def _final_order(xp: Backend, img: Array, score: Array, concat: Array, tie: str, np_dtype: type) -> Array:
    """Order clusters by image, then score descending; ties as ``np.argsort(scores)[::-1]`` on the image's
    clusters in ``concat`` order (``tie="numpy"``) or by ``concat`` order (``"stable"``)."""
    order = _group_order(xp, img, score, "any")
    if order.shape[0] > 1:
        si, ss = xp.take(img, order), xp.take(score, order)
        if not bool(((ss[1:] == ss[:-1]) & (si[1:] == si[:-1])).any()):
            return order
    pre = _stable_key_order(xp, concat)
    sc = xp.take(score, pre)
    tv = xp.numpy(sc).astype(np_dtype) if tie == "numpy" else None
    return xp.take(pre, _group_order(xp, xp.take(img, pre), sc, tie, tv))
