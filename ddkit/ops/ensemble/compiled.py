"""Compiled sequential loops of the CPU path (numba, when it is installed; it comes with ``ensemble_boxes``).

The greedy clusterings are sequential: the vectorized code runs one numpy step per rank for every group at once,
which costs a few microseconds of overhead per step however small the step. On the CPU these kernels run the same
loops box by box, with the same IEEE operations in the same order (no fast-math), so they return the same bits.
A uniform grid per group (cells about a mean box in size) restricts every comparison to the boxes or clusters that
share a cell with the box, so crowded groups cost about linearly in their boxes.

numba is optional: without it (or with ``USE_NUMBA = False``) the vectorized code runs, as it always does on CUDA.
Kernels compile on their first call (about a second each) into numba's on-disk cache, so later processes load them.
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Tuple

import numpy as np

from ddkit.ops.ensemble.backends import Backend, _Numpy
from ddkit.ops.ensemble.sort import _Segments

#: Use the numba kernels on the CPU when numba is importable (set False to run the vectorized numpy code).
USE_NUMBA = True


@functools.lru_cache(maxsize=1)
def _kernels() -> Optional[Any]:
    """The compiled kernels, or None without numba (imported on first use: importing ddkit stays light)."""
    try:
        import numba
    except ImportError:
        return None
    jit = numba.njit(cache=True, nogil=True)
    g = globals()
    for name in ("_grid", "_cell", "_grow", "_register", "_follow", "_pull", "_lower_leaf"):   # helpers first:
        g[name] = jit(g[name])                                               # the kernels call compiled versions
    return type("Kernels", (), {"wbf": staticmethod(jit(_wbf_kernel)), "greedy": staticmethod(jit(_greedy_kernel)),
                                "soft_nms": staticmethod(jit(_soft_nms_kernel)),
                                "pairs": staticmethod(jit(_pairs_kernel))})


def available(xp: Backend) -> bool:
    """Whether the kernels run for this backend (the numpy CPU backend with numba installed)."""
    return USE_NUMBA and isinstance(xp, _Numpy) and _kernels() is not None


def _grid(coords: np.ndarray, s0: int, sz: int) -> Tuple[float, float, float, float, int, int]:
    """A uniform grid over a group's boxes, cells about a mean box wide and high (at most ~2 sqrt(sz) a side)."""
    gx0, gy0, gx1, gy1 = coords[s0, 0], coords[s0, 1], coords[s0, 2], coords[s0, 3]
    mw, mh = 0.0, 0.0
    for p in range(s0, s0 + sz):
        gx0, gy0 = min(gx0, coords[p, 0]), min(gy0, coords[p, 1])
        gx1, gy1 = max(gx1, coords[p, 2]), max(gy1, coords[p, 3])
        mw += coords[p, 2] - coords[p, 0]
        mh += coords[p, 3] - coords[p, 1]
    side = max(1, int(2.0 * np.sqrt(sz))) if sz > 16 else 1     # tiny groups: one cell (all pairs)
    nx = min(side, max(1, int((gx1 - gx0) / (mw / sz)))) if mw > 0 and gx1 - gx0 < np.inf else 1
    ny = min(side, max(1, int((gy1 - gy0) / (mh / sz)))) if mh > 0 and gy1 - gy0 < np.inf else 1
    return gx0, gy0, max((gx1 - gx0) / nx, 1e-300), max((gy1 - gy0) / ny, 1e-300), nx, ny


def _cell(v: float, v0: float, size: float, n: int) -> int:
    """The cell of a coordinate (monotone in it, clamped to the grid): boxes that overlap share a cell."""
    t = (v - v0) / size
    if not t > 0:
        return 0
    if t >= n:
        return n - 1
    return int(t)


def _grow(a: np.ndarray, used: int, need: int) -> np.ndarray:
    """``a`` itself if it holds ``need`` entries, else a copy of its first ``used`` in one at least twice as long
    (checked once per box, outside the inner loops: they stay free of allocations)."""
    if need <= a.shape[0]:
        return a
    b = np.empty(max(need, 2 * a.shape[0]), a.dtype)
    b[:used] = a[:used]
    return b


def _register(head: np.ndarray, nxt: np.ndarray, item: np.ndarray, used: int, q: int, ax0: int, ay0: int,
              ax1: int, ay1: int, nx: int) -> Tuple[np.ndarray, np.ndarray, int]:
    """Add ``q`` to the lists of the cells ``[ax0, ax1] x [ay0, ay1]`` (arrays grown by doubling, once, before
    the loop)."""
    need = used + (ax1 - ax0 + 1) * (ay1 - ay0 + 1)
    nxt, item = _grow(nxt, used, need), _grow(item, used, need)
    for iy in range(ay0, ay1 + 1):
        for ix in range(ax0, ax1 + 1):
            c = iy * nx + ix
            nxt[used], item[used] = head[c], q
            head[c] = used
            used += 1
    return nxt, item, used


def _follow(head: np.ndarray, nxt: np.ndarray, item: np.ndarray, used: int, q: int, rect: np.ndarray,
            fx: np.ndarray, gx0: float, gy0: float, cw: float, ch: float, nx: int, ny: int
            ) -> Tuple[np.ndarray, np.ndarray, int]:
    """Register cluster ``q`` in the cells its moved fused box meets (``rect``: the bounding rectangle of the cells
    it has been registered in, grown to cover them)."""
    ax0 = min(rect[q, 0], _cell(fx[q, 0], gx0, cw, nx))
    ay0 = min(rect[q, 1], _cell(fx[q, 1], gy0, ch, ny))
    ax1 = max(rect[q, 2], _cell(fx[q, 2], gx0, cw, nx))
    ay1 = max(rect[q, 3], _cell(fx[q, 3], gy0, ch, ny))
    if ax0 < rect[q, 0] or ay0 < rect[q, 1] or ax1 > rect[q, 2] or ay1 > rect[q, 3]:
        for iy in range(ay0, ay1 + 1):
            for ix in range(ax0, ax1 + 1):
                if ix < rect[q, 0] or ix > rect[q, 2] or iy < rect[q, 1] or iy > rect[q, 3]:
                    nxt, item, used = _register(head, nxt, item, used, q, ix, iy, ix, iy, nx)
        rect[q, 0], rect[q, 1], rect[q, 2], rect[q, 3] = ax0, ay0, ax1, ay1
    return nxt, item, used


def _wbf_kernel(coords: np.ndarray, b1: np.ndarray, wv: np.ndarray, starts: np.ndarray, sizes: np.ndarray,
                thr: float, need_ws: bool, seed_of: np.ndarray, f_out: np.ndarray, conf_out: np.ndarray,
                ws_out: np.ndarray) -> None:  # pragma: no cover - compiled
    """WBF's clustering, group by group, exactly as ``wbf._wbf_assign`` computes it (outputs filled in place).

    A box is compared with the clusters registered in the grid cells it meets; a cluster is registered in every
    cell its fused box has met (so in those of its current fused box). Ties go to the first cluster opened."""
    m = sizes.max() if sizes.shape[0] else 0       # work arrays allocated once, for the largest group
    head = np.empty(4 * m + 4, np.int64)
    nxt = np.empty(4 * m + 16, np.int64)
    item = np.empty(4 * m + 16, np.int64)
    fx = np.empty((m, 4))
    rect = np.empty((m, 4), np.int64)
    acc = np.empty((m, 4), np.float32)
    conf = np.empty(m)
    ws = np.empty(m)
    area = np.empty(m)
    seed = np.empty(m, np.int64)
    stamp = np.full(m, -1, np.int64)
    for g in range(starts.shape[0]):
        s0, sz = starts[g], sizes[g]
        gx0, gy0, cw, ch, nx, ny = _grid(coords, s0, sz)
        head[:nx * ny] = -1
        used = 0
        k = 0
        for r in range(sz):
            p = s0 + r
            c0, c1, c2, c3 = coords[p, 0], coords[p, 1], coords[p, 2], coords[p, 3]
            ap = (c2 - c0) * (c3 - c1)
            best, biou = -1, -1.0
            bx0, bx1 = _cell(c0, gx0, cw, nx), _cell(c2, gx0, cw, nx)
            by0, by1 = _cell(c1, gy0, ch, ny), _cell(c3, gy0, ch, ny)
            for iy in range(by0, by1 + 1):
                for ix in range(bx0, bx1 + 1):
                    e = head[iy * nx + ix]
                    while e >= 0:
                        q = item[e]
                        e = nxt[e]
                        if stamp[q] == p:
                            continue
                        stamp[q] = p
                        iw = min(fx[q, 2], c2) - max(fx[q, 0], c0)
                        ih = min(fx[q, 3], c3) - max(fx[q, 1], c1)
                        inter = max(iw, 0.0) * max(ih, 0.0)
                        iou = inter / (area[q] + ap - inter)
                        if iou > biou or (iou == biou and q < best):
                            best, biou = q, iou
            sc = b1[p]
            if best >= 0 and biou > thr:
                q = best
                nc = conf[q] + sc
                for d in range(4):
                    acc[q, d] = np.float32(np.float64(acc[q, d]) + sc * coords[p, d])
                for d in range(4):
                    if nc != 0:
                        fx[q, d] = np.float64(np.float32(np.float64(acc[q, d]) / nc))
                conf[q] = nc
                if need_ws:
                    ws[q] = ws[q] + wv[p]
                area[q] = (fx[q, 2] - fx[q, 0]) * (fx[q, 3] - fx[q, 1])
                seed_of[p] = seed[q]
                nxt, item, used = _follow(head, nxt, item, used, q, rect, fx, gx0, gy0, cw, ch, nx, ny)
            else:
                for d in range(4):
                    fx[k, d] = coords[p, d]
                    acc[k, d] = np.float32(sc * coords[p, d])
                conf[k], ws[k], area[k], seed[k] = sc, wv[p], ap, p
                rect[k, 0], rect[k, 1], rect[k, 2], rect[k, 3] = bx0, by0, bx1, by1
                nxt, item, used = _register(head, nxt, item, used, k, bx0, by0, bx1, by1, nx)
                seed_of[p] = p
                k += 1
        for q in range(k):
            p = seed[q]
            for d in range(4):
                f_out[p, d] = fx[q, d]
            conf_out[p] = conf[q]
            ws_out[p] = ws[q] if need_ws else conf[q]


def _greedy_kernel(coords: np.ndarray, area: np.ndarray, starts: np.ndarray, sizes: np.ndarray, thr: float,
                   keep: np.ndarray, best: np.ndarray, cluster: np.ndarray) -> None:  # pragma: no cover - compiled
    """Greedy NMS group by group as ``greedy._greedy_rounds`` (with ``track``) computes it, filled in place: a box
    is compared with the kept boxes registered in the grid cells it meets; ties go to the first kept box."""
    m = sizes.max() if sizes.shape[0] else 0       # work arrays allocated once, for the largest group
    head = np.empty(4 * m + 4, np.int64)
    nxt = np.empty(4 * m + 16, np.int64)
    item = np.empty(4 * m + 16, np.int64)
    stamp = np.full(m, -1, np.int64)
    for g in range(starts.shape[0]):
        s0, sz = starts[g], sizes[g]
        gx0, gy0, cw, ch, nx, ny = _grid(coords, s0, sz)
        head[:nx * ny] = -1
        used = 0
        for r in range(sz):
            p = s0 + r
            bi, bc, hit = -1.0, p, False
            bx0, bx1 = _cell(coords[p, 0], gx0, cw, nx), _cell(coords[p, 2], gx0, cw, nx)
            by0, by1 = _cell(coords[p, 1], gy0, ch, ny), _cell(coords[p, 3], gy0, ch, ny)
            for iy in range(by0, by1 + 1):
                for ix in range(bx0, bx1 + 1):
                    e = head[iy * nx + ix]
                    while e >= 0:
                        h = item[e]
                        e = nxt[e]
                        if stamp[h - s0] == p:
                            continue
                        stamp[h - s0] = p
                        iw = min(coords[h, 2], coords[p, 2]) - max(coords[h, 0], coords[p, 0])
                        ih = min(coords[h, 3], coords[p, 3]) - max(coords[h, 1], coords[p, 1])
                        inter = max(iw, 0.0) * max(ih, 0.0)
                        iou = inter / (area[h] + area[p] - inter)
                        if iou > thr:
                            hit = True
                            if iou > bi or (iou == bi and h < bc):
                                bi, bc = iou, h
            if hit:
                best[p], cluster[p] = bi, bc
            else:
                keep[p] = True
                nxt, item, used = _register(head, nxt, item, used, p, bx0, by0, bx1, by1, nx)


def _pairs_kernel(c: np.ndarray, starts: np.ndarray, sizes: np.ndarray, gptr: np.ndarray
                  ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """The pairs of boxes of a group whose intersection has a positive area, found through a grid, each once
    (``pa`` the later box, ``pb`` the earlier one), with their IoU as ensemble_boxes' soft-NMS computes it (the
    same from either side); group ``g``'s pairs are ``gptr[g]:gptr[g + 1]`` (``gptr`` filled in place).

    Each box meets the earlier boxes registered in its cells, then registers itself."""
    n = c.shape[0]
    pa = np.empty(4 * n + 16, np.int64)
    pb = np.empty(4 * n + 16, np.int64)
    pv = np.empty(4 * n + 16)
    used = 0
    m = sizes.max() if sizes.shape[0] else 0       # work arrays allocated once, for the largest group
    head = np.empty(4 * m + 4, np.int64)
    nxt = np.empty(8 * m + 16, np.int64)
    item = np.empty(8 * m + 16, np.int64)
    stamp = np.full(m, -1, np.int64)
    for g in range(starts.shape[0]):
        s0, sz = starts[g], sizes[g]
        gx0, gy0, cw, ch, nx, ny = _grid(c, s0, sz)
        head[:nx * ny] = -1
        reg = 0
        for p in range(s0, s0 + sz):
            k = used + p - s0 + 1                # at most one pair per earlier box, and one slot written past
            if k > pa.shape[0]:
                pa, pb, pv = _grow(pa, used, k), _grow(pb, used, k), _grow(pv, used, k)
            x0, y0, x1, y1 = c[p, 0], c[p, 1], c[p, 2], c[p, 3]
            r0, r1, r2, r3 = _cell(x0, gx0, cw, nx), _cell(y0, gy0, ch, ny), _cell(x1, gx0, cw, nx), \
                _cell(y1, gy0, ch, ny)
            ap = (x1 - x0) * (y1 - y0)
            for iy in range(r1, r3 + 1):
                for ix in range(r0, r2 + 1):
                    e = head[iy * nx + ix]
                    while e >= 0:                # written always, kept if new and overlapping: no branch
                        o = item[e]
                        e = nxt[e]
                        fresh = stamp[o - s0] != p
                        stamp[o - s0] = p
                        w = min(y1, c[o, 3]) - max(y0, c[o, 1])
                        h = min(x1, c[o, 2]) - max(x0, c[o, 0])
                        inter = max(w, 0.0) * max(h, 0.0)     # <= either area: the denominator is > 0
                        pa[used], pb[used] = p, o
                        pv[used] = inter / (ap + (c[o, 2] - c[o, 0]) * (c[o, 3] - c[o, 1]) - inter)
                        used += fresh & (w > 0) & (h > 0)
            nxt, item, reg = _register(head, nxt, item, reg, p, r0, r1, r2, r3, nx)
        gptr[g + 1] = used
    return pa[:used], pb[:used], pv[:used]


def _pull(ts: np.ndarray, tp: np.ndarray, t: int) -> None:
    """Node ``t`` of the max-tree takes the better child: the higher score, then the lower position (-1: empty)."""
    pa, pb, sa, sb = tp[2 * t], tp[2 * t + 1], ts[2 * t], ts[2 * t + 1]
    left = (pb < 0) | ((pa >= 0) & ((sa > sb) | ((sa == sb) & (pa < pb))))    # no short circuit: no branch
    ts[t] = sa if left else sb
    tp[t] = pa if left else pb


def _lower_leaf(ts: np.ndarray, tp: np.ndarray, size: int, pos: int, score: float, alive: bool) -> None:
    """Lower leaf ``pos`` of the max-tree (node: best score ``ts`` and its position ``tp``) to ``score``, or empty
    it. Only the ancestors that ``pos`` was winning can change: the update stops at the first other winner."""
    t = size + pos
    ts[t], tp[t] = score, (pos if alive else -1)
    t >>= 1
    while t >= 1 and tp[t] == pos:
        _pull(ts, tp, t)
        t >>= 1


def _soft_nms_kernel(sc: np.ndarray, to_f32: bool, starts: np.ndarray, sizes: np.ndarray, gptr: np.ndarray,
                     pa: np.ndarray, pb: np.ndarray, wgt: np.ndarray, box_at: np.ndarray
                     ) -> None:  # pragma: no cover - compiled
    """``cpu_soft_nms_float`` of ensemble_boxes group by group, positions and ties included (filled in place).

    Position ``i`` of a group takes the highest remaining score, the lowest position on ties (what ensemble_boxes'
    swap does), found in a max-tree over positions; then only the boxes whose decay factor is not exactly 1 (of
    the pairs ``pa``/``pb`` with factor ``wgt``, group ``g``'s at ``gptr[g]:gptr[g + 1]``) are decayed.
    ``sc`` ends with the final scores and ``box_at[s0 + i]`` with the box selected at step ``i``."""
    m = sizes.max() if sizes.shape[0] else 0       # work arrays allocated once, for the largest group
    mp = 0
    for g in range(starts.shape[0]):
        mp = max(mp, gptr[g + 1] - gptr[g])
    ts = np.empty(4 * m + 4)
    tp = np.empty(4 * m + 4, np.int64)
    at = np.empty(m, np.int64)
    where = np.empty(m, np.int64)
    gone = np.empty(m, np.bool_)
    ptr = np.empty(m + 1, np.int64)               # per box of the group: its decaying pairs, both ways (CSR)
    nb = np.empty(2 * mp, np.int64)
    nw = np.empty(2 * mp)
    for g in range(starts.shape[0]):
        s0, sz = starts[g], sizes[g]
        ptr[:sz + 1] = 0
        for e in range(gptr[g], gptr[g + 1]):
            if wgt[e] != 1.0:
                ptr[pa[e] - s0 + 1] += 1
                ptr[pb[e] - s0 + 1] += 1
        for r in range(sz):
            ptr[r + 1] += ptr[r]
        for e in range(gptr[g], gptr[g + 1]):      # ptr[r] ends at the start of box r + 1's entries
            if wgt[e] != 1.0:
                a, b = pa[e] - s0, pb[e] - s0
                nb[ptr[a]], nw[ptr[a]] = b, wgt[e]
                ptr[a] += 1
                nb[ptr[b]], nw[ptr[b]] = a, wgt[e]
                ptr[b] += 1
        size = 1
        while size < sz:
            size *= 2
        tp[size:2 * size] = -1
        for pos in range(sz):
            at[pos] = pos                        # box at each position (relative)
            where[pos] = pos                     # position of each box
            gone[pos] = False
            ts[size + pos], tp[size + pos] = sc[s0 + pos], pos
        for t in range(size - 1, 0, -1):
            _pull(ts, tp, t)
        for i in range(sz):
            q = tp[1]
            if q != i:
                bi, bq = at[i], at[q]
                at[i], at[q] = bq, bi
                where[bq], where[bi] = i, q
                _lower_leaf(ts, tp, size, q, sc[s0 + bi], True)  # the box from i scores <= the one it replaces
            b = at[i]
            gone[b] = True
            _lower_leaf(ts, tp, size, i, 0.0, False)
            for e in range(ptr[b - 1] if b else 0, ptr[b]):
                o = nb[e]
                if not gone[o]:
                    v = nw[e] * sc[s0 + o]
                    sc[s0 + o] = np.float64(np.float32(v)) if to_f32 else v
                    _lower_leaf(ts, tp, size, where[o], sc[s0 + o], True)   # decays only lower scores
        for i in range(sz):
            box_at[s0 + i] = s0 + at[i]


def wbf_assign(coords: np.ndarray, b1: np.ndarray, wv: np.ndarray, seg: _Segments, thr: float, need_ws: bool
               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``wbf._wbf_assign`` compiled: ``(seed_of, fused boxes, summed scores, summed weights)`` per position."""
    n = coords.shape[0]
    seed_of = np.arange(n)
    f_out, conf_out, ws_out = coords.copy(), b1.copy(), wv.copy()
    _kernels().wbf(np.ascontiguousarray(coords, np.float64), np.ascontiguousarray(b1, np.float64),
                   np.ascontiguousarray(wv, np.float64), seg.starts.astype(np.int64), seg.sizes.astype(np.int64),
                   float(thr), bool(need_ws), seed_of, f_out, conf_out, ws_out)
    return seed_of, f_out, conf_out, ws_out


def greedy(coords: np.ndarray, area: np.ndarray, seg: _Segments, thr: float
           ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``greedy._greedy_rounds`` with ``track`` compiled: ``(keep, best IoU, cluster)`` per position."""
    n = coords.shape[0]
    keep = np.zeros(n, np.bool_)
    best = np.full(n, -1.0)
    cluster = np.arange(n)
    _kernels().greedy(np.ascontiguousarray(coords, np.float64), np.ascontiguousarray(area, np.float64),
                      seg.starts.astype(np.int64), seg.sizes.astype(np.int64), float(thr), keep, best, cluster)
    return keep, best, cluster


def overlap_pairs(c: np.ndarray, seg: _Segments) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The overlapping pairs of boxes of each group and their IoU (as soft-NMS computes it), each pair once:
    ``(gptr, later box, earlier box, iou)``, group ``g``'s pairs at ``gptr[g]:gptr[g + 1]``."""
    gptr = np.zeros(seg.starts.shape[0] + 1, np.int64)
    pa, pb, iou = _kernels().pairs(np.ascontiguousarray(c, np.float64), seg.starts.astype(np.int64),
                                   seg.sizes.astype(np.int64), gptr)
    return gptr, pa, pb, iou


def soft_nms(sc: np.ndarray, seg: _Segments, gptr: np.ndarray, pa: np.ndarray, pb: np.ndarray,
             weights: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``suppress._soft_nms_steps`` compiled, on whole groups: per group, the positions in selection order and
    the final scores, from the :func:`overlap_pairs` of every group and their decay factors ``weights``."""
    final = sc.astype(np.float64)
    box_at = np.empty(sc.shape[0], np.int64)
    _kernels().soft_nms(final, sc.dtype == np.float32, seg.starts.astype(np.int64), seg.sizes.astype(np.int64),
                        gptr, pa, pb, np.ascontiguousarray(weights, np.float64), box_at)
    return box_at, final.astype(sc.dtype)
