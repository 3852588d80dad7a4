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

Layout (one job per module): :mod:`.args` (argument checks, signature types), :mod:`.backends` (numpy / torch),
:mod:`.batch` (inputs and outputs), :mod:`.sort` (tie orders, group segments), :mod:`.greedy` (box geometry,
greedy NMS rounds), :mod:`.fusion`, :mod:`.wbf`, :mod:`.nmw` (the fusions), :mod:`.suppress` (NMS and soft-NMS),
:mod:`.dropins` (the ``ensemble_boxes`` drop-ins), :mod:`.cores` (the tensor cores); for crowded scenes (hundreds
to thousands of boxes per class) :mod:`.spatial` (independent parts of the groups, for the vectorized loops: CUDA,
or the CPU without numba) and :mod:`.compiled` (the CPU loops compiled with numba when it is installed, with a grid
index). Both keep the cost about linear in the boxes and the results unchanged.
"""
from __future__ import annotations

import sys
import types
from typing import Any

from ddkit.ops.ensemble import backends as _backends
from ddkit.ops.ensemble import compiled as _compiled
from ddkit.ops.ensemble import suppress as _suppress
from ddkit.ops.ensemble import sort as _sort
from ddkit.ops.ensemble import spatial as _spatial
from ddkit.ops.ensemble.args import CONF_TYPES, Device, ImageInput, Result, Weights
from ddkit.ops.ensemble.backends import FORCE_TORCH
from ddkit.ops.ensemble.compiled import USE_NUMBA
from ddkit.ops.ensemble.cores import box_voting_tensor, nms_tensor, nmw_tensor, soft_nms_tensor, wbf_tensor
from ddkit.ops.ensemble.dropins import (nms, nms_batch, nms_method, non_maximum_weighted, non_maximum_weighted_batch,
                                        soft_nms, soft_nms_batch, weighted_boxes_fusion, weighted_boxes_fusion_batch)
from ddkit.ops.ensemble.sort import _numba_argsort

__all__ = [
    "weighted_boxes_fusion", "nms", "soft_nms", "nms_method", "non_maximum_weighted",
    "weighted_boxes_fusion_batch", "nms_batch", "soft_nms_batch", "non_maximum_weighted_batch",
    "wbf_tensor", "nmw_tensor", "nms_tensor", "soft_nms_tensor", "box_voting_tensor", "CONF_TYPES",
]

# Settings read at call time by the module that uses them; setting them here (``ensemble.FORCE_TORCH = True``, as
# before the split into modules, or a test's monkeypatch of a chunk size) sets them there.
_FORWARDED = {"FORCE_TORCH": _backends, "_SLOTS": _sort, "_SMALL_CHUNK": _sort, "_SMALL_PAIRS": _suppress,
              "_SPATIAL_MIN": _spatial, "_PAIR_BLOCK": _spatial, "_MAX_STRIPS": _spatial, "USE_NUMBA": _compiled,
              "_SOFT_COMPILED_MIN": _suppress}
_SLOTS, _SMALL_CHUNK, _SMALL_PAIRS = _sort._SLOTS, _sort._SMALL_CHUNK, _suppress._SMALL_PAIRS
_SPATIAL_MIN, _PAIR_BLOCK, _MAX_STRIPS = _spatial._SPATIAL_MIN, _spatial._PAIR_BLOCK, _spatial._MAX_STRIPS
_SOFT_COMPILED_MIN = _suppress._SOFT_COMPILED_MIN


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FORWARDED:
            setattr(_FORWARDED[name], name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
