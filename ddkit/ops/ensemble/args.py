"""Argument checks of the public functions and the type aliases of their signatures."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

CONF_TYPES: Tuple[str, ...] = ("avg", "max", "box_and_model_avg", "absent_model_aware_avg")

#: One image: per-model lists of boxes ``[N_m, 4]``, scores ``[N_m]`` and labels ``[N_m]``.
ImageInput = Tuple[Sequence[Any], Sequence[Any], Sequence[Any]]
#: One image's result: boxes ``[K, 4]``, scores ``[K]``, labels ``[K]`` (numpy).
Result = Tuple[np.ndarray, np.ndarray, np.ndarray]
Weights = Optional[Union[Sequence[float], np.ndarray, Tensor]]
Device = Optional[Union[str, torch.device]]


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
