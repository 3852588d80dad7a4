"""Validation and concatenation of the inputs (per-image, per-model lists or tensors) and splitting of results."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ddkit.ops.ensemble.args import Device
from ddkit.ops.ensemble.backends import Array, Backend, _backend, _Numpy


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
