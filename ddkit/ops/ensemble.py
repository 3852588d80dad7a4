"""Ensembling of object detections: weighted boxes fusion, NMS, soft-NMS, non-maximum weighted and box voting.

Two layers:

* **Drop-in functions** with the names, signatures and semantics of ``ensemble_boxes`` 1.0.9 for one image
  (:func:`weighted_boxes_fusion`, :func:`nms`, :func:`soft_nms`, :func:`nms_method`, :func:`non_maximum_weighted`):
  inputs are per-model lists of normalized ``[0, 1]`` boxes, scores and labels (numpy arrays, lists or tensors),
  outputs are numpy arrays of ``ensemble_boxes``' dtypes. They return the same boxes in the same order as
  ``ensemble_boxes``, ties included (where it sorts with ``numpy.argsort`` or numba's quicksort, the same sort runs
  on the same values); WBF, NMS and soft-NMS reproduce its arithmetic bit for bit (float32 accumulations included).
  Their ``*_batch`` twins take a list of per-image ``(boxes_list, scores_list, labels_list)`` tuples and process all
  images at once, with no Python loop over boxes (greedy clusterings run one vectorized step per rank or per kept
  box, for every ``(image, label)`` group together), and return exactly what the one-image functions return.
* **Tensor cores** (:func:`wbf_tensor`, :func:`nmw_tensor`, :func:`nms_tensor`, :func:`soft_nms_tensor`,
  :func:`box_voting_tensor`) for one image in any coordinate system (pixels; no clipping), results on the input's
  device, ties broken by input order. For several images in one call give every ``(image, label)`` pair its own
  label, as with the ``idxs`` of :func:`torchvision.ops.batched_nms`.

CPU inputs are computed with numpy (single-threaded: cheaper per call than torch on the CPU, and unaffected by
OpenMP thread contention); CUDA tensors (or ``device="cuda"``) with torch on the GPU. Both backends run the same
IEEE operations in the same order (``FORCE_TORCH = True`` runs the torch path on the CPU, as the tests do).

Deliberate differences from ``ensemble_boxes`` (everything else is reproduced, including its quirks: clipping to
``[0, 1]`` and swapping of reversed corners in the drop-ins, ``allows_overflow=False`` not bounding scores by 1 when
weights differ, soft-NMS returning the *input* scores of the boxes it keeps, NMW returning float32 arrays):

* bad arguments raise :class:`ValueError` naming the argument instead of printing and calling ``exit()`` (unknown
  ``conf_type``) or silently replacing them (wrong number of ``weights``); thresholds are checked (``iou_thr`` in
  ``[0, 1]``, ``sigma > 0``, ``method`` in ``{1, 2, 3}``), weights must be finite, non-negative, with a positive sum;
  NaN boxes or scores are rejected;
* inputs are never modified (``ensemble_boxes.nms`` with ``weights`` rescales the caller's ``scores`` list in place);
* empty input (no model, no box, or nothing left after filtering) returns empty arrays of shapes ``[0, 4]``, ``[0]``,
  ``[0]`` where ``ensemble_boxes`` crashes (``nms``, ``soft_nms``, ``non_maximum_weighted`` without models);
* a cluster whose boxes all have zero weighted score (zero model weight or zero score) keeps the coordinates of its
  first box where ``ensemble_boxes`` computes ``0 / 0 = NaN`` coordinates (WBF then merges every later box of that
  label into the NaN cluster); with ``conf_type='box_and_model_avg'`` such a cluster scores 0, not NaN;
* NMW accumulates its weighted means in float64 (``ensemble_boxes``: float32), a difference below 1e-6;
* the one warning per fixed box of ``ensemble_boxes`` becomes one summary warning per call;
* integer boxes or scores are returned as float64;
* for float32 inputs, NMS computes IoUs in float64 (``ensemble_boxes`` mixes float32 and float64 inside numba), so a
  keep/suppress decision can differ only for an IoU within ~1e-7 of ``iou_thr``; gaussian soft-NMS on CUDA uses
  ``torch.exp`` (the CPU path calls ``numpy.exp`` like ``ensemble_boxes``), which may differ in the last bit.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "weighted_boxes_fusion", "nms", "soft_nms", "nms_method", "non_maximum_weighted",
    "weighted_boxes_fusion_batch", "nms_batch", "soft_nms_batch", "non_maximum_weighted_batch",
    "wbf_tensor", "nmw_tensor", "nms_tensor", "soft_nms_tensor", "box_voting_tensor", "CONF_TYPES",
]

CONF_TYPES: Tuple[str, ...] = ("avg", "max", "box_and_model_avg", "absent_model_aware_avg")

#: One image: per-model lists of boxes ``[N_m, 4]``, scores ``[N_m]`` and labels ``[N_m]``.
ImageInput = Tuple[Sequence[Any], Sequence[Any], Sequence[Any]]
#: One image's result: boxes ``[K, 4]``, scores ``[K]``, labels ``[K]`` (numpy).
Result = Tuple[np.ndarray, np.ndarray, np.ndarray]
Weights = Optional[Union[Sequence[float], np.ndarray, Tensor]]
Device = Optional[Union[str, torch.device]]
Array = Any   # a numpy array (CPU backend) or a torch tensor (CUDA backend)

_SLOTS = 1 << 20          # dense (group x rank) slots per chunk of the sequential loops
_SMALL_CHUNK = 1 << 15    # below this many slots a chunk is not split by size (fewer loop steps matter more)
_SMALL_PAIRS = 1 << 16    # NMS of at most this many same-group pairs: all pairs at once (fewer numpy calls)
_SMALL_QUICKSORT = 15     # numba's quicksort is an insertion sort up to this many elements

#: Run the CPU computations with torch instead of numpy (the code path of CUDA tensors; used by the tests).
FORCE_TORCH = False


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


# ----------------------------------------------------------------------------------------------------- backends
# Everything below runs on arrays of one backend: numpy on the CPU (single-threaded, cheap per call; torch's CPU
# indexing and its OpenMP threads cost far more on this workload) and torch on CUDA. Both do the same IEEE
# operations in the same order, so they give the same bits (except `exp`, see the module docstring).
class _Numpy:
    """numpy backend (CPU)."""

    f16, f32, f64, i8, i64, bool_ = np.float16, np.float32, np.float64, np.int8, np.int64, np.bool_
    device = torch.device("cpu")

    @staticmethod
    def asarray(x: Any) -> np.ndarray:
        """A tensor or numpy array as a backend array (no copy when possible)."""
        return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)

    @staticmethod
    def numpy(x: np.ndarray) -> np.ndarray:
        return x

    def tensor(self, x: np.ndarray, device: torch.device) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).to(device)

    @staticmethod
    def dtype_of(np_dtype: Any) -> Any:
        return np.dtype(np_dtype).type

    @staticmethod
    def np_dtype(x: np.ndarray) -> np.dtype:
        return x.dtype

    @staticmethod
    def is_float(x: np.ndarray) -> bool:
        return x.dtype.kind == "f"

    @staticmethod
    def zeros(shape: Any, dtype: Any) -> np.ndarray:
        return np.zeros(shape, dtype)

    @staticmethod
    def full(shape: Any, value: Any, dtype: Any) -> np.ndarray:
        return np.full(shape, value, dtype)

    @staticmethod
    def arange(*args: int) -> np.ndarray:
        return np.arange(*args)

    @staticmethod
    def cast(x: np.ndarray, dtype: Any) -> np.ndarray:
        return x if x.dtype == dtype else x.astype(dtype)

    @staticmethod
    def copy(x: np.ndarray) -> np.ndarray:
        return x.copy()

    @staticmethod
    def take(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return x.take(idx, axis=0)

    @staticmethod
    def argsort(x: np.ndarray, stable: bool = False) -> np.ndarray:
        return np.argsort(x, kind="stable" if stable else "quicksort")

    @staticmethod
    def cumsum(x: np.ndarray) -> np.ndarray:
        return x.cumsum()

    @staticmethod
    def diff_to(starts: np.ndarray, end: int) -> np.ndarray:
        return np.diff(starts, append=end)

    @staticmethod
    def repeat(x: np.ndarray, counts: np.ndarray, total: int) -> np.ndarray:
        return np.repeat(x, counts)

    @staticmethod
    def concat(xs: Sequence[np.ndarray], axis: int = 0) -> np.ndarray:
        return np.concatenate(xs, axis)

    @staticmethod
    def stack(xs: Sequence[np.ndarray], axis: int = 0) -> np.ndarray:
        return np.stack(xs, axis)

    @staticmethod
    def contiguous(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x)

    @staticmethod
    def clip0(x: np.ndarray) -> np.ndarray:
        return np.maximum(x, 0)

    @staticmethod
    def clip(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
        return np.clip(x, lo, hi)

    @staticmethod
    def gather1(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return np.take_along_axis(x, idx, 1)

    @staticmethod
    def bincount(x: np.ndarray, weights: np.ndarray, n: int) -> np.ndarray:
        """Sums of ``weights`` per bin, float64, added in input order."""
        return np.bincount(x, weights=weights, minlength=n).astype(np.float64, copy=False)

    @staticmethod
    def segment_min(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
        return np.minimum.reduceat(values, starts) if len(starts) else values[:0]

    @staticmethod
    def unique_inverse(x: np.ndarray) -> np.ndarray:
        return np.unique(x, return_inverse=True)[1].reshape(-1)

    @staticmethod
    def unique_rows_inverse(x: np.ndarray) -> np.ndarray:
        return np.unique(x, axis=0, return_inverse=True)[1].reshape(-1)

    @staticmethod
    def nonzero(m: np.ndarray) -> np.ndarray:
        return m.nonzero()[0]

    maximum = staticmethod(np.maximum)
    minimum = staticmethod(np.minimum)
    where = staticmethod(np.where)
    exp = staticmethod(np.exp)
    trunc = staticmethod(np.trunc)
    isnan = staticmethod(np.isnan)
    isfinite = staticmethod(np.isfinite)


class _Torch:
    """torch backend (CUDA tensors, or the CPU when ``FORCE_TORCH``)."""

    f16, f32, f64, i8, i64, bool_ = torch.float16, torch.float32, torch.float64, torch.int8, torch.long, torch.bool

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def asarray(self, x: Any) -> Tensor:
        if isinstance(x, Tensor):
            return x.detach().to(self.device)
        return torch.from_numpy(np.ascontiguousarray(x)).to(self.device)

    @staticmethod
    def numpy(x: Tensor) -> np.ndarray:
        return x.detach().cpu().numpy()

    @staticmethod
    def tensor(x: Tensor, device: torch.device) -> Tensor:
        return x.to(device)

    @staticmethod
    def dtype_of(np_dtype: Any) -> torch.dtype:
        return {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
                np.dtype(np.float64): torch.float64}.get(np.dtype(np_dtype), torch.float64)

    @staticmethod
    def np_dtype(x: Tensor) -> np.dtype:
        return torch.empty(0, dtype=x.dtype).numpy().dtype

    @staticmethod
    def is_float(x: Tensor) -> bool:
        return x.is_floating_point()

    def zeros(self, shape: Any, dtype: Any) -> Tensor:
        return torch.zeros(shape, dtype=dtype, device=self.device)

    def full(self, shape: Any, value: Any, dtype: Any) -> Tensor:
        return torch.full(shape if isinstance(shape, tuple) else (shape,), value, dtype=dtype, device=self.device)

    def arange(self, *args: int) -> Tensor:
        return torch.arange(*args, device=self.device)

    @staticmethod
    def cast(x: Tensor, dtype: Any) -> Tensor:
        return x.to(dtype)

    @staticmethod
    def copy(x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def take(x: Tensor, idx: Tensor) -> Tensor:
        return torch.index_select(x, 0, idx)

    @staticmethod
    def argsort(x: Tensor, stable: bool = False) -> Tensor:
        return torch.sort(x, stable=stable).indices

    @staticmethod
    def cumsum(x: Tensor) -> Tensor:
        return torch.cumsum(x, 0)

    @staticmethod
    def diff_to(starts: Tensor, end: int) -> Tensor:
        return torch.diff(starts, append=torch.tensor([end], device=starts.device))

    @staticmethod
    def repeat(x: Tensor, counts: Tensor, total: int) -> Tensor:
        return torch.repeat_interleave(x, counts, output_size=total)

    @staticmethod
    def concat(xs: Sequence[Tensor], axis: int = 0) -> Tensor:
        return torch.cat(list(xs), axis)

    @staticmethod
    def stack(xs: Sequence[Tensor], axis: int = 0) -> Tensor:
        return torch.stack(list(xs), axis)

    @staticmethod
    def contiguous(x: Tensor) -> Tensor:
        return x.contiguous()

    @staticmethod
    def clip0(x: Tensor) -> Tensor:
        return x.clamp(min=0)

    @staticmethod
    def clip(x: Tensor, lo: float, hi: float) -> Tensor:
        return x.clamp(lo, hi)

    @staticmethod
    def gather1(x: Tensor, idx: Tensor) -> Tensor:
        return torch.gather(x, 1, idx)

    def bincount(self, x: Tensor, weights: Tensor, n: int) -> Tensor:
        return torch.zeros(n, dtype=torch.float64, device=self.device).index_add_(0, x, weights.to(torch.float64))

    def segment_min(self, values: Tensor, starts: Tensor) -> Tensor:
        n = values.shape[0]
        seg = torch.zeros(n, dtype=torch.long, device=self.device)
        seg[starts[1:]] = 1
        seg = torch.cumsum(seg, 0)
        return torch.zeros(starts.shape[0], dtype=values.dtype, device=self.device).scatter_reduce(
            0, seg, values, reduce="amin", include_self=False)

    @staticmethod
    def unique_inverse(x: Tensor) -> Tensor:
        return torch.unique(x, return_inverse=True)[1]

    @staticmethod
    def unique_rows_inverse(x: Tensor) -> Tensor:
        return torch.unique(x, dim=0, return_inverse=True)[1]

    @staticmethod
    def nonzero(m: Tensor) -> Tensor:
        return torch.nonzero(m).squeeze(1)

    maximum = staticmethod(torch.maximum)
    minimum = staticmethod(torch.minimum)
    where = staticmethod(torch.where)
    exp = staticmethod(torch.exp)
    trunc = staticmethod(torch.trunc)
    isnan = staticmethod(torch.isnan)
    isfinite = staticmethod(torch.isfinite)


Backend = Union[_Numpy, _Torch]
_NUMPY = _Numpy()


def _backend(device: torch.device) -> Backend:
    if device.type == "cpu" and not FORCE_TORCH:
        return _NUMPY
    return _Torch(device)


# ----------------------------------------------------------------------------------------------------- inputs
@dataclass
class _Batch:
    xp: Backend
    boxes: Array        # [N, 4] as given (concatenated dtype; float)
    scores: Array       # [N] float
    labels: Array       # [N]
    model: Array        # [N] int64
    img: Array          # [N] int64
    n_images: int
    n_models: np.ndarray  # [n_images]
    labels_dtype: np.dtype
    device: torch.device  # where results go (tensor cores)


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


def _as_array(x: Any, what: str) -> Union[np.ndarray, Tensor]:
    if isinstance(x, (np.ndarray, Tensor)):
        return x.detach() if isinstance(x, Tensor) else x
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} could not be converted to an array: {e}") from None


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


def _finish(xp: Backend, boxes: Array, scores: Array, labels: Array, model: Array, img: Array, n_images: int,
            n_models: np.ndarray, device: torch.device, what: Tuple[str, str, str]) -> _Batch:
    """Common dtype fixes and checks of the concatenated inputs."""
    for name, x in zip(what, (boxes, scores, labels)):
        if xp.np_dtype(x).kind not in "biuf":
            raise ValueError(f"{name} must hold real numbers, got dtype {xp.np_dtype(x)}")
    labels_dtype = xp.np_dtype(labels)
    if not xp.is_float(boxes) or xp.np_dtype(boxes).itemsize < 4:
        boxes = xp.cast(boxes, xp.f64)
    if not xp.is_float(scores) or xp.np_dtype(scores).itemsize < 4:
        scores = xp.cast(scores, xp.f64)
    if labels_dtype.kind == "b":
        labels = xp.cast(labels, xp.i64)
    if boxes.shape[0]:
        if bool(xp.isnan(boxes).any()):
            raise ValueError(f"{what[0]} contains NaN coordinates")
        if bool(xp.isnan(scores).any()):
            raise ValueError(f"{what[1]} contains NaN scores")
        if xp.is_float(labels) and not bool(xp.isfinite(labels).all()):
            raise ValueError(f"{what[2]} contains NaN or infinite labels")
    return _Batch(xp, boxes, scores, labels, model, img, n_images, n_models, labels_dtype, device)


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
    target = torch.device(device) if device is not None else (tensor_device or torch.device("cpu"))
    xp = _backend(target)
    cnt = np.asarray(counts, dtype=np.int64)
    pair_img = np.repeat(np.arange(len(batch), dtype=np.int64), n_models)
    pair_model = np.arange(len(counts), dtype=np.int64) - np.repeat(np.cumsum(n_models) - n_models, n_models)
    img = xp.asarray(np.repeat(pair_img, cnt))
    model = xp.asarray(np.repeat(pair_model, cnt))
    cat = []
    for name, parts, shape in (("boxes_list", parts_b, (0, 4)), ("scores_list", parts_s, (0,)),
                               ("labels_list", parts_l, (0,))):
        if not parts:
            cat.append(xp.asarray(np.zeros(shape)))
            continue
        try:
            if tensor_device is None:                   # numpy inputs: one concatenation (and one transfer)
                cat.append(xp.asarray(np.concatenate(parts)))
            elif isinstance(xp, _Numpy):
                cat.append(np.concatenate([xp.asarray(p) for p in parts]))
            else:
                cat.append(torch.cat([xp.asarray(p) for p in parts]))
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{name} must hold real numbers: {e}") from None
    return _finish(xp, cat[0], cat[1], cat[2], model, img, len(batch), n_models, target,
                   ("boxes_list", "scores_list", "labels_list"))


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
    if model_idx is None:
        model = np.zeros(n, dtype=np.int64)
        m = 1 if n_models is None else int(n_models)
    else:
        if not isinstance(model_idx, Tensor) or model_idx.dim() != 1 or model_idx.shape[0] != n:
            raise ValueError(f"model_idx must be a tensor of shape [N] = [{n}]")
        if model_idx.is_floating_point() or model_idx.is_complex():
            raise ValueError("model_idx must hold integers")
        model = model_idx.detach().cpu().numpy().astype(np.int64)
        m = int(n_models) if n_models is not None else (int(model.max()) + 1 if n else 0)
        if n and (int(model.min()) < 0 or int(model.max()) >= m):
            raise ValueError(f"model_idx must be in [0, n_models) = [0, {m})")
    xp = _backend(boxes.device)
    return _finish(xp, xp.asarray(boxes), xp.asarray(scores), xp.asarray(labels), xp.asarray(model),
                   xp.asarray(np.zeros(n, dtype=np.int64)), 1, np.array([m]), boxes.device,
                   ("boxes", "scores", "labels"))


# ------------------------------------------------------------------------------------------- sorting helpers
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


# ----------------------------------------------------------------------------------------------- IoU helpers
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


def _split(xp: Backend, img: Array, n_images: int, arrays: Sequence[Array]) -> List[List[np.ndarray]]:
    """Split image-sorted results into per-image numpy arrays."""
    img_np = xp.numpy(img)
    ends = np.searchsorted(img_np, np.arange(1, n_images + 1), side="left").tolist()
    starts = [0] + ends[:-1]
    nps = [xp.numpy(a) for a in arrays]
    return [[a[i:j] for a in nps] for i, j in zip(starts, ends)]


def _warn(fn: str, swapped: int, clipped: int, zero: int) -> None:
    if swapped:
        warnings.warn(f"{fn}: {swapped} boxes had x2 < x1 or y2 < y1; their corners were swapped", stacklevel=6)
    if clipped:
        warnings.warn(f"{fn}: {clipped} box coordinates were outside [0, 1] and were clipped (normalize the boxes "
                      f"to [0, 1])", stacklevel=6)
    if zero:
        warnings.warn(f"{fn}: {zero} zero-area boxes were skipped", stacklevel=6)


# ------------------------------------------------------------------------------------- fusion (WBF and NMW)
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


def _pair_key(xp: Backend, img: Array, lab: Array, n_images: int) -> Array:
    """An int64 key ordering ``(image, label)`` pairs lexicographically."""
    if lab.shape[0] == 0:
        return lab
    lo = int(lab.min())
    span = int(lab.max()) - lo + 1
    if n_images * span < 2 ** 40:
        return img * span + (lab - lo)
    return xp.unique_rows_inverse(xp.stack([img, lab], 1))


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


def _wbf_assign(xp: Backend, fu: _Fusion, seg: _Segments, thr: float, need_ws: bool
                ) -> Tuple[Array, Array, Array, Array]:
    """The sequential greedy clustering of WBF, all groups at once: one loop step per rank, not per box.

    Step ``j`` takes the ``j``-th box of every group, computes its IoU with the group's current fused boxes, and
    joins the best one if that IoU is ``> thr`` (first one on ties), or opens a cluster; the fused box is updated as
    ensemble_boxes does (float32 accumulation of ``score * box``, divided by the float64 summed score).

    Returns per sorted position the position of its cluster's first box (``seed``), and per seed position the fused
    box, the summed weighted score and the summed model weight."""
    coords, b1, wv = fu.coords, fu.b1, fu.wv
    n = coords.shape[0]
    # a group of one box is one cluster: these defaults are only overwritten for larger groups
    seed_of = xp.arange(n)
    f_out, conf_out, ws_out = xp.copy(coords), xp.copy(b1), xp.copy(wv)
    coords_t = coords.T
    inf = float("inf")
    for groups, ss in (_chunks(xp, seg.sizes, ratio=True, min_size=2) if n else []):
        pos, valid, s = _chunk_layout(xp, seg.starts, ss, groups)
        gc = len(ss)
        # cluster state indexed by the rank of the cluster's first box; until box j is processed, column j holds
        # box j itself (its coordinates, area, score, weight), which is also the state of the cluster it may open
        fx = xp.contiguous(coords_t[:, pos])                         # [4, gc, s] fused boxes, coordinate-major
        area = xp.contiguous((fx[2] - fx[0]) * (fx[3] - fx[1]))      # inf once a box has joined a cluster
        conf = xp.contiguous(b1[pos])                                # summed weighted scores
        acc = xp.contiguous(xp.cast(conf[None] * fx, xp.f32))        # float32 sums of score * box
        wsum = xp.contiguous(wv[pos]) if need_ws else conf
        notseed = xp.zeros((gc, s), xp.bool_)
        asg = xp.zeros((gc, s), xp.i64)
        fx2, acc2 = fx.reshape(4, -1), acc.reshape(4, -1)
        conf1, area1, ws1 = conf.reshape(-1), area.reshape(-1), wsum.reshape(-1)
        rows = xp.arange(gc)
        for j, a in enumerate(_active(ss, s)):
            if j == 0:
                continue
            c = fx[:, :a, j:j + 1]
            xa = xp.maximum(fx[0, :a, :j], c[0])
            ya = xp.maximum(fx[1, :a, :j], c[1])
            xb = xp.minimum(fx[2, :a, :j], c[2])
            yb = xp.minimum(fx[3, :a, :j], c[3])
            inter = xp.clip0(xb - xa) * xp.clip0(yb - ya)
            iou = inter / (area[:a, :j] + area[:a, j:j + 1] - inter)   # 0 against boxes that joined a cluster
            best = iou.argmax(1)
            join = iou[rows[:a], best] > thr
            notseed[:a, j] = join
            asg[:a, j] = xp.where(join, best, j)
            jr = xp.nonzero(join)
            if jr.shape[0] == 0:
                continue
            fi = jr * s + xp.take(best, jr)         # the joined clusters
            fj = jr * s + j                         # the joining boxes
            sc = conf1[fj]
            new_acc = xp.cast(xp.cast(acc2[:, fi], xp.f64) + sc * fx2[:, fj], xp.f32)
            acc2[:, fi] = new_acc
            new_conf = conf1[fi] + sc
            conf1[fi] = new_conf
            if need_ws:
                ws1[fi] = ws1[fi] + ws1[fj]
            avg = xp.cast(xp.cast(xp.cast(new_acc, xp.f64) / new_conf, xp.f32), xp.f64)
            avg = xp.where(new_conf == 0, fx2[:, fi], avg)
            fx2[:, fi] = avg
            area1[fi] = (avg[2] - avg[0]) * (avg[3] - avg[1])
            area1[fj] = inf
        seed_of[pos[valid]] = xp.gather1(pos, asg)[valid]
        sm = ~notseed & valid
        ps = pos[sm]
        f_out[ps] = fx[:, sm].T
        conf_out[ps] = conf[sm]
        ws_out[ps] = wsum[sm]
    return seed_of, f_out, conf_out, ws_out


def _model_sums(xp: Backend, presence: Array, wn: Optional[np.ndarray], m_img: Array) -> Tuple[Array, Array]:
    """Per cluster: the summed weight of the models present (``clustered_boxes[idx, 2].sum()``) and of the models
    absent (``weights[mask].sum()``), with numpy's own summation on the same arrays as ensemble_boxes."""
    if wn is None:
        present = xp.cast(presence.sum(1), xp.f64)
        return present, xp.cast(m_img, xp.f64) - present
    m = presence.shape[1]
    if m <= 62:
        code = (xp.cast(presence, xp.i64) * xp.asarray(np.left_shift(1, np.arange(m, dtype=np.int64)))).sum(1)
        inv = xp.unique_inverse(code)
        uniq = np.unique(xp.numpy(code))
        masks = [[(int(c) >> k) & 1 == 1 for k in range(m)] for c in uniq.tolist()]
    else:
        inv = xp.unique_rows_inverse(presence)
        masks = np.unique(xp.numpy(presence), axis=0).tolist()
    wf = wn.astype(np.float64)
    pres = np.array([float(wf[np.asarray(mk, dtype=bool)].sum()) for mk in masks], dtype=np.float64)
    absn = np.array([float(wn[~np.asarray(mk, dtype=bool)].sum()) for mk in masks], dtype=np.float64)
    return xp.take(xp.asarray(pres), inv), xp.take(xp.asarray(absn), inv)


def _wbf(bt: _Batch, wn: Optional[np.ndarray], iou_thr: float, skip_box_thr: float, conf_type: str,
         allows_overflow: bool, clip: bool, tie: str, fn: Optional[str]) -> Tuple[Array, ...]:
    """WBF for a whole batch. Returns image-sorted ``(boxes f64, scores f64, labels f64, label int64, img)``."""
    xp = bt.xp
    fu = _fusion_inputs(bt, wn, skip_box_thr, clip, fn)
    s, seg, first = _fusion_groups(xp, fu, bt.n_images, tie)
    n = s.b1.shape[0]
    need_ws = conf_type in ("box_and_model_avg", "absent_model_aware_avg")
    seed_of, f_out, conf_out, ws_out = _wbf_assign(xp, s, seg, iou_thr, need_ws)
    seeds = xp.nonzero(seed_of == xp.arange(n))
    k = seeds.shape[0]
    inv = xp.full(n, -1, xp.i64)
    inv[seeds] = xp.arange(k)
    cl = xp.take(inv, seed_of)
    cnt = xp.cast(xp.bincount(cl, xp.full(n, 1.0, xp.f64), k), xp.i64)
    nf = xp.cast(cnt, xp.f64)
    single = cnt == 1
    img = xp.take(s.img, seeds)
    b1_seed = xp.take(s.b1, seeds)
    m_img = xp.take(xp.asarray(bt.n_models), img)
    if wn is None:
        wsum_img, wmax_img = xp.cast(m_img, xp.f64), xp.full(k, 1.0, xp.f64)
    else:
        wsum_img = xp.full(k, float(wn.sum()), xp.f64)
        wmax_img = xp.full(k, float(wn.max()), xp.f64)
    f32 = (lambda x: xp.cast(xp.cast(x, xp.f32), xp.f64))
    if conf_type == "max":
        ws1 = xp.where(single, b1_seed, f32(b1_seed))
    else:
        ws1 = xp.where(single, b1_seed, f32(xp.take(conf_out, seeds) / nf))
    if need_ws:
        ws2 = xp.where(single, xp.take(s.wv, seeds), f32(xp.take(ws_out, seeds)))
        mm = max(int(bt.n_models.max()) if len(bt.n_models) else 0, 1)
        presence = xp.zeros(k * mm, xp.bool_)
        presence[cl * mm + s.model] = True
        present, absent = _model_sums(xp, presence.reshape(k, mm), wn, m_img)
        if conf_type == "box_and_model_avg":
            t = xp.where(ws2 == 0, 0.0, ws1 * nf / xp.where(ws2 == 0, 1.0, ws2))
            score = t * present / wsum_img
        else:
            score = ws1 * nf / (ws2 + absent)
    elif conf_type == "max":
        score = ws1 / wmax_img
    elif not allows_overflow:
        score = ws1 * xp.cast(xp.minimum(m_img, cnt), xp.f64) / wsum_img
    else:
        score = ws1 * nf / wsum_img
    lab = xp.take(s.lab, seeds)
    lab_f = xp.where(single, xp.cast(lab, xp.f64), f32(lab))
    concat = xp.take(first, xp.take(seg.gidx, seeds)) * (n + 1) + xp.take(seg.rank, seeds)
    order = _final_order(xp, img, score, concat, tie, np.float64)
    return (xp.take(xp.take(f_out, seeds), order), xp.take(score, order), xp.take(lab_f, order),
            xp.take(lab, order), xp.take(img, order))


def _nmw(bt: _Batch, wn: Optional[np.ndarray], iou_thr: float, skip_box_thr: float, clip: bool, tie: str,
         fn: Optional[str]) -> Tuple[Array, ...]:
    """Non-maximum weighted for a whole batch. Returns image-sorted ``(boxes f32, scores f32, labels f32, label
    int64, img)``."""
    xp = bt.xp
    if wn is not None:
        wn = wn / wn.max()
    fu = _fusion_inputs(bt, wn, skip_box_thr, clip, fn)
    s, seg, first = _fusion_groups(xp, fu, bt.n_images, tie)
    n = s.b1.shape[0]
    # seeds: greedy NMS; every other box joins the earlier seed it overlaps most (the first one on ties)
    keep, best, cluster = _greedy_rounds(xp, s.coords, _areas(s.coords), seg, iou_thr, track=True)
    wgt = s.b1 * xp.where(keep, 1.0, best)
    # weighted means (ensemble_boxes accumulates them in float32; float64 here, a difference below 1e-6)
    conf = xp.bincount(cluster, wgt, n)
    acc = xp.stack([xp.bincount(cluster, wgt * s.coords[:, k], n) for k in range(4)], 1)
    seeds = xp.nonzero(keep)
    acc, conf = xp.take(acc, seeds), xp.take(conf, seeds)
    fused = xp.where((conf == 0)[:, None], xp.take(s.coords, seeds),
                     acc / xp.where(conf == 0, 1.0, conf)[:, None])
    fused = xp.cast(fused, xp.f32)
    score = xp.cast(xp.take(s.b1, seeds), xp.f32)
    lab = xp.take(s.lab, seeds)
    img = xp.take(s.img, seeds)
    concat = xp.take(first, xp.take(seg.gidx, seeds)) * (n + 1) + xp.take(seg.rank, seeds)
    order = _final_order(xp, img, score, concat, tie, np.float32)
    return (xp.take(fused, order), xp.take(score, order), xp.take(xp.cast(lab, xp.f32), order),
            xp.take(lab, order), xp.take(img, order))


# -------------------------------------------------------------------------------------------- NMS and soft-NMS
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
    if int(seg.rank.sum() if order.shape[0] else 0) <= _SMALL_PAIRS:
        return order, _greedy_pairs(xp, c, _areas(c), seg, iou_thr)
    return order, _greedy_rounds(xp, c, _areas(c), seg, iou_thr, track=False)[0]


def _soft_nms_groups(xp: Backend, boxes: Array, scores: Array, key: Array, method: int, iou_thr: float,
                     sigma: float) -> Tuple[Array, Array]:
    """``cpu_soft_nms_float`` of ensemble_boxes for every key group at once (one loop step per rank).

    Boxes of a group are taken in input order; step ``i`` swaps in the highest remaining score (first one on ties,
    none if the current one is not lower) and decays the later ones. Returns the input positions in selection order
    (grouped by key) and their final scores."""
    n = scores.shape[0]
    order = _stable_key_order(xp, key)
    seg = _segments(xp, xp.take(key, order))
    c = xp.cast(xp.take(boxes, order), xp.f64)
    sc = xp.take(scores, order)
    sd = sc.dtype
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
    # positions in (group, selection) order
    out = xp.zeros(n, xp.i64)
    out[xp.take(seg.starts, seg.gidx) + sel] = xp.arange(n)
    return xp.take(order, out), xp.take(final, out)


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
        order, final = _soft_nms_groups(xp, boxes, sc, key, method, iou_thr, sigma)
        m = xp.nonzero(final > thresh)
        sel = xp.take(order, m)
        dec = xp.take(final, m)
    return (xp.take(boxes, sel), xp.take(sc, sel), xp.take(xp.take(bt.labels, idx), sel), dec,
            xp.take(img, sel))


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


# ------------------------------------------------------------------------------------------------ tensor cores
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
                                    iou_thr, sigma)
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
    # every kept box against every non-degenerate box of its label
    order = xp.take(idx, _stable_key_order(xp, xp.take(key, idx)))
    seg = _segments(xp, xp.take(key, order))
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
