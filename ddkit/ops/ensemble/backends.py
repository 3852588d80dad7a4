"""The two array backends: numpy on the CPU, torch on CUDA (or on the CPU with ``FORCE_TORCH``).

Both run the same IEEE operations in the same order, so they give the same bits (except ``exp``; see the package
docstring)."""
from __future__ import annotations

from typing import Any, Sequence, Union

import numpy as np
import torch
from torch import Tensor

Array = Any   # a numpy array (CPU backend) or a torch tensor (CUDA backend)

#: Run the CPU computations with torch instead of numpy (the code path of CUDA tensors; used by the tests).
FORCE_TORCH = False


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

    @staticmethod
    def searchsorted(a: np.ndarray, v: np.ndarray, side: str) -> np.ndarray:
        return np.searchsorted(a, v, side=side)

    @staticmethod
    def scatter_min_(x: np.ndarray, idx: np.ndarray, values: np.ndarray) -> np.ndarray:
        """``x[idx] = min(x[idx], values)`` in place, repeated indices included."""
        np.minimum.at(x, idx, values)
        return x

    @staticmethod
    def scatter_max_(x: np.ndarray, idx: np.ndarray, values: np.ndarray) -> np.ndarray:
        np.maximum.at(x, idx, values)
        return x

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

    @staticmethod
    def searchsorted(a: Tensor, v: Tensor, side: str) -> Tensor:
        return torch.searchsorted(a, v, side=side)

    @staticmethod
    def scatter_min_(x: Tensor, idx: Tensor, values: Tensor) -> Tensor:
        return x.scatter_reduce_(0, idx, values, reduce="amin")

    @staticmethod
    def scatter_max_(x: Tensor, idx: Tensor, values: Tensor) -> Tensor:
        return x.scatter_reduce_(0, idx, values, reduce="amax")

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
