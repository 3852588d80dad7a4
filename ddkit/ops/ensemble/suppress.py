"""NMS and soft-NMS of a whole batch (``nms_method`` of ensemble_boxes, every (image, label) group at once)."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from ddkit.ops.ensemble import compiled
from ddkit.ops.ensemble.backends import Array, Backend
from ddkit.ops.ensemble.batch import _Batch, _warn
from ddkit.ops.ensemble.greedy import _areas, _greedy_pairs, _greedy_rounds, _order_corners
from ddkit.ops.ensemble.sort import _active, _chunk_layout, _chunks, _group_order, _pair_key, _segments, \
    _Segments, _stable_key_order
from ddkit.ops.ensemble.spatial import split_groups, unpermute

_SMALL_PAIRS = 1 << 16    # NMS of at most this many same-group pairs: all pairs at once (fewer numpy calls)
_SOFT_COMPILED_MIN = 0    # soft-NMS whose groups all have at most this many boxes runs the vectorized loop
                          # (0: never where numba runs; its kernels are as fast on small groups, 6x on one image)


def _nms_prepare(bt: _Batch, weights: Optional[np.ndarray], fn: Optional[str], clip: bool
                 ) -> Tuple[Array, Array, Array, Array, Array]:
    """``nms_method``'s weighting and ``prepare_boxes``: returns the kept input positions, boxes (clipped, corners
    ordered), weighted scores, a group key (image, label) and the image of each box."""
    xp = bt.xp
    boxes = bt.boxes
    if xp.np_dtype(boxes) != np.float32:
        boxes = xp.cast(boxes, xp.f64)
    sc = bt.scores
    if weights is not None:
        rdt = xp.dtype_of(np.result_type(xp.np_dtype(sc), weights.dtype))
        wt = xp.cast(xp.asarray(weights.astype(np.float64)), rdt)
        wsum = xp.cast(xp.asarray(np.asarray(weights.sum()).reshape(1)), rdt)
        sc = (xp.cast(sc, rdt) * xp.take(wt, bt.model)) / wsum
    n_clip = 0
    if clip and boxes.shape[0]:
        n_clip = int(((boxes < 0) | (boxes > 1)).sum())
        if n_clip:
            boxes = xp.clip(boxes, 0, 1)
    swapped = int(((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).sum()) if boxes.shape[0] else 0
    boxes = _order_corners(xp, boxes)
    ok = _areas(boxes) > 0
    if fn is not None:
        _warn(fn, swapped, n_clip, int((~ok).sum()))
    idx = xp.nonzero(ok)
    lab = xp.take(bt.labels, idx)
    img = xp.take(bt.img, idx)
    if xp.is_float(lab) and lab.shape[0]:
        if bool((lab == xp.trunc(lab)).all()) and float(abs(lab).max()) < 2 ** 53:
            lab = xp.cast(lab, xp.i64)
        else:
            lab = xp.unique_inverse(lab)
    key = _pair_key(xp, img, xp.cast(lab, xp.i64), bt.n_images)
    return idx, xp.take(boxes, idx), xp.take(sc, idx), key, img


def _hard_nms(xp: Backend, boxes: Array, scores: Array, key: Array, iou_thr: float, tie: str) -> Tuple[Array, Array]:
    """Greedy NMS per key group, boxes in decreasing score. Returns the sorted order and the keep mask over it."""
    tv = xp.numpy(scores) if tie in ("numpy", "numba") else None
    order = _group_order(xp, key, scores, tie, tv)
    seg = _segments(xp, xp.take(key, order))
    c = xp.cast(xp.take(boxes, order), xp.f64)
    if compiled.available(xp):
        return order, compiled.greedy(c, _areas(c), seg, iou_thr)[0]
    split = split_groups(xp, c, seg)      # independent parts of the groups: same results
    if split is not None:
        perm, seg = split
        c = xp.take(c, perm)
    if int(seg.rank.sum() if order.shape[0] else 0) <= _SMALL_PAIRS:
        keep = _greedy_pairs(xp, c, _areas(c), seg, iou_thr)
    else:
        keep = _greedy_rounds(xp, c, _areas(c), seg, iou_thr, track=False)[0]
    return order, (keep if split is None else unpermute(xp, perm, keep))


def _soft_nms_groups(xp: Backend, boxes: Array, scores: Array, key: Array, method: int, iou_thr: float,
                     sigma: float, thresh: float = float("-inf")) -> Tuple[Array, Array]:
    """``cpu_soft_nms_float`` of ensemble_boxes for every key group at once (one loop step per rank).

    Boxes of a group are taken in input order; step ``i`` swaps in the highest remaining score (first one on ties,
    none if the current one is not lower) and decays the later ones. Returns the input positions in selection order
    (grouped by key) and their final scores; the order of the boxes whose final score is ``<= thresh`` is arbitrary.

    The groups run as independent parts (:mod:`.spatial`: a decay by a box that does not overlap is a product by
    exactly 1). Without ties the selection order of a group is then its order by decreasing final score. Where two
    boxes of a part tie for the highest remaining score, or two boxes of a group end with the same final score,
    above ``thresh``, the array positions decide: those groups run whole."""
    n = scores.shape[0]
    order = _stable_key_order(xp, key)
    seg = _segments(xp, xp.take(key, order))
    c = xp.cast(xp.take(boxes, order), xp.f64)
    sc = xp.take(scores, order)
    split = None
    if not compiled.available(xp):
        split = split_groups(xp, c, seg)
    elif n and int(seg.sizes.max()) > _SOFT_COMPILED_MIN:
        gptr, pa, pb, ovr = compiled.overlap_pairs(c, seg)
        box_at, final = compiled.soft_nms(sc, seg, gptr, pa, pb, _decay(xp, ovr, method, iou_thr, sigma))
        return xp.take(order, box_at), xp.take(final, box_at)
    if split is None:
        sel, final, _ = _soft_nms_steps(xp, c, sc, seg, method, iou_thr, sigma, None)
        return _by_selection(xp, order, seg, sel, final)
    perm, parts = split
    _, final, tied = _soft_nms_steps(xp, xp.take(c, perm), xp.take(sc, perm), parts, method, iou_thr, sigma, thresh)
    final = unpermute(xp, perm, final)
    o = _group_order(xp, seg.gidx, final, "any")
    sel = unpermute(xp, o, seg.rank)                 # rank by decreasing final score in the group
    f, g = xp.take(final, o), xp.take(seg.gidx, o)
    bad = xp.zeros(seg.starts.shape[0], xp.bool_)
    bad[xp.take(g, xp.nonzero((f[1:] == f[:-1]) & (g[1:] == g[:-1]) & (f[1:] > thresh)))] = True
    bad[xp.take(seg.gidx, xp.take(perm, xp.take(parts.starts, xp.nonzero(tied))))] = True
    rows = xp.nonzero(xp.take(bad, seg.gidx))
    if rows.shape[0]:
        sub = _segments(xp, xp.take(seg.gidx, rows))
        s_sel, s_final, _ = _soft_nms_steps(xp, xp.take(c, rows), xp.take(sc, rows), sub, method, iou_thr, sigma,
                                            None)
        sel[rows] = s_sel
        final[rows] = s_final
    return _by_selection(xp, order, seg, sel, final)


def _decay(xp: Backend, ovr: Array, method: int, iou_thr: float, sigma: float) -> Array:
    """The decay factors of IoUs ``ovr``, as the loop computes them (numpy's ``exp``, as ensemble_boxes)."""
    if method == 1:
        return xp.where(ovr > iou_thr, 1.0 - ovr, 1.0)
    if method == 2:
        return xp.exp(-(ovr * ovr) / sigma)
    return xp.where(ovr > iou_thr, 0.0 * ovr, 1.0)


def _by_selection(xp: Backend, order: Array, seg: _Segments, sel: Array, final: Array) -> Tuple[Array, Array]:
    """Input positions and final scores in (group, selection) order, from the selection rank in the group."""
    out = xp.zeros(sel.shape[0], xp.i64)
    out[xp.take(seg.starts, seg.gidx) + sel] = xp.arange(sel.shape[0])
    return xp.take(order, out), xp.take(final, out)


def _soft_nms_steps(xp: Backend, c: Array, sc: Array, seg: _Segments, method: int, iou_thr: float, sigma: float,
                    tie_thr: Optional[float]) -> Tuple[Array, Array, Array]:
    """The loop of :func:`_soft_nms_groups` over groups sorted by key then input order: per sorted position the
    rank at which it is selected in its group and its final score; per group whether two of its boxes tied for the
    highest remaining score above ``tie_thr`` (checked only if given)."""
    n = sc.shape[0]
    sd = sc.dtype
    tied = xp.zeros(seg.starts.shape[0], xp.bool_)
    sel = xp.zeros(n, xp.i64)          # groups of one box: selected first
    final = xp.copy(sc)
    for groups, ss in (_chunks(xp, seg.sizes, ratio=True, min_size=2) if n else []):
        pos, valid, s = _chunk_layout(xp, seg.starts, ss, groups)
        gc = len(ss)
        x = xp.where(valid[None], c.T[:, pos], 0.0)      # [4, gc, s] coordinate-major; 0 past a group's end
        ar = (x[2] - x[0]) * (x[3] - x[1])
        scr = xp.where(valid, sc[pos], float("-inf"))
        perm = pos
        rows = xp.arange(gc)
        act = _active(ss, s + 1)
        tie_rows = xp.zeros(gc, xp.bool_)
        for i in range(s - 1):
            a = act[i + 1]
            if a == 0:
                break
            rest = scr[:a, i + 1:]
            mp = rest.argmax(1)
            sw = xp.nonzero(scr[:a, i] < rest[rows[:a], mp])
            if sw.shape[0]:
                q = xp.take(mp, sw) + (i + 1)
                for t in (scr, perm, ar):
                    ti, tq = t[sw, i], t[sw, q]
                    t[sw, i] = tq
                    t[sw, q] = ti
                ti, tq = x[:, sw, i], x[:, sw, q]
                x[:, sw, i] = tq
                x[:, sw, q] = ti
            if tie_thr is not None:
                top = scr[:a, i:i + 1]
                tie_rows[:a] |= ((rest == top) & (top > tie_thr)).any(1)
            xx1 = xp.maximum(x[1, :a, i:i + 1], x[1, :a, i + 1:])
            yy1 = xp.maximum(x[0, :a, i:i + 1], x[0, :a, i + 1:])
            xx2 = xp.minimum(x[3, :a, i:i + 1], x[3, :a, i + 1:])
            yy2 = xp.minimum(x[2, :a, i:i + 1], x[2, :a, i + 1:])
            inter = xp.clip0(xx2 - xx1) * xp.clip0(yy2 - yy1)
            ovr = inter / (ar[:a, i:i + 1] + ar[:a, i + 1:] - inter)
            if method == 1:
                w = xp.where(ovr > iou_thr, 1.0 - ovr, 1.0)
            elif method == 2:
                w = xp.exp(-(ovr * ovr) / sigma)
            else:
                w = xp.where(ovr > iou_thr, 0.0 * ovr, 1.0)
            scr[:a, i + 1:] = xp.cast(w * scr[:a, i + 1:], sd)
        p = perm[valid]
        sel[p] = (rows[:, None] * 0 + xp.arange(s)[None, :])[valid]
        final[p] = scr[valid]
        tied[groups] = tie_rows
    return sel, final, tied


def _nms_run(bt: _Batch, weights: Optional[np.ndarray], method: int, iou_thr: float, sigma: float, thresh: float,
             clip: bool, tie: str, fn: Optional[str]) -> Tuple[Array, Array, Array, Array, Array]:
    """``nms_method`` for a batch: image-sorted ``(boxes, scores (as weighted, not decayed), labels, decayed
    scores, img)``, grouped by label in increasing order, each group in keep order."""
    xp = bt.xp
    idx, boxes, sc, key, img = _nms_prepare(bt, weights, fn, clip)
    if method == 3:
        order, keep = _hard_nms(xp, boxes, sc, key, iou_thr, tie)
        sel = xp.take(order, xp.nonzero(keep))
        dec = xp.take(sc, sel)
    else:
        order, final = _soft_nms_groups(xp, boxes, sc, key, method, iou_thr, sigma, thresh)
        m = xp.nonzero(final > thresh)
        sel = xp.take(order, m)
        dec = xp.take(final, m)
    return (xp.take(boxes, sel), xp.take(sc, sel), xp.take(xp.take(bt.labels, idx), sel), dec,
            xp.take(img, sel))
