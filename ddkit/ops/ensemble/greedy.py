"""Box geometry and greedy NMS of many groups at once (the shared core of NMS, NMW and box voting)."""
from __future__ import annotations

from typing import Optional, Tuple

from ddkit.ops.ensemble import compiled
from ddkit.ops.ensemble.backends import Array, Backend
from ddkit.ops.ensemble.sort import _Segments
from ddkit.ops.ensemble.spatial import split_groups, unpermute


def _areas(c: Array) -> Array:
    return (c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1])


def _order_corners(xp: Backend, b: Array) -> Array:
    """``(min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))``: ensemble_boxes swaps reversed corners."""
    if not bool((b[:, 2:4] < b[:, 0:2]).any()):
        return b
    return xp.concat([xp.minimum(b[:, 0:2], b[:, 2:4]), xp.maximum(b[:, 0:2], b[:, 2:4])], 1)


def _greedy_rounds(xp: Backend, coords: Array, area: Array, seg: _Segments, thr: float, track: bool
                   ) -> Tuple[Array, Optional[Array], Optional[Array]]:
    """Greedy NMS of every group at once (boxes sorted by group, then processing order).

    One round per kept box of the busiest group: in each group the first undecided box is kept, and every later
    undecided box whose ``IoU = inter / (area_kept + area_box - inter)`` with it is ``> thr`` is suppressed. With
    ``track`` (non-maximum weighted), a suppressed box stays until every kept box before it has been compared with
    it, recording the largest IoU (``> thr``, first kept box on ties) and that box: ``(keep, best_iou, cluster)``."""
    n = coords.shape[0]
    keep = xp.zeros(n, xp.bool_)
    best = xp.full(n, -1.0, xp.f64) if track else None
    cluster = xp.arange(n) if track else None
    x1, y1, x2, y2 = (xp.contiguous(coords[:, k]) for k in range(4))
    alive = xp.arange(n)                        # positions still compared, by group then rank
    und = xp.full(n, True, xp.bool_)            # undecided, over `alive`
    while alive.shape[0]:
        m = alive.shape[0]
        g = xp.take(seg.gidx, alive)
        new = xp.full(m, True, xp.bool_)
        new[1:] = g[1:] != g[:-1]
        starts = xp.nonzero(new)
        sid = xp.cumsum(new) - 1
        und_i = xp.cast(und, xp.i64)
        cu = xp.cumsum(und_i)
        rel = cu - xp.take(xp.take(cu, starts) - xp.take(und_i, starts), sid)
        heads = xp.nonzero(und & (rel == 1))    # first undecided box of each group: kept
        head_of = xp.full(starts.shape[0], m, xp.i64)
        head_of[xp.take(sid, heads)] = heads
        hp = xp.take(head_of, sid)
        keep[xp.take(alive, heads)] = True
        later = xp.nonzero(xp.arange(m) > hp)    # after the group's kept box (none if it has no undecided box)
        w = xp.take(alive, later)
        h = xp.take(alive, xp.take(hp, later))
        xa = xp.maximum(xp.take(x1, h), xp.take(x1, w))
        ya = xp.maximum(xp.take(y1, h), xp.take(y1, w))
        xb = xp.minimum(xp.take(x2, h), xp.take(x2, w))
        yb = xp.minimum(xp.take(y2, h), xp.take(y2, w))
        inter = xp.clip0(xb - xa) * xp.clip0(yb - ya)
        iou = inter / (xp.take(area, h) + xp.take(area, w) - inter)
        hit = iou > thr
        if track:
            upd = xp.nonzero(hit & (iou > xp.take(best, w)))
            wu = xp.take(w, upd)
            best[wu] = xp.take(iou, upd)
            cluster[wu] = xp.take(h, upd)
            und = xp.take(und, later) & ~hit
            alive = w
        else:
            alive = xp.take(w, xp.nonzero(~hit))
            und = xp.full(alive.shape[0], True, xp.bool_)
    return keep, best, cluster


def _greedy_pairs(xp: Backend, coords: Array, area: Array, seg: _Segments, thr: float) -> Array:
    """Greedy NMS of every group at once for small inputs: the IoU of every pair of boxes of a group, then the keep
    decisions resolved layer by layer (a box is kept iff no kept earlier box overlaps it with ``IoU > thr``)."""
    n = coords.shape[0]
    rank = seg.rank
    p = int(rank.sum()) if n else 0
    if p == 0:
        return xp.full(n, True, xp.bool_)
    j = xp.repeat(xp.arange(n), rank, p)
    i = xp.repeat(xp.take(seg.starts, seg.gidx) - (xp.cumsum(rank) - rank), rank, p) + xp.arange(p)
    a, b = xp.take(coords, i), xp.take(coords, j)
    inter = xp.clip0(xp.minimum(a[:, 2], b[:, 2]) - xp.maximum(a[:, 0], b[:, 0])) * \
        xp.clip0(xp.minimum(a[:, 3], b[:, 3]) - xp.maximum(a[:, 1], b[:, 1]))
    m = xp.nonzero(inter / (xp.take(area, i) + xp.take(area, j) - inter) > thr)
    ei, ej = xp.take(i, m), xp.take(j, m)
    state = xp.zeros(n, xp.i8)                  # 0 undecided, 1 kept, 2 suppressed
    blocked = xp.zeros(n, xp.bool_)
    blocked[ej] = True
    state[~blocked] = 1
    while ei.shape[0]:
        hit = xp.zeros(n, xp.bool_)
        hit[xp.take(ej, xp.nonzero(xp.take(state, ei) == 1))] = True
        state[hit & (state == 0)] = 2
        live = xp.nonzero((xp.take(state, ej) == 0) & (xp.take(state, ei) != 2))
        ei, ej = xp.take(ei, live), xp.take(ej, live)
        blocked = xp.zeros(n, xp.bool_)
        blocked[ej] = True
        state[(state == 0) & ~blocked] = 1
    return state == 1


def _greedy_rounds_parts(xp: Backend, coords: Array, seg: _Segments, thr: float, track: bool
                         ) -> Tuple[Array, Optional[Array], Optional[Array]]:
    """:func:`_greedy_rounds` on the independent parts of the groups (:mod:`.spatial`): the same results (on the
    CPU, the compiled loop with its grid on whole groups when numba is there)."""
    if compiled.available(xp):
        return compiled.greedy(coords, _areas(coords), seg, thr)
    split = split_groups(xp, coords, seg)
    if split is None:
        return _greedy_rounds(xp, coords, _areas(coords), seg, thr, track)
    perm, parts = split
    c = xp.take(coords, perm)
    keep, best, cluster = _greedy_rounds(xp, c, _areas(c), parts, thr, track)
    keep = unpermute(xp, perm, keep)
    if not track:
        return keep, None, None
    return keep, unpermute(xp, perm, best), unpermute(xp, perm, xp.take(perm, cluster))
