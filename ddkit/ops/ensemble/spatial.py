"""Independent parts of the groups: the spatial index that keeps crowded scenes about linear in the boxes.

Greedy NMS, soft-NMS and NMW only relate two boxes whose IoU is ``> thr >= 0``, and box voting (with a positive
``vote_thr``) two boxes whose IoU is ``>= vote_thr > 0``: in both cases their intersection has a positive area.
So every (image, label) group splits into **parts**, the connected components of its positive-overlap graph:
processed alone, each part in the group's processing order, the parts give exactly what the whole group gives. The
sequential loops then take one step per rank of the largest part instead of the largest group, and compare a box
with the boxes of its part only.

WBF relates a box to the *fused* boxes of the clusters, which stay inside the hull of their members up to the
float32 rounding of the fused coordinates. It runs on the parts, then checks that no cluster's hull (widened by a
bound on that rounding) overlaps a box of another part; parts where one does are merged and run again, until none
does (so the result is exact: a fused box never reached outside its part).

Overlapping pairs come from a grid index: every box is copied into the horizontal strips (about one mean box
height high) that its y-range meets; in each (group, strip) cell, copies sorted by ``x1``, each is tested against the
later ones whose ``x1`` is below its ``x2`` (a ``searchsorted``), in blocks of at most ``_PAIR_BLOCK`` candidates;
a pair is reported in the strip of its larger ``y1`` only.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from ddkit.ops.ensemble.backends import Array, Backend
from ddkit.ops.ensemble.sort import _segments, _Segments, _stable_key_order

_SPATIAL_MIN = 48           # groups of fewer boxes are processed whole (splitting them costs more than it saves)
_PAIR_BLOCK = 1 << 22       # candidate pairs expanded at once (memory bound)
_F32_STEP = 2.0 ** -23      # twice float32's unit roundoff
_MAX_STRIPS = 4096          # strips of the y-index at most (per call)


def _strips(xp: Backend, c: Array, group: Array) -> Tuple[Array, Array, Array, Array]:
    """Copies of the boxes, one per horizontal strip their y-range meets (strips about one mean box height high).

    Returns ``(box, cell, strip, first)``: per copy its box and a dense (group, strip) cell id and strip; per box the
    first strip it meets. Two boxes overlapping in y share the strip of the larger ``y1``: ``max(first)``."""
    n = c.shape[0]
    y0, y1 = float(c[:, 1].min()), float(c[:, 3].max())
    h = float((c[:, 3] - c[:, 1]).mean())
    height = max(h, (y1 - y0) / _MAX_STRIPS)
    if not (height > 0 and np.isfinite(height) and np.isfinite(y1 - y0)):
        return xp.arange(n), group, xp.zeros(n, xp.i64), xp.zeros(n, xp.i64)
    first = xp.cast(xp.trunc((c[:, 1] - y0) / height), xp.i64)
    last = xp.cast(xp.trunc((c[:, 3] - y0) / height), xp.i64)
    copies = last - first + 1
    m = int(copies.sum())
    box = xp.repeat(xp.arange(n), copies, m)
    strip = xp.take(first, box) + xp.arange(m) - xp.repeat(xp.cumsum(copies) - copies, copies, m)
    cell = xp.take(group, box) * (int(last.max()) + 1) + strip
    if (int(cell.max()) + 1) * (2 * m + 1) >= 2 ** 62:
        cell = xp.unique_inverse(cell)
    return box, cell, strip, first


def overlap_pairs(xp: Backend, c: Array, group: Array) -> Tuple[Array, Array]:
    """Pairs of boxes of the same group whose intersection has a positive area.

    Args:
        c (Array[N, 4]): ``(x1, y1, x2, y2)`` boxes with ordered corners.
        group (Array[N] int64): a non-negative group id per box.

    Returns:
        (Array[P] int64, Array[P] int64): the indices ``i`` and ``j`` of every such pair, each pair once.
    """
    n = c.shape[0]
    if n < 2:
        return xp.zeros(0, xp.i64), xp.zeros(0, xp.i64)
    box, cell, strip, first = _strips(xp, c, group)
    m = box.shape[0]
    cc = xp.take(c, box)
    # x1 and x2 as dense ranks over both (equal values, equal ranks), offset per cell: one int64 sort key
    rank = xp.unique_inverse(xp.concat([cc[:, 0], cc[:, 2]]))
    span = int(rank.max()) + 1
    k1, k2 = cell * span + rank[:m], cell * span + rank[m:]
    order = xp.argsort(k1)
    # sorted copy p overlaps in x the later copies p + 1 .. end - 1 (same cell, x1 < x2 of p)
    cnt = xp.searchsorted(xp.take(k1, order), xp.take(k2, order), "left") - xp.arange(m) - 1
    bs = xp.take(box, order)
    y1, y2, st = xp.take(cc[:, 1], order), xp.take(cc[:, 3], order), xp.take(strip, order)
    fs = xp.take(first, bs)
    cum = np.cumsum(xp.numpy(cnt))
    out_i, out_j = [], []
    a = 0
    while a < m:
        base = int(cum[a - 1]) if a else 0
        b = min(m, max(a + 1, int(np.searchsorted(cum, base + _PAIR_BLOCK, side="right"))))
        total = int(cum[b - 1]) - base
        if total:
            cb = cnt[a:b]
            i = xp.repeat(xp.arange(a, b), cb, total)
            j = i + 1 + xp.arange(total) - xp.repeat(xp.cumsum(cb) - cb, cb, total)
            # overlap in y, counted in one strip only: the one of the larger y1
            hit = xp.nonzero((xp.take(y1, j) < xp.take(y2, i)) & (xp.take(y1, i) < xp.take(y2, j))
                             & (xp.take(st, i) == xp.maximum(xp.take(fs, i), xp.take(fs, j))))
            out_i.append(xp.take(bs, xp.take(i, hit)))
            out_j.append(xp.take(bs, xp.take(j, hit)))
        a = b
    if not out_i:
        return xp.zeros(0, xp.i64), xp.zeros(0, xp.i64)
    return xp.concat(out_i), xp.concat(out_j)


def connected(xp: Backend, n: int, ei: Array, ej: Array) -> Array:
    """Connected components of a graph of ``n`` nodes (hooking on the smaller root, then pointer jumping).

    Args:
        n (int): number of nodes.
        ei, ej (Array[E] int64): the edges.

    Returns:
        Array[n] int64: per node, the smallest node of its component.
    """
    lab = xp.arange(n)
    while ei.shape[0]:
        li, lj = xp.take(lab, ei), xp.take(lab, ej)
        live = xp.nonzero(li != lj)
        if live.shape[0] == 0:
            break
        ei, ej, li, lj = (xp.take(x, live) for x in (ei, ej, li, lj))
        lab = xp.scatter_min_(lab, xp.maximum(li, lj), xp.minimum(li, lj))
        while True:
            nxt = xp.take(lab, lab)
            if bool((nxt == lab).all()):
                break
            lab = nxt
    return lab


def _hulls(xp: Backend, c: Array, lab: Array, roots: Array) -> Array:
    """Per set of boxes (boxes with equal ``lab``; ``roots``: the positions naming the sets) its hull, widened by a
    bound on the float32 rounding of a weighted mean of the set (WBF's fused boxes): ``(members + 2) * u * |x|``."""
    n, k = c.shape[0], roots.shape[0]
    inf = float("inf")
    where = xp.full(n, -1, xp.i64)
    where[roots] = xp.arange(k)
    r = xp.take(where, lab)
    lo = [xp.scatter_min_(xp.full(k, inf, xp.f64), r, c[:, d]) for d in (0, 1)]
    hi = [xp.scatter_max_(xp.full(k, -inf, xp.f64), r, c[:, d]) for d in (2, 3)]
    big = xp.maximum(xp.maximum(abs(lo[0]), abs(lo[1])), xp.maximum(abs(hi[0]), abs(hi[1])))
    margin = (xp.bincount(r, xp.full(n, 1.0, xp.f64), k) + 4.0) * _F32_STEP * big
    return xp.stack([lo[0] - margin, lo[1] - margin, hi[0] + margin, hi[1] + margin], 1)


def escaped_clusters(xp: Backend, c: Array, group: Array, lab: Array, seed_of: Array) -> Tuple[Array, Array]:
    """Check of a WBF run on parts: clusters (``seed_of``: the position of each box's cluster seed) whose widened
    hull overlaps a box of another part of the group. Their fused boxes may have met that box: the two parts must
    be merged and run again. Returns the part labels to merge, ``(Array[E], Array[E])`` (empty: the run was exact).
    """
    n = c.shape[0]
    roots = xp.nonzero(seed_of == xp.arange(n))
    hull = _hulls(xp, c, seed_of, roots)
    pi, pj = overlap_pairs(xp, xp.concat([c, hull]), xp.concat([group, xp.take(group, roots)]))
    box, other = xp.where(pi < n, pi, pj), xp.where(pi < n, pj, pi)
    m = xp.nonzero((box < n) & (other >= n))
    box, hull_of = xp.take(box, m), xp.take(roots, xp.take(other, m) - n)
    a, b = xp.take(lab, box), xp.take(lab, hull_of)
    m = xp.nonzero(a != b)
    return xp.take(a, m), xp.take(b, m)


def merge_labels(xp: Backend, lab: Array, a: Array, b: Array) -> Array:
    """``lab`` with the labels ``a[e]`` and ``b[e]`` made equal (transitively); labels are in ``[0, 2 N)``."""
    return xp.take(connected(xp, 2 * lab.shape[0], a, b), lab)


def part_labels(xp: Backend, c: Array, seg: _Segments) -> Optional[Array]:
    """A label per box naming its part (see the module docstring); groups under ``_SPATIAL_MIN`` boxes stay whole.

    Args:
        c (Array[N, 4]): boxes with ordered corners, sorted by group.
        seg (_Segments): the groups.

    Returns:
        Array[N] int64 or None: labels in ``[0, 2 N)``, equal for the boxes of one part (``None`` when no group is
        large enough to be split).
    """
    n = c.shape[0]
    big = xp.take(seg.sizes, seg.gidx) >= max(_SPATIAL_MIN, 2)
    sub = xp.nonzero(big)
    if sub.shape[0] == 0:
        return None
    cs, gs = xp.take(c, sub), xp.take(seg.gidx, sub)
    lab = connected(xp, sub.shape[0], *overlap_pairs(xp, cs, gs))
    out = seg.gidx + n                       # whole groups: their own label, after every part label
    out[sub] = xp.take(sub, lab)
    return out


def split_by(xp: Backend, lab: Optional[Array], seg: _Segments) -> Optional[Tuple[Array, _Segments]]:
    """The parts named by ``lab`` of groups of boxes sorted by group then processing order.

    Returns:
        ``(perm, parts)`` or None: ``perm`` (Array[N]) puts the boxes part by part, each part in the processing
        order; ``parts`` are the segments of ``take(x, perm)``. ``None`` when no group is split.
    """
    if lab is None:
        return None
    perm = _stable_key_order(xp, lab)
    parts = _segments(xp, xp.take(lab, perm))
    if parts.starts.shape[0] == seg.starts.shape[0]:
        return None
    return perm, parts


def split_groups(xp: Backend, c: Array, seg: _Segments) -> Optional[Tuple[Array, _Segments]]:
    """:func:`split_by` the :func:`part_labels` of the boxes ``c`` (sorted by group, then processing order)."""
    return split_by(xp, part_labels(xp, c, seg), seg)


def unpermute(xp: Backend, perm: Array, x: Array) -> Array:
    """``y`` with ``y[perm] = x`` (rows of ``x`` back to the positions they were taken from)."""
    y = xp.copy(x)
    y[perm] = x
    return y
