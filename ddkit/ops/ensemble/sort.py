"""Sorting with ``ensemble_boxes``' tie orders (numpy's argsort, numba's quicksort) and group segments."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from ddkit.ops.ensemble.backends import Array, Backend

_SLOTS = 1 << 20          # dense (group x rank) slots per chunk of the sequential loops
_SMALL_CHUNK = 1 << 15    # below this many slots a chunk is not split by size (fewer loop steps matter more)
_SMALL_QUICKSORT = 15     # numba's quicksort is an insertion sort up to this many elements


def _numba_argsort(a: np.ndarray) -> np.ndarray:
    """``np.argsort`` as numba compiles it (numba's quicksort), which ``ensemble_boxes.nms`` runs: same tie order."""
    vals = a.tolist()
    n = len(vals)
    r = list(range(n))
    if n < 2:
        return np.asarray(r, dtype=np.int64)

    def insertion_sort(low: int, high: int) -> None:
        for i in range(low + 1, high + 1):
            k = r[i]
            v = vals[k]
            j = i
            while j > low and v < vals[r[j - 1]]:
                r[j] = r[j - 1]
                j -= 1
            r[j] = k

    def partition(low: int, high: int) -> int:
        mid = (low + high) >> 1
        if vals[r[mid]] < vals[r[low]]:
            r[low], r[mid] = r[mid], r[low]
        if vals[r[high]] < vals[r[mid]]:
            r[high], r[mid] = r[mid], r[high]
        if vals[r[mid]] < vals[r[low]]:
            r[low], r[mid] = r[mid], r[low]
        pivot = vals[r[mid]]
        r[high], r[mid] = r[mid], r[high]
        i, j = low, high - 1
        while True:
            while i < high and vals[r[i]] < pivot:
                i += 1
            while j >= low and pivot < vals[r[j]]:
                j -= 1
            if i >= j:
                break
            r[i], r[j] = r[j], r[i]
            i += 1
            j -= 1
        r[i], r[high] = r[high], r[i]
        return i

    stack = [(0, n - 1)]
    while stack:
        low, high = stack.pop()
        while high - low >= _SMALL_QUICKSORT:
            i = partition(low, high)
            if high - i > i - low:
                if high > i:
                    stack.append((i + 1, high))
                high = i - 1
            else:
                if i > low:
                    stack.append((low, i - 1))
                low = i + 1
        insertion_sort(low, high)
    return np.asarray(r, dtype=np.int64)


def _dense_key(xp: Backend, key: Array, n: int) -> Array:
    """A non-negative int64 key with ``(key.max() + 1) * n`` safely below 2**63 (same order)."""
    if key.shape[0] == 0:
        return key
    lo, hi = int(key.min()), int(key.max())
    if lo >= 0 and (hi + 1) * max(n, 1) < 2 ** 62:
        return key
    if (hi - lo + 1) * max(n, 1) < 2 ** 62:
        return key - lo
    return xp.unique_inverse(key)


def _group_order(xp: Backend, key: Array, score: Array, tie: str, tie_values: Optional[np.ndarray] = None) -> Array:
    """Permutation sorting by ``key`` ascending, then ``score`` descending.

    ``tie`` says how equal ``(key, score)`` are ordered, the inputs being in their natural (scan) order:
    ``"stable"``: by index; ``"numpy"``: the whole group is ordered by ``np.argsort(tie_values[group])[::-1]`` (what
    ``ensemble_boxes`` does, tie order included); ``"numba"``: likewise with numba's quicksort; ``"any"``: arbitrary.
    """
    n = key.shape[0]
    if n <= 1:
        return xp.arange(n)
    key = _dense_key(xp, key, n)
    r = xp.argsort(score)
    drank = xp.zeros(n, xp.i64)
    drank[r] = xp.arange(n - 1, -1, -1)
    order = xp.argsort(key * n + drank)
    if tie == "any":
        return order
    ks, ss = xp.take(key, order), xp.take(score, order)
    eq = (ss[1:] == ss[:-1]) & (ks[1:] == ks[:-1])
    if not bool(eq.any()):
        return order
    if tie == "stable":
        start = xp.full(n, True, xp.bool_)
        start[1:] = ~eq
        return xp.take(order, xp.argsort(xp.cumsum(start) * n + order))
    ks_np = xp.numpy(ks)
    tied = np.unique(ks_np[1:][xp.numpy(eq)])
    order_np = xp.numpy(order).copy()
    lo = np.searchsorted(ks_np, tied, side="left")
    sizes = np.searchsorted(ks_np, tied, side="right") - lo
    for size in np.unique(sizes).tolist():
        # groups of equal size at once: numpy sorts the rows of a 2-D array one by one, exactly as 1-D arrays
        idx = lo[sizes == size][:, None] + np.arange(size)
        members = np.sort(order_np[idx], axis=1)
        v = tie_values[members]
        if tie == "numpy":
            p = np.argsort(v, axis=1)
        elif size <= _SMALL_QUICKSORT:          # numba's quicksort is an insertion sort (stable) up to 15
            p = np.argsort(v, axis=1, kind="stable")
        else:
            p = np.stack([_numba_argsort(row) for row in v])
        order_np[idx] = np.take_along_axis(members, p[:, ::-1], axis=1)
    return xp.asarray(order_np)


def _stable_key_order(xp: Backend, key: Array) -> Array:
    """Stable ascending argsort of an integer key (made unique with the index, so a quicksort is stable)."""
    n = key.shape[0]
    if n <= 1:
        return xp.arange(n)
    key = _dense_key(xp, key, n)
    return xp.argsort(key * n + xp.arange(n))


@dataclass
class _Segments:
    starts: Array   # [G] first sorted position of every group
    sizes: Array    # [G]
    gidx: Array     # [N] group of every sorted position
    rank: Array     # [N] rank inside its group


def _segments(xp: Backend, key_sorted: Array) -> _Segments:
    n = key_sorted.shape[0]
    new = xp.full(n, True, xp.bool_)
    if n > 1:
        new[1:] = key_sorted[1:] != key_sorted[:-1]
    starts = xp.nonzero(new)
    sizes = xp.diff_to(starts, n)
    gidx = xp.cumsum(new) - 1
    rank = xp.arange(n) - xp.take(starts, gidx)
    return _Segments(starts, sizes, gidx, rank)


def _chunks(xp: Backend, sizes: Array, ratio: bool, min_size: int = 1) -> List[Tuple[Array, np.ndarray]]:
    """Groups of at least ``min_size`` in decreasing size, cut in chunks of at most ``_SLOTS`` dense slots (and,
    with ``ratio``, of sizes within a factor 2 when the largest is above 8 and the chunk is not small):
    ``[(group ids, their sizes), ...]``."""
    sizes_np = xp.numpy(sizes)
    perm = np.argsort(-sizes_np, kind="stable")
    ss = sizes_np[perm]
    out = []
    a, g = 0, int(np.searchsorted(-ss, -min_size, side="right"))
    while a < g:
        s = int(ss[a])
        b = min(g, a + max(1, _SLOTS // max(s, 1)))
        if ratio and s > 8 and (b - a) * s > _SMALL_CHUNK:
            b = min(b, max(a + 1, int(np.searchsorted(-ss, -(s / 2.0), side="left"))))
        out.append((xp.asarray(perm[a:b]), ss[a:b]))
        a = b
    return out


def _active(ss: np.ndarray, steps: int) -> List[int]:
    """``[number of groups with size > j for j in range(steps)]`` for sizes sorted in decreasing order."""
    return np.searchsorted(-ss, -np.arange(steps), side="left").tolist()


def _chunk_layout(xp: Backend, starts: Array, ss: np.ndarray, groups: Array) -> Tuple[Array, Array, int]:
    """Dense ``[Gc, S]`` sorted positions of a chunk of groups (0 past a group's end) and the validity mask."""
    s = int(ss[0])
    ar = xp.arange(s)
    valid = ar[None, :] < xp.asarray(ss)[:, None]
    pos = xp.where(valid, xp.take(starts, groups)[:, None] + ar[None, :], 0)
    return pos, valid, s


def _pair_key(xp: Backend, img: Array, lab: Array, n_images: int) -> Array:
    """An int64 key ordering ``(image, label)`` pairs lexicographically."""
    if lab.shape[0] == 0:
        return lab
    lo = int(lab.min())
    span = int(lab.max()) - lo + 1
    if n_images * span < 2 ** 40:
        return img * span + (lab - lo)
    return xp.unique_rows_inverse(xp.stack([img, lab], 1))
