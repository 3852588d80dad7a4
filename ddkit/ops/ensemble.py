"""Ensembling of object detections: weighted boxes fusion, NMS, soft-NMS, non-maximum weighted and box voting.

Two layers:

* **Drop-in functions** with the names, signatures and semantics of ``ensemble_boxes`` 1.0.9 for one image
  (:func:`weighted_boxes_fusion`, :func:`nms`, :func:`soft_nms`, :func:`nms_method`, :func:`non_maximum_weighted`):
  inputs are per-model lists of normalized ``[0, 1]`` boxes, scores and labels (numpy arrays, lists or tensors),
  outputs are numpy arrays. They return the same boxes in the same order as ``ensemble_boxes`` (ties included: where
  ``ensemble_boxes`` sorts with ``numpy.argsort`` or numba's quicksort we call the same sort on the same values), with
  coordinates and scores equal to float rounding. Their ``*_batch`` twins take a list of per-image
  ``(boxes_list, scores_list, labels_list)`` tuples, process all images at once (CPU or CUDA tensors; no Python loop
  over boxes) and return exactly what the one-image functions return for each image.
* **Tensor cores** (:func:`wbf_tensor`, :func:`nmw_tensor`, :func:`nms_tensor`, :func:`soft_nms_tensor`,
  :func:`box_voting_tensor`) for one image in any coordinate system (pixels, no clipping), on the tensor's device.
  To process several images in one call, give every ``(image, label)`` pair its own label, as with the ``idxs`` of
  :func:`torchvision.ops.batched_nms`.

Deliberate differences from ``ensemble_boxes`` (everything else is reproduced, including its quirks: clipping to
``[0, 1]`` and swapping of reversed corners in the drop-ins, ``allows_overflow=False`` not bounding scores by 1 when
weights differ, soft-NMS returning the *input* scores of the boxes it keeps):

* bad arguments raise :class:`ValueError` naming the argument instead of printing and calling ``exit()`` (unknown
  ``conf_type``) or silently replacing them (wrong number of ``weights``); thresholds are checked (``iou_thr`` in
  ``[0, 1]``, ``sigma > 0``, ``method`` in ``{1, 2, 3}``), weights must be finite, non-negative, with a positive sum;
  NaN boxes or scores are rejected;
* inputs are never modified (``ensemble_boxes.nms`` with ``weights`` rescales the caller's ``scores`` list in place);
* empty input (no model, no box, or nothing left after filtering) returns empty arrays of shapes ``[0, 4]``, ``[0]``,
  ``[0]`` where ``ensemble_boxes`` crashes (``nms``, ``soft_nms``, ``non_maximum_weighted`` without models);
* a cluster whose boxes all have zero weighted score (zero model weight or zero score) keeps the coordinates of its
  first box where ``ensemble_boxes`` computes ``0 / 0 = NaN`` coordinates (after which it merges every later box of
  that label into the NaN cluster); with ``conf_type='box_and_model_avg'`` such a cluster scores 0, not NaN;
* the one warning per fixed box of ``ensemble_boxes`` becomes one summary warning per call;
* integer boxes or scores are returned as float64;
* for float32 inputs, NMS computes IoUs in float64 (``ensemble_boxes`` mixes float32 and float64 inside numba), so a
  keep/suppress decision can differ only for an IoU within ~1e-7 of ``iou_thr``. Gaussian soft-NMS on CUDA uses
  ``torch.exp`` (on the CPU we call ``numpy.exp`` like ``ensemble_boxes``), which may differ in the last bit.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .boxes import order_box_corners

__all__ = [
    "weighted_boxes_fusion", "nms", "soft_nms", "nms_method", "non_maximum_weighted",
    "weighted_boxes_fusion_batch", "nms_batch", "soft_nms_batch", "non_maximum_weighted_batch",
    "wbf_tensor", "nmw_tensor", "nms_tensor", "soft_nms_tensor", "box_voting_tensor",
]

CONF_TYPES: Tuple[str, ...] = ("avg", "max", "box_and_model_avg", "absent_model_aware_avg")

#: One image: per-model lists of boxes ``[N_m, 4]``, scores ``[N_m]`` and labels ``[N_m]``.
ImageInput = Tuple[Sequence[Any], Sequence[Any], Sequence[Any]]
#: One image's result: boxes ``[K, 4]``, scores ``[K]``, labels ``[K]`` (numpy).
Result = Tuple[np.ndarray, np.ndarray, np.ndarray]
Weights = Optional[Union[Sequence[float], np.ndarray, Tensor]]
Device = Optional[Union[str, torch.device]]

_F64 = torch.float64
_SLOTS = 1 << 20          # dense (group x rank) slots per chunk of the sequential loops
_PAIRS = 1 << 22          # candidate pairs per chunk of the pairwise IoU computation
_SMALL_QUICKSORT = 15     # numba's quicksort switches to insertion sort below this size


# ----------------------------------------------------------------------------------------------- argument checks
def _real(name: str, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if math.isnan(v):
        raise ValueError(f"{name} must be a real number, got NaN")
    return v


def _unit(name: str, value: Any) -> float:
    v = _real(name, value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return v


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _conf_type(value: Any) -> str:
    if not isinstance(value, str) or value not in CONF_TYPES:
        raise ValueError(f"conf_type must be one of {', '.join(map(repr, CONF_TYPES))}; got {value!r}")
    return value


def _method(value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or int(value) not in (1, 2, 3):
        raise ValueError(f"method must be 1 (linear soft-NMS), 2 (gaussian soft-NMS) or 3 (NMS), got {value!r}")
    return int(value)


def _sigma(value: Any) -> float:
    v = _real("sigma", value)
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"sigma must be a positive number, got {value!r}")
    return v


def _weights(weights: Weights, n_models: np.ndarray) -> Optional[np.ndarray]:
    """``np.array(weights)`` (dtype kept, as ``ensemble_boxes`` does) after checking it; ``None`` stays ``None``."""
    if weights is None:
        return None
    if isinstance(weights, Tensor):
        weights = weights.detach().cpu().numpy()
    try:
        w = np.array(weights)
    except (TypeError, ValueError):
        raise ValueError(f"weights must be a list of numbers, got {weights!r}") from None
    if w.ndim != 1 or w.dtype.kind not in "biuf":
        raise ValueError(f"weights must be a 1-D list of numbers, got {weights!r}")
    if w.dtype.kind == "b":
        w = w.astype(np.int64)
    bad = np.nonzero(n_models != len(w))[0]
    if len(bad):
        where = f"batch[{bad[0]}] has" if len(n_models) > 1 else "boxes_list has"
        raise ValueError(f"weights must have one entry per model: got {len(w)} weights but {where} "
                         f"{n_models[bad[0]]} models")
    if len(w):
        wf = w.astype(np.float64)
        if not np.isfinite(wf).all() or (wf < 0).any():
            raise ValueError(f"weights must be finite and non-negative, got {weights!r}")
        if not wf.sum() > 0:
            raise ValueError(f"weights must not all be zero, got {weights!r}")
    return w


def _torch_float(np_dtype: np.dtype) -> torch.dtype:
    return {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}.get(np.dtype(np_dtype), _F64)


# ----------------------------------------------------------------------------------------------------- inputs
@dataclass
class _Batch:
    boxes: Tensor       # [N, 4] as given (concatenated dtype)
    scores: Tensor      # [N]
    labels: Tensor      # [N]
    model: Tensor       # [N] int64
    img: Tensor         # [N] int64
    n_images: int
    n_models: np.ndarray  # [n_images]
    labels_dtype: np.dtype
    device: torch.device


def _as_array(x: Any, what: str) -> Union[np.ndarray, Tensor]:
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, Tensor):
        return x.detach()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} could not be converted to an array: {e}") from None


def _numel(x: Union[np.ndarray, Tensor]) -> int:
    return x.numel() if isinstance(x, Tensor) else int(x.size)


def _length(x: Any, what: str) -> int:
    try:
        n = len(x)
    except TypeError:
        n = -1
    if n < 0 or isinstance(x, (str, bytes, dict)) or not hasattr(x, "__getitem__"):
        raise ValueError(f"{what} must be a list with one entry per model, got {type(x).__name__}")
    return n


def _model_arrays(b: Any, s: Any, lab: Any, i: int, t: int, single: bool
                  ) -> Tuple[Union[np.ndarray, Tensor], Union[np.ndarray, Tensor], Union[np.ndarray, Tensor]]:
    """Convert and check one model's boxes [N, 4], scores [N] and labels [N] (the slow path of _collect)."""
    pre = "" if single else f"batch[{i}]: "
    b = _as_array(b, f"{pre}boxes_list[{t}]")
    s = _as_array(s, f"{pre}scores_list[{t}]")
    lab = _as_array(lab, f"{pre}labels_list[{t}]")
    if b.ndim != 2 or b.shape[1] != 4:
        if _numel(b) == 0:
            b = b.reshape(0, 4)
        else:
            raise ValueError(f"{pre}boxes_list[{t}] must have shape [N, 4], got {tuple(b.shape)}")
    n = b.shape[0]
    for name, x in (("scores_list", s), ("labels_list", lab)):
        if x.ndim == 0:
            raise ValueError(f"{pre}{name}[{t}] must have shape [N], got a scalar")
        k = x.shape[0] if x.ndim == 1 else _numel(x)
        if k != n:
            raise ValueError(f"{pre}{name}[{t}] has {k} entries but boxes_list[{t}] has {n} boxes")
    return b, s.reshape(-1), lab.reshape(-1)


def _collect(batch: Any, device: Device, single: bool) -> _Batch:
    """Validate and concatenate a batch of per-image, per-model inputs (in scan order: image, model, box)."""
    if not isinstance(batch, (list, tuple)):
        raise ValueError(f"batch must be a list of (boxes_list, scores_list, labels_list) tuples, "
                         f"got {type(batch).__name__}")
    parts_b: List[Any] = []
    parts_s: List[Any] = []
    parts_l: List[Any] = []
    counts: List[int] = []
    n_models = np.zeros(len(batch), dtype=np.int64)
    tensor_device = None
    nd = np.ndarray
    for i, item in enumerate(batch):
        if not isinstance(item, (tuple, list)) or len(item) != 3:
            raise ValueError(f"batch[{i}] must be a (boxes_list, scores_list, labels_list) tuple")
        bl, sl, ll = item
        pre = "" if single else f"batch[{i}]: "
        m = _length(bl, pre + "boxes_list")
        for name, seq in (("scores_list", sl), ("labels_list", ll)):
            k = _length(seq, pre + name)
            if k != m:
                raise ValueError(f"{pre}{name} has {k} entries but boxes_list has {m} (one per model)")
        n_models[i] = m
        for t in range(m):
            b, s, lab = bl[t], sl[t], ll[t]
            if not (type(b) is nd and type(s) is nd and type(lab) is nd and b.ndim == 2 and b.shape[1] == 4
                    and s.ndim == 1 and lab.ndim == 1 and s.shape[0] == b.shape[0] == lab.shape[0]):
                b, s, lab = _model_arrays(b, s, lab, i, t, single)
                if tensor_device is None:
                    for x in (b, s, lab):
                        if isinstance(x, Tensor):
                            tensor_device = x.device
                            break
            parts_b.append(b)
            parts_s.append(s)
            parts_l.append(lab)
            counts.append(b.shape[0])
    pair_img = np.repeat(np.arange(len(batch), dtype=np.int64), n_models)
    pair_model = np.arange(len(counts), dtype=np.int64) - np.repeat(np.cumsum(n_models) - n_models, n_models)
    dev = torch.device(device) if device is not None else (tensor_device or torch.device("cpu"))
    if tensor_device is None:
        cat_np = []
        for name, parts, shape in (("boxes_list", parts_b, (0, 4)), ("scores_list", parts_s, (0,)),
                                   ("labels_list", parts_l, (0,))):
            try:
                x = np.concatenate(parts) if parts else np.zeros(shape)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{name} must hold numbers: {e}") from None
            if x.dtype.kind not in "biuf":
                raise ValueError(f"{name} must hold numbers, got dtype {x.dtype}")
            cat_np.append(x)
        nb, ns, nl = cat_np
        labels_dtype = nl.dtype
        if nb.dtype.kind != "f" or nb.dtype == np.float16:
            nb = nb.astype(np.float64)
        if ns.dtype.kind != "f" or ns.dtype == np.float16:
            ns = ns.astype(np.float64)
        if nl.dtype.kind == "b":
            nl = nl.astype(np.int64)
        tb, ts, tl = (torch.from_numpy(np.ascontiguousarray(a)).to(dev) for a in (nb, ns, nl))
    else:
        def cat(parts: List[Any], shape: Tuple[int, ...]) -> Tensor:
            ts_ = [p if isinstance(p, Tensor) else torch.from_numpy(np.ascontiguousarray(p)) for p in parts]
            ts_ = [p.to(dev) for p in ts_]
            for p in ts_:
                if p.is_complex():
                    raise ValueError("inputs must hold real numbers")
            return torch.cat(ts_) if ts_ else torch.zeros(shape, dtype=_F64, device=dev)
        tb, ts, tl = cat(parts_b, (0, 4)), cat(parts_s, (0,)), cat(parts_l, (0,))
        labels_dtype = torch.empty(0, dtype=tl.dtype).numpy().dtype
        if not tb.is_floating_point() or tb.dtype in (torch.float16, torch.bfloat16):
            tb = tb.to(_F64)
        if not ts.is_floating_point() or ts.dtype in (torch.float16, torch.bfloat16):
            ts = ts.to(_F64)
        if tl.dtype == torch.bool:
            tl = tl.long()
    if tb.numel() and torch.isnan(tb).any():
        raise ValueError("boxes_list contains NaN coordinates")
    if ts.numel() and torch.isnan(ts).any():
        raise ValueError("scores_list contains NaN scores")
    if tl.is_floating_point() and tl.numel() and not torch.isfinite(tl).all():
        raise ValueError("labels_list contains NaN or infinite labels")
    cnt = np.asarray(counts, dtype=np.int64)
    img = torch.from_numpy(np.repeat(pair_img, cnt)).to(dev)
    model = torch.from_numpy(np.repeat(pair_model, cnt)).to(dev)
    return _Batch(tb, ts, tl, model, img, len(batch), n_models, np.dtype(labels_dtype), dev)


def _tensor_batch(boxes: Tensor, scores: Tensor, labels: Tensor, model_idx: Optional[Tensor] = None,
                  n_models: Optional[int] = None) -> _Batch:
    """Inputs of the tensor cores (one image) as a one-image batch."""
    for name, x in (("boxes", boxes), ("scores", scores), ("labels", labels)):
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape [N, 4], got {tuple(boxes.shape)}")
    n = boxes.shape[0]
    for name, x in (("scores", scores), ("labels", labels)):
        if x.dim() != 1 or x.shape[0] != n:
            raise ValueError(f"{name} must have shape [N] = [{n}], got {tuple(x.shape)}")
    dev = boxes.device
    if model_idx is None:
        model = torch.zeros(n, dtype=torch.long, device=dev)
        m = 1 if n_models is None else int(n_models)
    else:
        if not isinstance(model_idx, Tensor) or model_idx.dim() != 1 or model_idx.shape[0] != n:
            raise ValueError(f"model_idx must be a tensor of shape [N] = [{n}]")
        if model_idx.is_floating_point() or model_idx.is_complex():
            raise ValueError("model_idx must hold integers")
        model = model_idx.detach().to(dev).long()
        m = int(n_models) if n_models is not None else (int(model.max()) + 1 if n else 0)
        if n and (int(model.min()) < 0 or int(model.max()) >= m):
            raise ValueError(f"model_idx must be in [0, n_models) = [0, {m})")
    tb = boxes.detach()
    ts = scores.detach().to(dev)
    tl = labels.detach().to(dev)
    if not tb.is_floating_point():
        tb = tb.to(_F64)
    if not ts.is_floating_point():
        ts = ts.to(_F64)
    if n and torch.isnan(tb).any():
        raise ValueError("boxes contains NaN coordinates")
    if n and torch.isnan(ts).any():
        raise ValueError("scores contains NaN")
    if tl.is_floating_point() and n and not torch.isfinite(tl).all():
        raise ValueError("labels contains NaN or infinite values")
    return _Batch(tb, ts, tl, model, torch.zeros(n, dtype=torch.long, device=dev), 1, np.array([m]),
                  np.dtype(np.int64), dev)


# ------------------------------------------------------------------------------------------ tensor primitives
# torch's advanced indexing (x[idx], x[mask], x[idx] = v) is slow on the CPU: every hot path uses these instead.
def _take(x: Tensor, idx: Tensor) -> Tensor:
    return torch.index_select(x, 0, idx)


def _nz(mask: Tensor) -> Tensor:
    """int64 indices of the true entries of a 1-D mask."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return torch.nonzero(mask).squeeze(1)


def _compress(x: Tensor, mask: Tensor) -> Tensor:
    return _take(x, _nz(mask))


def _repeat(values: Tensor, counts: Tensor, total: int) -> Tensor:
    if values.device.type == "cpu":
        return torch.from_numpy(np.repeat(values.numpy(), counts.numpy()))
    return torch.repeat_interleave(values, counts, output_size=total)


def _argsort(x: Tensor, stable: bool = False) -> Tensor:
    """Ascending argsort; numpy on the CPU (faster than torch.sort there), torch.sort elsewhere."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.argsort(x.numpy(), kind="stable" if stable else "quicksort"))
    return torch.sort(x, stable=stable).indices


# ------------------------------------------------------------------------------------------- sorting helpers
def _dense_key(key: Tensor, n: int) -> Tensor:
    """A non-negative int64 key with ``(key.max() + 1) * n`` safely below 2**63 (same order)."""
    if key.numel() == 0:
        return key
    lo, hi = int(key.min()), int(key.max())
    if lo >= 0 and (hi + 1) * max(n, 1) < 2 ** 62:
        return key
    if (hi - lo + 1) * max(n, 1) < 2 ** 62:
        return key - lo
    return torch.unique(key, return_inverse=True)[1]


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


def _group_order(key: Tensor, score: Tensor, tie: str, tie_values: Optional[np.ndarray] = None) -> Tensor:
    """Permutation sorting by ``key`` ascending, then ``score`` descending.

    ``tie`` says how equal ``(key, score)`` are ordered, the inputs being in their natural (scan) order:
    ``"stable"``: by index; ``"numpy"``: the whole group is ordered by ``np.argsort(tie_values[group])[::-1]`` (what
    ``ensemble_boxes`` does, tie order included); ``"numba"``: likewise with numba's quicksort; ``"any"``: arbitrary.
    """
    n = key.numel()
    dev = key.device
    if n <= 1:
        return torch.arange(n, device=dev)
    key = _dense_key(key, n)
    r = _argsort(score)
    drank = torch.empty_like(r).index_copy_(0, r, torch.arange(n - 1, -1, -1, device=dev))
    order = _argsort(key * n + drank)
    if tie == "any":
        return order
    ks, ss = _take(key, order), _take(score, order)
    eq = (ss[1:] == ss[:-1]) & (ks[1:] == ks[:-1])
    if not bool(eq.any()):
        return order
    if tie == "stable":
        start = torch.ones(n, dtype=torch.bool, device=dev)
        start[1:] = ~eq
        run = torch.cumsum(start, 0)
        return _take(order, _argsort(run * n + order))
    ks_np = ks.cpu().numpy()
    tied = np.unique(ks_np[1:][eq.cpu().numpy()])
    order_np = order.cpu().numpy().copy()
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
    return torch.from_numpy(order_np).to(dev)


def _stable_key_order(key: Tensor) -> Tensor:
    """Stable ascending argsort of an integer key (made unique with the index, so a quicksort is stable)."""
    n = key.numel()
    if n <= 1:
        return torch.arange(n, device=key.device)
    key = _dense_key(key, n)
    return _argsort(key * n + torch.arange(n, device=key.device))


@dataclass
class _Segments:
    starts: Tensor   # [G] first sorted position of every group
    sizes: Tensor    # [G]
    gidx: Tensor     # [N] group of every sorted position
    rank: Tensor     # [N] rank inside its group


def _segments(key_sorted: Tensor) -> _Segments:
    n = key_sorted.numel()
    dev = key_sorted.device
    new = torch.ones(n, dtype=torch.bool, device=dev)
    if n > 1:
        new[1:] = key_sorted[1:] != key_sorted[:-1]
    starts = _nz(new).to(dev)
    sizes = torch.diff(starts, append=torch.tensor([n], device=dev))
    gidx = torch.cumsum(new, 0) - 1
    rank = torch.arange(n, device=dev) - _take(starts, gidx)
    return _Segments(starts, sizes, gidx, rank)


def _chunks(sizes: Tensor, ratio: bool) -> List[Tuple[Tensor, np.ndarray]]:
    """Groups in decreasing size, cut in chunks of at most ``_SLOTS`` dense slots (and, with ``ratio``, of sizes
    within a factor 2 when the largest is above 8): ``[(group ids, their sizes), ...]``."""
    sizes_np = sizes.cpu().numpy()
    perm = np.argsort(-sizes_np, kind="stable")
    ss = sizes_np[perm]
    perm_t = torch.from_numpy(perm).to(sizes.device)
    out = []
    a, g = 0, len(ss)
    while a < g:
        s = int(ss[a])
        b = min(g, a + max(1, _SLOTS // max(s, 1)))
        if ratio and s > 8:
            b = min(b, max(a + 1, int(np.searchsorted(-ss, -(s / 2.0), side="left"))))
        out.append((perm_t[a:b], ss[a:b]))
        a = b
    return out


def _active(ss: np.ndarray, steps: int) -> List[int]:
    """``[number of groups with size > j for j in range(steps)]`` for sizes sorted in decreasing order."""
    return np.searchsorted(-ss, -np.arange(steps), side="left").tolist()


def _dense(starts: Tensor, ss: np.ndarray, groups: Tensor) -> Tuple[Tensor, Tensor, int]:
    """Dense ``[Gc * S]`` sorted positions (0 past a group's end) and validity mask, flattened row-major."""
    dev = starts.device
    s = int(ss[0])
    ar = torch.arange(s, device=dev)
    sz = torch.from_numpy(ss).to(dev)
    valid = ar[None, :] < sz[:, None]
    pos = torch.where(valid, _take(starts, groups)[:, None] + ar[None, :], 0)
    return pos.reshape(-1), valid.reshape(-1), s


# ----------------------------------------------------------------------------------------------- IoU helpers
def _areas(c: Tensor) -> Tensor:
    return (c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1])


def _pair_edges(coords: Tensor, area: Tensor, seg: _Segments, thr: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Every pair ``(i, j)`` of sorted positions of one group with ``i`` before ``j`` and
    ``IoU = inter / (area_i + area_j - inter) > thr``: ``(i, j, iou)``."""
    dev = coords.device
    n = coords.shape[0]
    empty = torch.zeros(0, dtype=torch.long, device=dev)
    none = (empty, empty, torch.zeros(0, dtype=coords.dtype, device=dev))
    if n == 0:
        return none
    rank = seg.rank
    cum = torch.cumsum(rank, 0)
    cum_np = cum.cpu().numpy()
    total = int(cum_np[-1])
    if total == 0:
        return none
    x1, y1, x2, y2 = (coords[:, k].contiguous() for k in range(4))
    gstart = _take(seg.starts, seg.gidx)
    bounds = [0] + np.searchsorted(cum_np, np.arange(_PAIRS, total, _PAIRS), side="left").tolist() + [n]
    out_i, out_j, out_v = [], [], []
    for ja, jb in zip(bounds[:-1], bounds[1:]):
        if jb <= ja:
            continue
        r = rank[ja:jb]
        p = int(cum_np[jb - 1] - (cum_np[ja - 1] if ja else 0))
        if p == 0:
            continue
        jj = _repeat(torch.arange(ja, jb, device=dev), r, p)
        ii = _repeat(gstart[ja:jb] - (torch.cumsum(r, 0) - r), r, p) + torch.arange(p, device=dev)
        xa = torch.maximum(_take(x1, ii), _take(x1, jj))
        ya = torch.maximum(_take(y1, ii), _take(y1, jj))
        xb = torch.minimum(_take(x2, ii), _take(x2, jj))
        yb = torch.minimum(_take(y2, ii), _take(y2, jj))
        inter = (xb - xa).clamp_(min=0).mul_((yb - ya).clamp_(min=0))
        iou = inter / (_take(area, ii) + _take(area, jj) - inter)
        m = _nz(iou > thr)
        out_i.append(_take(ii, m))
        out_j.append(_take(jj, m))
        out_v.append(_take(iou, m))
    if not out_i:
        return none
    return torch.cat(out_i), torch.cat(out_j), torch.cat(out_v)


def _greedy_keep(n: int, ei: Tensor, ej: Tensor, device: torch.device) -> Tensor:
    """Greedy NMS on a DAG of suppression edges ``ei -> ej`` (``ei`` earlier): a box is kept iff no kept box has an
    edge to it. Resolved layer by layer (no loop over boxes)."""
    state = torch.zeros(n, dtype=torch.int8, device=device)   # 0 undecided, 1 kept, 2 suppressed
    blocked = torch.zeros(n, dtype=torch.bool, device=device).index_fill_(0, ej, True)
    state.masked_fill_(~blocked, 1)
    while ei.numel():
        hit = torch.zeros(n, dtype=torch.bool, device=device)
        hit.index_fill_(0, _compress(ej, _take(state, ei) == 1), True)
        state.masked_fill_(hit & (state == 0), 2)
        live = _nz((_take(state, ej) == 0) & (_take(state, ei) != 2))
        ei, ej = _take(ei, live), _take(ej, live)
        blocked = torch.zeros(n, dtype=torch.bool, device=device).index_fill_(0, ej, True)
        state.masked_fill_((state == 0) & ~blocked, 1)
    return state == 1


def _seq_accumulate(coords: Tensor, wgt: Tensor, starts: Tensor, sizes: Tensor) -> Tuple[Tensor, Tensor]:
    """Per segment of consecutive rows, ``acc = float32(acc + w * c)`` and ``conf = conf + w`` row after row, as
    ``ensemble_boxes`` accumulates a fused box in a float32 array: ``(acc [K, 4] float32, conf [K] float64)``."""
    dev = coords.device
    k = sizes.numel()
    if k == 0:
        return torch.zeros((0, 4), dtype=torch.float32, device=dev), torch.zeros(0, dtype=_F64, device=dev)
    sizes_np = sizes.cpu().numpy()
    perm = np.argsort(-sizes_np, kind="stable")
    ss = sizes_np[perm]
    perm_t = torch.from_numpy(perm).to(dev)
    st = _take(starts, perm_t)
    a_acc = torch.zeros((k, 4), dtype=torch.float32, device=dev)
    a_conf = torch.zeros(k, dtype=_F64, device=dev)
    for r, a in enumerate(_active(ss, int(ss[0]))):
        rows = st[:a] + r
        w = _take(wgt, rows)
        a_acc[:a] = (a_acc[:a].to(_F64) + w[:, None] * _take(coords, rows)).float()
        a_conf[:a] = a_conf[:a] + w
    acc = torch.empty_like(a_acc).index_copy_(0, perm_t, a_acc)
    conf = torch.empty_like(a_conf).index_copy_(0, perm_t, a_conf)
    return acc, conf


def _exp(x: Tensor) -> Tensor:
    if x.device.type == "cpu":
        return torch.from_numpy(np.exp(x.numpy()))
    return torch.exp(x)


def _split(img: Tensor, n_images: int, arrays: Sequence[Tensor]) -> List[List[np.ndarray]]:
    """Split image-sorted result tensors into per-image numpy arrays."""
    counts = torch.bincount(img, minlength=n_images).cpu().numpy() if img.numel() else np.zeros(n_images, np.int64)
    ends = np.cumsum(counts).tolist()
    starts = [0] + ends[:-1]
    nps = [a.cpu().numpy() for a in arrays]
    return [[a[i:j] for a in nps] for i, j in zip(starts, ends)]


def _warn(fn: str, swapped: int, clipped: int, zero: int) -> None:
    if swapped:
        warnings.warn(f"{fn}: {swapped} boxes had x2 < x1 or y2 < y1; their corners were swapped", stacklevel=4)
    if clipped:
        warnings.warn(f"{fn}: {clipped} box coordinates were outside [0, 1] and were clipped (normalize the boxes "
                      f"to [0, 1])", stacklevel=4)
    if zero:
        warnings.warn(f"{fn}: {zero} zero-area boxes were skipped", stacklevel=4)


# ------------------------------------------------------------------------------------- fusion (WBF and NMW)
@dataclass
class _Fusion:
    coords: Tensor   # [n, 4] float64, corners ordered (and clipped for the drop-ins)
    b1: Tensor       # [n] float64 weighted score
    wv: Tensor       # [n] float64 model weight
    model: Tensor    # [n]
    lab: Tensor      # [n] int64
    img: Tensor      # [n]
    scan: Tensor     # [n] position in the input (scan order)


def _fusion_inputs(bt: _Batch, wn: Optional[np.ndarray], thr: float, clip: bool, fn: Optional[str]) -> _Fusion:
    """``prefilter_boxes`` of ensemble_boxes, vectorized: drop scores < thr, swap reversed corners, clip to [0, 1]
    (drop-ins), drop zero-area boxes, weight the scores (``float(score) * weights[t]``, in numpy's dtypes)."""
    dev = bt.device
    sc = bt.scores
    keep = ~(sc < thr)
    c = bt.boxes.to(_F64)
    oc = order_box_corners(c)
    out = None
    if clip:
        out = (oc < 0) | (oc > 1)
        oc = oc.clamp(0, 1)
    zero = _areas(oc) == 0
    if fn is not None and c.numel():
        swapped = int((keep & ((c[:, 2] < c[:, 0]) | (c[:, 3] < c[:, 1]))).sum())
        clipped = int((keep[:, None] & out).sum()) if out is not None else 0
        _warn(fn, swapped, clipped, int((keep & zero).sum()))
    idx = _nz(keep & ~zero)
    lab = _take(bt.labels, idx)
    if lab.is_floating_point():
        lab = torch.trunc(lab)
    lab = lab.long()
    model = _take(bt.model, idx)
    s = _take(sc, idx).to(_F64)
    if wn is None:
        b1, wv = s, torch.ones_like(s)
    else:
        wv = _take(torch.from_numpy(wn.astype(np.float64)).to(dev), model)
        cdt = _torch_float(np.result_type(1.0, wn.dtype))
        b1 = (s.to(cdt) * wv.to(cdt)).to(_F64)
    return _Fusion(_take(oc, idx), b1, wv, model, lab, _take(bt.img, idx), idx)


def _pair_key(img: Tensor, lab: Tensor, n_images: int) -> Tensor:
    """An int64 key ordering ``(image, label)`` pairs lexicographically."""
    if lab.numel() == 0:
        return lab.long()
    lo = int(lab.min())
    span = int(lab.max()) - lo + 1
    if n_images * span < 2 ** 40:
        return img * span + (lab - lo)
    return torch.unique(torch.stack([img, lab], 1), dim=0, return_inverse=True)[1]


def _fusion_groups(fu: _Fusion, n_images: int, tie: str) -> Tuple[_Fusion, _Segments, Tensor]:
    """Sort by (image, label) then weighted score descending (ties as ``tie``); returns the sorted inputs, their
    groups, and per group the scan position of its first box (the label's position in ensemble_boxes' dict)."""
    key = _pair_key(fu.img, fu.lab, n_images)
    tv = fu.b1.cpu().numpy() if tie in ("numpy", "numba") else None
    order = _group_order(key, fu.b1, tie, tv)
    s = _Fusion(*(_take(getattr(fu, f), order) for f in ("coords", "b1", "wv", "model", "lab", "img", "scan")))
    seg = _segments(_take(key, order))
    first = torch.zeros(seg.sizes.numel(), dtype=torch.long, device=key.device)
    first = first.scatter_reduce(0, seg.gidx, s.scan, reduce="amin", include_self=False)
    return s, seg, first


def _final_order(img: Tensor, score: Tensor, concat: Tensor, tie: str, np_dtype: type) -> Tensor:
    """Order clusters by image, then score descending; ties as ``np.argsort(scores)[::-1]`` on the image's
    clusters in ``concat`` order (``tie="numpy"``) or by ``concat`` order (``"stable"``)."""
    pre = _stable_key_order(concat)
    sc = _take(score, pre)
    tv = sc.cpu().numpy().astype(np_dtype) if tie == "numpy" else None
    return _take(pre, _group_order(_take(img, pre), sc, tie, tv))


def _wbf_assign(fu: _Fusion, seg: _Segments, thr: float, need_ws: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The sequential greedy clustering of WBF, all groups at once: one loop step per rank, not per box.

    Step ``j`` takes the ``j``-th box of every group, computes its IoU with the group's current fused boxes, and
    joins the best one if its IoU is ``> thr`` (first one on ties) or opens a cluster; the fused box is updated as
    ensemble_boxes does (float32 accumulation of ``score * box``, divided by the float64 summed score).

    Returns per sorted position the position of its cluster's first box (``seed``), and per seed position the fused
    box, the summed weighted score and the summed model weight."""
    coords, b1, wv = fu.coords, fu.b1, fu.wv
    n = coords.shape[0]
    dev = coords.device
    seed_of = torch.empty(n, dtype=torch.long, device=dev)
    f_out = torch.empty((n, 4), dtype=_F64, device=dev)
    conf_out = torch.empty(n, dtype=_F64, device=dev)
    ws_out = torch.empty(n, dtype=_F64, device=dev)
    if n == 0:
        return seed_of, f_out, conf_out, ws_out
    for groups, ss in _chunks(seg.sizes, ratio=True):
        pflat, vflat, s = _dense(seg.starts, ss, groups)
        gc = len(ss)
        cc = _take(coords, pflat).view(gc, s, 4)
        bb = _take(b1, pflat).view(gc, s)
        ww = _take(wv, pflat).view(gc, s) if need_ws else None
        area_c = (cc[..., 2] - cc[..., 0]) * (cc[..., 3] - cc[..., 1])
        ft = torch.zeros((4, gc * s), dtype=_F64, device=dev)      # fused boxes, coordinate-major
        f4 = ft.view(4, gc, s)
        area = torch.zeros(gc * s, dtype=_F64, device=dev)
        area2 = area.view(gc, s)
        acc = torch.zeros((gc * s, 4), dtype=torch.float32, device=dev)
        conf = torch.zeros(gc * s, dtype=_F64, device=dev)
        wsum = torch.zeros(gc * s, dtype=_F64, device=dev) if need_ws else conf
        notseed = torch.ones((gc, s), dtype=torch.bool, device=dev)
        asg = torch.zeros((gc, s), dtype=torch.long, device=dev)
        row_base = torch.arange(gc, device=dev) * s
        for j, a in enumerate(_active(ss, s)):
            c = cc[:a, j]
            sc = bb[:a, j]
            if j == 0:
                join = torch.zeros(a, dtype=torch.bool, device=dev)
                slot = torch.zeros(a, dtype=torch.long, device=dev)
            else:
                xa = torch.maximum(f4[0, :a, :j], c[:, 0:1])
                ya = torch.maximum(f4[1, :a, :j], c[:, 1:2])
                xb = torch.minimum(f4[2, :a, :j], c[:, 2:3])
                yb = torch.minimum(f4[3, :a, :j], c[:, 3:4])
                inter = (xb - xa).clamp_(min=0).mul_((yb - ya).clamp_(min=0))
                iou = inter / (area2[:a, :j] + area_c[:a, j:j + 1] - inter)
                iou.masked_fill_(notseed[:a, :j], -1.0)
                best_iou, best = iou.max(1)
                join = best_iou > thr
                slot = torch.where(join, best, j)
            asg[:a, j] = slot
            notseed[:a, j] = join
            fidx = row_base[:a] + slot
            new_acc = (_take(acc, fidx).to(_F64) + sc[:, None] * c).float()
            acc.index_copy_(0, fidx, new_acc)
            new_conf = _take(conf, fidx) + sc
            conf.index_copy_(0, fidx, new_conf)
            if need_ws:
                wsum.index_copy_(0, fidx, _take(wsum, fidx) + ww[:a, j])
            avg = (new_acc.to(_F64) / new_conf[:, None]).float().to(_F64)
            avg = torch.where((new_conf == 0)[:, None], torch.index_select(ft, 1, fidx).t(), avg)
            new_f = torch.where(join[:, None], avg, c)
            ft.index_copy_(1, fidx, new_f.t())
            area.index_copy_(0, fidx, (new_f[:, 2] - new_f[:, 0]) * (new_f[:, 3] - new_f[:, 1]))
        vidx = _nz(vflat)
        seed_flat = torch.gather(pflat.view(gc, s), 1, asg).reshape(-1)
        seed_of.index_copy_(0, _take(pflat, vidx), _take(seed_flat, vidx))
        sidx = _nz(~notseed.reshape(-1) & vflat)
        ps = _take(pflat, sidx)
        f_out.index_copy_(0, ps, torch.index_select(ft, 1, sidx).t())
        conf_out.index_copy_(0, ps, _take(conf, sidx))
        if need_ws:
            ws_out.index_copy_(0, ps, _take(wsum, sidx))
    return seed_of, f_out, conf_out, ws_out


def _model_sums(presence: Tensor, wn: Optional[np.ndarray], m_img: Tensor) -> Tuple[Tensor, Tensor]:
    """Per cluster: the summed weight of the models present (``clustered_boxes[idx, 2].sum()``) and of the models
    absent (``weights[mask].sum()``), with numpy's own summation on the same arrays as ensemble_boxes."""
    dev = presence.device
    if wn is None:
        present = presence.sum(1).to(_F64)
        return present, m_img.to(_F64) - present
    m = presence.shape[1]
    if m <= 62:
        code = (presence.long() << torch.arange(m, device=dev)).sum(1)
        uniq, inv = torch.unique(code, return_inverse=True)
        masks = [[(c >> k) & 1 == 1 for k in range(m)] for c in uniq.cpu().tolist()]
    else:
        uniq_rows, inv = torch.unique(presence, dim=0, return_inverse=True)
        masks = uniq_rows.cpu().numpy().tolist()
    wf = wn.astype(np.float64)
    pres = np.array([float(wf[np.asarray(mk, dtype=bool)].sum()) for mk in masks], dtype=np.float64)
    absn = np.array([float(wn[~np.asarray(mk, dtype=bool)].sum()) for mk in masks], dtype=np.float64)
    return _take(torch.from_numpy(pres).to(dev), inv), _take(torch.from_numpy(absn).to(dev), inv)


def _wbf(bt: _Batch, wn: Optional[np.ndarray], iou_thr: float, skip_box_thr: float, conf_type: str,
         allows_overflow: bool, clip: bool, tie: str, fn: Optional[str]) -> Tuple[Tensor, ...]:
    """WBF for a whole batch. Returns image-sorted ``(boxes f64, scores f64, labels f64, label int64, img)``."""
    fu = _fusion_inputs(bt, wn, skip_box_thr, clip, fn)
    dev = bt.device
    s, seg, first = _fusion_groups(fu, bt.n_images, tie)
    n = s.b1.numel()
    need_ws = conf_type in ("box_and_model_avg", "absent_model_aware_avg")
    seed_of, f_out, conf_out, ws_out = _wbf_assign(s, seg, iou_thr, need_ws)
    seeds = _nz(seed_of == torch.arange(n, device=dev))
    k = seeds.numel()
    inv = torch.full((n,), -1, dtype=torch.long, device=dev).index_copy_(0, seeds, torch.arange(k, device=dev))
    cl = _take(inv, seed_of)
    cnt = torch.bincount(cl, minlength=k) if n else torch.zeros(0, dtype=torch.long, device=dev)
    nf = cnt.to(_F64)
    single = cnt == 1
    img = _take(s.img, seeds)
    b1_seed = _take(s.b1, seeds)
    m_img = _take(torch.from_numpy(bt.n_models).to(dev), img)
    if wn is None:
        wsum_img, wmax_img = m_img.to(_F64), torch.ones(k, dtype=_F64, device=dev)
    else:
        wsum_img = torch.full((k,), float(wn.sum()), dtype=_F64, device=dev)
        wmax_img = torch.full((k,), float(wn.max()), dtype=_F64, device=dev)
    if conf_type == "max":
        ws1 = torch.where(single, b1_seed, b1_seed.float().to(_F64))
    else:
        ws1 = torch.where(single, b1_seed, (_take(conf_out, seeds) / nf).float().to(_F64))
    if need_ws:
        ws2 = torch.where(single, _take(s.wv, seeds), _take(ws_out, seeds).float().to(_F64))
        mm = max(int(bt.n_models.max()) if len(bt.n_models) else 0, 1)
        presence = torch.zeros(k * mm, dtype=torch.bool, device=dev).index_fill_(0, cl * mm + s.model, True)
        present, absent = _model_sums(presence.view(k, mm), wn, m_img)
        if conf_type == "box_and_model_avg":
            t = torch.where(ws2 == 0, torch.zeros_like(ws1), ws1 * nf / ws2)
            score = t * present / wsum_img
        else:
            score = ws1 * nf / (ws2 + absent)
    elif conf_type == "max":
        score = ws1 / wmax_img
    elif not allows_overflow:
        score = ws1 * torch.minimum(m_img, cnt).to(_F64) / wsum_img
    else:
        score = ws1 * nf / wsum_img
    lab = _take(s.lab, seeds)
    lab_f = torch.where(single, lab.to(_F64), lab.float().to(_F64))
    concat = _take(first, _take(seg.gidx, seeds)) * (n + 1) + _take(seg.rank, seeds)
    order = _final_order(img, score, concat, tie, np.float64)
    return (_take(_take(f_out, seeds), order), _take(score, order), _take(lab_f, order), _take(lab, order),
            _take(img, order))


def _nmw(bt: _Batch, wn: Optional[np.ndarray], iou_thr: float, skip_box_thr: float, clip: bool, tie: str,
         fn: Optional[str]) -> Tuple[Tensor, ...]:
    """Non-maximum weighted for a whole batch. Returns image-sorted ``(boxes f32, scores f32, labels f32, label
    int64, img)``."""
    if wn is not None:
        wn = wn / wn.max()
    fu = _fusion_inputs(bt, wn, skip_box_thr, clip, fn)
    dev = bt.device
    s, seg, first = _fusion_groups(fu, bt.n_images, tie)
    n = s.b1.numel()
    ei, ej, iou = _pair_edges(s.coords, _areas(s.coords), seg, iou_thr)
    keep = _greedy_keep(n, ei, ej, dev)
    # every other box joins the earlier seed it overlaps most (first one on ties)
    m = _nz(_take(keep, ei))
    ei, ej, iou = _take(ei, m), _take(ej, m), _take(iou, m)
    best = torch.full((n,), -1.0, dtype=_F64, device=dev).scatter_reduce(0, ej, iou, reduce="amax")
    top = _nz(iou == _take(best, ej))
    cluster = torch.full((n,), n, dtype=torch.long, device=dev)
    cluster = cluster.scatter_reduce(0, _take(ej, top), _take(ei, top), reduce="amin")
    cluster = torch.where(keep, torch.arange(n, device=dev), cluster)
    wgt = s.b1 * torch.where(keep, torch.ones_like(best), best)
    mo = _stable_key_order(cluster)
    cseg = _segments(_take(cluster, mo))
    acc, conf = _seq_accumulate(_take(s.coords, mo), _take(wgt, mo), cseg.starts, cseg.sizes)
    seeds = _take(mo, cseg.starts)
    fused = torch.where((conf == 0)[:, None], _take(s.coords, seeds).float(),
                        (acc.to(_F64) / conf[:, None]).float())
    score = _take(s.b1, seeds).float()
    lab = _take(s.lab, seeds)
    img = _take(s.img, seeds)
    concat = _take(first, _take(seg.gidx, seeds)) * (n + 1) + _take(seg.rank, seeds)
    order = _final_order(img, score, concat, tie, np.float32)
    return (_take(fused, order), _take(score, order), _take(lab.float(), order), _take(lab, order),
            _take(img, order))


# -------------------------------------------------------------------------------------------- NMS and soft-NMS
def _nms_prepare(bt: _Batch, weights: Optional[np.ndarray], fn: Optional[str], clip: bool
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``nms_method``'s weighting and ``prepare_boxes``: returns the kept input positions, boxes (clipped, corners
    ordered), weighted scores, a group key (image, label) and the image of each box."""
    dev = bt.device
    boxes = bt.boxes
    if boxes.dtype != torch.float32:
        boxes = boxes.to(_F64)
    sc = bt.scores
    if weights is not None:
        rdt = _torch_float(np.result_type(torch.empty(0, dtype=sc.dtype).numpy().dtype, weights.dtype))
        wt = torch.from_numpy(weights.astype(np.float64)).to(dev).to(rdt)
        wsum = torch.tensor(weights.sum(), device=dev).to(rdt)
        sc = (sc.to(rdt) * _take(wt, bt.model)) / wsum
    n_clip = 0
    if clip:
        if boxes.numel():
            n_clip = int(((boxes < 0) | (boxes > 1)).sum())
        boxes = boxes.clamp(0, 1)
    swapped = int(((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).sum()) if boxes.numel() else 0
    boxes = order_box_corners(boxes)
    ok = _areas(boxes) > 0
    if fn is not None:
        _warn(fn, swapped, n_clip, int((~ok).sum()))
    idx = _nz(ok)
    lab = _take(bt.labels, idx)
    img = _take(bt.img, idx)
    if lab.is_floating_point() and lab.numel():
        if bool((lab == torch.trunc(lab)).all()) and float(lab.abs().max()) < 2 ** 53:
            lab = lab.long()
        else:
            lab = torch.unique(lab, return_inverse=True)[1]
    key = _pair_key(img, lab.long(), bt.n_images)
    return idx, _take(boxes, idx), _take(sc, idx), key, img


def _hard_nms(boxes: Tensor, scores: Tensor, key: Tensor, iou_thr: float, tie: str) -> Tuple[Tensor, Tensor]:
    """Greedy NMS per key group, boxes in decreasing score. Returns the sorted order and the keep mask over it."""
    tv = scores.cpu().numpy() if tie in ("numpy", "numba") else None
    order = _group_order(key, scores, tie, tv)
    seg = _segments(_take(key, order))
    c = _take(boxes, order).to(_F64)
    ei, ej, _ = _pair_edges(c, _areas(c), seg, iou_thr)
    return order, _greedy_keep(order.numel(), ei, ej, boxes.device)


def _soft_nms_groups(boxes: Tensor, scores: Tensor, key: Tensor, method: int, iou_thr: float, sigma: float
                     ) -> Tuple[Tensor, Tensor]:
    """``cpu_soft_nms_float`` of ensemble_boxes for every key group at once (one loop step per rank).

    Boxes of a group are taken in input order; step ``i`` swaps in the highest remaining score (first one on ties,
    none if the current one is not lower) and decays the later ones. Returns the input positions in selection order
    (grouped by key) and their final scores."""
    dev = boxes.device
    n = scores.numel()
    sd = scores.dtype
    order = _stable_key_order(key)
    seg = _segments(_take(key, order))
    c = _take(boxes, order).to(_F64)
    sc = _take(scores, order)
    sel = torch.empty(n, dtype=torch.long, device=dev)
    final = torch.empty(n, dtype=sd, device=dev)
    for groups, ss in _chunks(seg.sizes, ratio=True):
        pflat, vflat, s = _dense(seg.starts, ss, groups)
        gc = len(ss)
        xt = _take(c, pflat).masked_fill_(~vflat[:, None], 0.0).t().contiguous()   # [4, gc * s]
        x4 = xt.view(4, gc, s)
        ar = (xt[2] - xt[0]) * (xt[3] - xt[1])
        ar2 = ar.view(gc, s)
        scr = _take(sc, pflat).masked_fill_(~vflat, float("-inf"))
        scr2 = scr.view(gc, s)
        perm = pflat.clone()
        row_base = torch.arange(gc, device=dev) * s
        act = _active(ss, s + 1)
        for i in range(s - 1):
            a = act[i + 1]
            if a == 0:
                break
            mx, mp = scr2[:a, i + 1:].max(1)
            q = torch.where(scr2[:a, i] < mx, mp + (i + 1), i)
            fi = row_base[:a] + i
            fq = row_base[:a] + q
            for t in (scr, perm, ar):
                vi, vq = _take(t, fi), _take(t, fq)
                t.index_copy_(0, fi, vq)
                t.index_copy_(0, fq, vi)
            vi, vq = torch.index_select(xt, 1, fi), torch.index_select(xt, 1, fq)
            xt.index_copy_(1, fi, vq)
            xt.index_copy_(1, fq, vi)
            xx1 = torch.maximum(x4[1, :a, i:i + 1], x4[1, :a, i + 1:])
            yy1 = torch.maximum(x4[0, :a, i:i + 1], x4[0, :a, i + 1:])
            xx2 = torch.minimum(x4[3, :a, i:i + 1], x4[3, :a, i + 1:])
            yy2 = torch.minimum(x4[2, :a, i:i + 1], x4[2, :a, i + 1:])
            inter = (xx2 - xx1).clamp_(min=0).mul_((yy2 - yy1).clamp_(min=0))
            ovr = inter / (ar2[:a, i:i + 1] + ar2[:a, i + 1:] - inter)
            if method == 1:
                w = torch.where(ovr > iou_thr, 1.0 - ovr, torch.ones_like(ovr))
            elif method == 2:
                w = _exp(-(ovr * ovr) / sigma)
            else:
                w = torch.where(ovr > iou_thr, torch.zeros_like(ovr), torch.ones_like(ovr))
            rest = scr2[:a, i + 1:]
            scr2[:a, i + 1:] = (w * rest.to(_F64)).to(sd) if sd != _F64 else w * rest
        vidx = _nz(vflat)
        p = _take(perm, vidx)
        sel.index_copy_(0, p, vidx % s)
        final.index_copy_(0, p, _take(scr, vidx))
    # positions in (group, selection) order
    out = torch.empty(n, dtype=torch.long, device=dev)
    out.index_copy_(0, _take(seg.starts, seg.gidx) + sel, torch.arange(n, device=dev))
    return _take(order, out), _take(final, out)


def _nms_run(bt: _Batch, weights: Optional[np.ndarray], method: int, iou_thr: float, sigma: float, thresh: float,
             clip: bool, tie: str, fn: Optional[str]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``nms_method`` for a batch: image-sorted ``(boxes, scores (as weighted, not decayed), labels, decayed
    scores, img)``, grouped by label in increasing order, each group in keep order."""
    idx, boxes, sc, key, img = _nms_prepare(bt, weights, fn, clip)
    if method == 3:
        order, keep = _hard_nms(boxes, sc, key, iou_thr, tie)
        sel = _compress(order, keep)
        dec = _take(sc, sel)
    else:
        order, final = _soft_nms_groups(boxes, sc, key, method, iou_thr, sigma)
        m = _nz(final > thresh)
        sel = _take(order, m)
        dec = _take(final, m)
    return _take(boxes, sel), _take(sc, sel), _take(_take(bt.labels, idx), sel), dec, _take(img, sel)


# -------------------------------------------------------------------------------------------- drop-in functions
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
    return [tuple(p) for p in _split(img, bt.n_images, [boxes, scores, labels])]


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
    for b, s, lab in _split(img, bt.n_images, [boxes, scores, labels]):
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
    for b, s, lab in _split(img, bt.n_images, [boxes, scores, labels]):
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


# ------------------------------------------------------------------------------------------------ tensor cores
def _out_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.is_floating_point() else _F64


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
    return b.to(_out_dtype(boxes)), s.to(_out_dtype(scores)), lab.to(labels.dtype)


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
        computed in float32 precision like ``ensemble_boxes``).
    """
    iou_thr = _unit("iou_thr", iou_thr)
    skip_box_thr = _real("skip_box_thr", skip_box_thr)
    bt = _tensor_batch(boxes, scores, labels, model_idx, n_models)
    wn = _weights(weights, bt.n_models)
    b, s, _, lab, _ = _nmw(bt, wn, iou_thr, skip_box_thr, False, "stable", None)
    return b.to(_out_dtype(boxes)), s.to(_out_dtype(scores)), lab.to(labels.dtype)


def _label_key(labels: Tensor) -> Tensor:
    if labels.is_floating_point():
        return torch.unique(labels, return_inverse=True)[1]
    return labels.long()


def nms_tensor(boxes: Tensor, scores: Tensor, labels: Tensor, iou_thr: float = 0.5) -> Tensor:
    """Class-wise greedy NMS (like :func:`torchvision.ops.batched_nms` with ``idxs=labels``).

    By decreasing score (ties: lower index first), a box is kept unless a kept box of the same label overlaps it
    with ``IoU > iou_thr``. Reversed corners are swapped; zero-area boxes are never kept.

    Args:
        boxes (Tensor[N, 4]): ``(x1, y1, x2, y2)`` boxes.
        scores (Tensor[N]): scores.
        labels (Tensor[N]): labels (or any group ids, e.g. ``image * num_classes + label``).
        iou_thr (float): IoU threshold in ``[0, 1]``.

    Returns:
        Tensor[K] int64: indices of the kept boxes by decreasing score.
    """
    iou_thr = _unit("iou_thr", iou_thr)
    bt = _tensor_batch(boxes, scores, labels)
    b = order_box_corners(bt.boxes.to(_F64))
    idx = (_areas(b) > 0).nonzero().squeeze(1)
    order, keep = _hard_nms(b[idx], bt.scores[idx], _label_key(bt.labels[idx]), iou_thr, "stable")
    kept = torch.sort(idx[order[keep]]).values
    return kept[_group_order(torch.zeros_like(kept), bt.scores[kept], "stable")]


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
        score.
    """
    method = _method(method)
    iou_thr = _unit("iou_thr", iou_thr)
    sigma = _sigma(sigma) if method == 2 else _real("sigma", sigma)
    thresh = _real("thresh", thresh)
    if method == 3:
        keep = nms_tensor(boxes, scores, labels, iou_thr)
        return keep, scores[keep]
    bt = _tensor_batch(boxes, scores, labels)
    b = order_box_corners(bt.boxes.to(_F64))
    idx = (_areas(b) > 0).nonzero().squeeze(1)
    order, final = _soft_nms_groups(b[idx], bt.scores[idx], _label_key(bt.labels[idx]), method, iou_thr, sigma)
    m = final > thresh
    sel, dec = idx[order[m]], final[m]
    o = _group_order(torch.zeros_like(sel), dec, "stable")
    return sel[o], dec[o].to(_out_dtype(scores))


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
        (Tensor[K, 4], Tensor[K], Tensor[K]): voted boxes, scores and labels of the kept boxes by decreasing score.
    """
    nms_thr = _unit("nms_thr", nms_thr)
    vote_thr = _unit("vote_thr", vote_thr)
    bt = _tensor_batch(boxes, scores, labels)
    dev = bt.device
    b = order_box_corners(bt.boxes.to(_F64))
    idx = (_areas(b) > 0).nonzero().squeeze(1)
    keep = nms_tensor(boxes, scores, labels, nms_thr)
    b, s = b[idx], bt.scores[idx].to(_F64)
    key = _label_key(bt.labels[idx])
    inv = torch.full((bt.boxes.shape[0],), -1, dtype=torch.long, device=dev)
    inv[idx] = torch.arange(idx.numel(), device=dev)
    kk = inv[keep]
    # every kept box against every box of its label
    order = _stable_key_order(key)
    seg = _segments(key[order])
    where_in_sorted = torch.empty_like(order)
    where_in_sorted[order] = torch.arange(order.numel(), device=dev)
    g = seg.gidx[where_in_sorted[kk]]
    sizes = seg.sizes[g]
    total = int(sizes.sum()) if kk.numel() else 0
    voted = b[kk].clone()
    if total:
        rep = torch.repeat_interleave(torch.arange(kk.numel(), device=dev), sizes, output_size=total)
        off = torch.cumsum(sizes, 0) - sizes
        member = order[seg.starts[g[rep]] + torch.arange(total, device=dev) - off[rep]]
        top, oth = b[kk[rep]], b[member]
        xa = torch.maximum(top[:, 0], oth[:, 0])
        ya = torch.maximum(top[:, 1], oth[:, 1])
        xb = torch.minimum(top[:, 2], oth[:, 2])
        yb = torch.minimum(top[:, 3], oth[:, 3])
        inter = (xb - xa).clamp(min=0) * (yb - ya).clamp(min=0)
        iou = inter / (_areas(top) + _areas(oth) - inter)
        m = iou >= vote_thr
        w = s[member[m]]
        num = torch.zeros((kk.numel(), 4), dtype=_F64, device=dev).index_add_(0, rep[m], w[:, None] * oth[m])
        den = torch.zeros(kk.numel(), dtype=_F64, device=dev).index_add_(0, rep[m], w)
        voted = torch.where((den != 0)[:, None], num / den[:, None], voted)
    return voted.to(_out_dtype(boxes)), scores[keep], labels[keep]
