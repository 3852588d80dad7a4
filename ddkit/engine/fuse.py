"""Fuse COCO *results* files of several detectors (or of one detector under several transforms) into one.

Each input file is one "view" (model) of the aggregator; every image's boxes are fused in pixel coordinates with
the image size taken from the COCO images file. Any registered aggregator of input type ``instances`` works
(``wbf``, ``nms``, ``soft_nms``, ``nmw``, ``box_voting`` or a third-party one). Results with ``keypoints`` (``K x (x,
y, score)``, the same K in every entry) keep them through an aggregator that keeps or fuses keypoints
(:func:`ddkit.engine.aggregation.carries_keypoints`); any other aggregator drops them with a warning, as it does
``segmentation``.

Input is validated before anything is fused: an image id missing from the COCO file, a box outside its image, a
non-finite score or a malformed entry is reported with the file, the index and the entry itself (never clipped or
dropped silently; only float rounding within ``box_tolerance``, 0.01 px by default, is clamped to the image), as a
:class:`~ddkit.errors.DataError`.

Python API::

    from ddkit.engine.fuse import fuse_results
    fused = fuse_results([preds_a, preds_b], coco["images"], {"name": "wbf", "iou_thr": 0.55})
"""
from __future__ import annotations

import json
import logging
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from ddkit.engine.aggregation import (aggregate_images, build_instance_aggregator, carries_keypoints,
                                      keypoint_aggregators)
from ddkit.engine.coco_file import load_json
from ddkit.engine.coco_results import keypoint_results
from ddkit.engine.box_rule import CLIPPED, OK, box_rule
from ddkit.errors import ConfigError, DataError
from ddkit.types import Instances

log = logging.getLogger("ddkit.fuse")

MAX_REPORTED = 20  # problems listed in an error message; the rest are counted
# Pixels a box may stick out of its image before it is reported; boxes within it are clamped to the image. 0.01 px by
# default: float32 detectors (detectron2, mmdet) clip xyxy to the image, then write x, y, w = x2 - x1, h in float32,
# and x + w comes back a few float32 ulps past the border (640.00002 for a 640-pixel image; one ulp is 0.001 px even
# at 8192 px). That noise is no box error; 0.01 px is far below anything a box can mean, while a box a real 0.05 px or
# more outside (a detector that does not clip, a wrong image size) is still reported. Training readers allow 1 px
# (``box_rule.BOX_TOLERANCE``); fuse stays strict, its input being a model's own predictions.
DEFAULT_BOX_TOLERANCE = 0.01


@dataclass
class Problem:
    """One bad entry of a results file."""

    source: str
    index: int | None
    message: str
    entry: Any = None
    fix: str = ""  # said once after the list, for every problem of its kind

    def __str__(self) -> str:
        where = self.source if self.index is None else f"{self.source}[{self.index}]"
        text = f"{where}: {self.message}"
        if self.entry is not None:
            shown = json.dumps(self.entry, default=str) if not isinstance(self.entry, str) else self.entry
            if len(shown) > 200:
                shown = shown[:197] + "..."
            text += f": {shown}"
        return text


def problems_error(problems: Sequence[Problem], what: str = "bad predictions",
                   limit: int = MAX_REPORTED) -> DataError:
    """One :class:`DataError` listing the problems, one per line, at most ``limit`` of them."""
    lines = [f"{len(problems)} {what} (nothing was fused):"]
    lines += [f"  {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    lines += list(dict.fromkeys(p.fix for p in problems if p.fix))
    return DataError("\n".join(lines))


# ------------------------------------------------------------------------------------------------ loading
# the largest image side an image header can state (PNG's 2^31 - 1); beyond it a size is not a real image's
MAX_SIDE = 2 ** 31 - 1


def image_sizes(coco_images: Mapping[str, Any] | Sequence[Mapping[str, Any]],
                source: str = "images") -> dict[int, tuple[int, int]]:
    """``{image_id: (height, width)}`` from a COCO dict or its ``images`` list."""
    images = coco_images.get("images") if isinstance(coco_images, Mapping) else coco_images
    if not isinstance(images, (list, tuple)):
        raise DataError(f"{source}: a COCO file needs an 'images' list of {{id, height, width}}")
    if not images:
        raise DataError(f"{source}: the 'images' list is empty; it must give every image's id, height and width")
    sizes: dict[int, tuple[int, int]] = {}
    first: dict[int, int] = {}
    problems = []
    for i, img in enumerate(images):
        try:
            iid, h, w = img["id"], img["height"], img["width"]
            if not all(_is_int(v) for v in (iid, h, w)) or not (0 < h <= MAX_SIDE and 0 < w <= MAX_SIDE) \
                    or abs(iid) >= 2 ** 63:
                raise TypeError
        except (TypeError, KeyError):
            problems.append(Problem(f"{source}:images", i, f"needs integer id (int64), height and width in "
                                                           f"1..{MAX_SIDE} pixels", img))
            continue
        if int(iid) in first:
            problems.append(Problem(f"{source}:images", i, f"image id {iid} again (first at images[{first[iid]}]); "
                                                           f"every image needs its own id", img))
            continue
        first[int(iid)] = i
        sizes[int(iid)] = (int(h), int(w))
    if problems:
        raise problems_error(problems, "bad image records")
    return sizes


def load_coco_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    data = load_json(path)
    if not isinstance(data, dict) or "images" not in data:
        raise DataError(f"{path}: not a COCO file (a mapping with an 'images' list)")
    return data


def load_results_file(path: str | Path) -> list[Any]:
    """Read a COCO results file (a JSON list); entries are validated by :func:`validate_results`."""
    path = Path(path)
    data = load_json(path)
    if isinstance(data, dict) and "annotations" in data:
        raise DataError(f"{path}: this is a COCO ground-truth file; fuse takes results files (a JSON list of "
                        f"{{image_id, category_id, bbox, score}})")
    if not isinstance(data, list):
        raise DataError(f"{path}: a COCO results file is a JSON list of {{image_id, category_id, bbox, score}}, "
                        f"got {type(data).__name__}")
    return data


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _finite(v: Any) -> bool:
    """A finite real number (not a bool; an int too large for a float is not)."""
    try:
        return _is_num(v) and math.isfinite(v)
    except OverflowError:
        return False


def _keypoints_ok(kps: Any) -> bool:
    return isinstance(kps, (list, tuple)) and len(kps) >= 3 and len(kps) % 3 == 0 and all(_finite(v) for v in kps)


def num_keypoints(pred_lists: Sequence[Sequence[Mapping[str, Any]]], sources: Sequence[str]) -> int | None:
    """K of the validated inputs' ``keypoints`` (None: no entry has any); a :class:`DataError` naming two files (or
    one) where some entries have K keypoints and others another K or none."""
    seen: dict[int | None, str] = {}
    for preds, src in zip(pred_lists, sources):
        for e in preds:
            seen.setdefault(len(e["keypoints"]) // 3 if "keypoints" in e else None, src)
    if len(seen) > 1:
        (k1, s1), (k2, s2) = list(seen.items())[:2]
        said = {k: "no keypoints" if k is None else f"{k} keypoints" for k in (k1, k2)}
        raise DataError(f"{s1} has results with {said[k1]} and {s2} results with {said[k2]}; fuse results of one "
                        f"kind together (the same keypoints on every entry, or none)")
    return next(iter(seen), None)


def validate_results(entries: Sequence[Any], sizes: Mapping[int, tuple[int, int]], source: str,
                     category_ids: Iterable[int] | None = None,
                     box_tolerance: float = DEFAULT_BOX_TOLERANCE) -> list[Problem]:
    """Every problem of a results list (empty: all good).

    Checked per entry: a mapping with ``image_id`` (int, in ``sizes``), ``category_id`` (int, among
    ``category_ids`` when given), ``bbox`` (4 finite numbers, ``w, h >= 0``, inside the image up to
    ``box_tolerance`` pixels: :func:`ddkit.engine.box_rule.box_rule`, refusing what a reader would clip or
    drop) and ``score`` (a finite number in ``[0, 1]``).
    """
    cats = None if category_ids is None else {int(c) for c in category_ids}
    problems: list[Problem] = []
    boxes: list[tuple[int, Any, list[float]]] = []
    for i, e in enumerate(entries):
        if not isinstance(e, Mapping):
            problems.append(Problem(source, i, "not an object {image_id, category_id, bbox, score}", e))
            continue
        missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in e]
        if missing:
            problems.append(Problem(source, i, f"missing {', '.join(missing)}", e))
            continue
        iid, cid, bbox, score = e["image_id"], e["category_id"], e["bbox"], e["score"]
        if not _is_int(iid):
            fix = "COCO image ids are integers: map your file names or string ids to the --images file's ids" \
                if isinstance(iid, str) else ""
            problems.append(Problem(source, i, "image_id is not an integer", e, fix))
            continue
        if int(iid) not in sizes:
            problems.append(Problem(source, i, f"image_id {iid} is not in the COCO images file", e))
            continue
        if not _is_int(cid):
            problems.append(Problem(source, i, "category_id is not an integer", e))
            continue
        if cats is not None and int(cid) not in cats:
            problems.append(Problem(source, i, f"category_id {cid} is not a category of the COCO file", e))
            continue
        if not _finite(score):
            problems.append(Problem(source, i, "score is not a finite number", e))
            continue
        if not 0.0 <= score <= 1.0:
            problems.append(Problem(source, i, f"score {score} is outside [0, 1] (scores are fused as "
                                               f"probabilities; rescale them first)", e))
            continue
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_num(v) for v in bbox):
            problems.append(Problem(source, i, "bbox is not a list of 4 numbers [x, y, w, h]", e))
            continue
        if not all(_finite(v) for v in bbox):
            problems.append(Problem(source, i, "bbox has a non-finite value", e))
            continue
        x, y, w, h = (float(v) for v in bbox)
        if w < 0 or h < 0:
            problems.append(Problem(source, i, "bbox has a negative width or height", e))
            continue
        if "keypoints" in e and not _keypoints_ok(e["keypoints"]):
            problems.append(Problem(source, i, "keypoints is not a list of K x 3 finite numbers "
                                               "[x1, y1, v1, x2, y2, v2, ...]", e))
            continue
        boxes.append((i, e, [x, y, x + w, y + h]))
    problems += _box_problems(boxes, sizes, source, box_tolerance)
    return sorted(problems, key=lambda p: p.index)


def _box_problems(boxes: Sequence[tuple[int, Any, list[float]]], sizes: Mapping[int, tuple[int, int]], source: str,
                  tolerance: float) -> list[Problem]:
    """The box rule (:mod:`ddkit.engine.box_rule`) over ``(index, entry, xyxy)`` rows; fuse refuses what a training
    reader would clip (beyond ``tolerance``) or drop."""
    if not boxes:
        return []
    xyxy = torch.tensor([b for _, _, b in boxes], dtype=torch.float64)
    hw = torch.tensor([sizes[int(e["image_id"])] for _, e, _ in boxes], dtype=torch.float64)
    _, status = box_rule(xyxy, hw, tolerance)
    out = []
    for (i, e, _), st, (h, w) in zip(boxes, status.tolist(), hw.long().tolist()):
        if st == CLIPPED:
            out.append(Problem(source, i, f"bbox is outside image {e['image_id']} of size {w}x{h} (w x h)", e,
                               "boxes that stick out by a little (float rounding of clipped boxes): "
                               "--box-tolerance PIXELS clamps those within PIXELS to the image"))
        elif st != OK:
            out.append(Problem(source, i, f"bbox is empty (zero width or height) or wholly outside image "
                                          f"{e['image_id']} of size {w}x{h} (w x h)", e))
    return out


# ------------------------------------------------------------------------------------------------ conversion
def results_to_instances(entries: Sequence[Mapping[str, Any]], sizes: Mapping[int, tuple[int, int]],
                         image_ids: Iterable[int] | None = None,
                         num_keypoints: int | None = None) -> dict[int, Instances]:
    """Group validated results by image: ``{image_id: Instances}`` (xyxy pixels, labels = category ids), one for
    every id of ``image_ids`` (default: the ids in ``entries``), empty where an image has no entry. With
    ``num_keypoints`` K, every entry's ``keypoints`` (K x ``x, y, score``) become ``Instances.keypoints``."""
    grouped: dict[int, list[Mapping[str, Any]]] = {}
    for e in entries:
        grouped.setdefault(int(e["image_id"]), []).append(e)
    ids = sorted(grouped) if image_ids is None else list(image_ids)
    out = {}
    for iid in ids:
        rows = grouped.get(int(iid), [])
        size = sizes[int(iid)]
        if not rows:
            out[int(iid)] = Instances.empty(num_keypoints, image_size=size)
            continue
        xywh = torch.tensor([[float(v) for v in r["bbox"]] for r in rows], dtype=torch.float64)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        # validated entries stick out by at most the tolerance the caller allowed: clamp those few hundredths
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, size[1])
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, size[0])
        boxes = boxes.float()
        scores = torch.tensor([float(r["score"]) for r in rows], dtype=torch.float32)
        labels = torch.tensor([int(r["category_id"]) for r in rows], dtype=torch.int64)
        kps = None
        if num_keypoints is not None:
            kps = torch.tensor([[float(v) for v in r["keypoints"]] for r in rows]).reshape(-1, num_keypoints, 3)
        out[int(iid)] = Instances(boxes, scores, labels, kps, image_size=size)
    return out


def coverage_warnings(pred_lists: Sequence[Sequence[Mapping[str, Any]]], sources: Sequence[str],
                      num_images: int, images_source: str = "the images file") -> list[str]:
    """One line per validated input that has no detections, or detections on less than half the images another input
    covers: a crashed detector or one pointed at the wrong folder looks like a model that found nothing, and
    aggregators that average over the inputs (WBF's ``conf_type: avg``) then lower every fused score. (Detectors
    differ by a few images in normal use: one finds nothing where another has a false positive.)"""
    covered = [len({int(e["image_id"]) for e in preds}) for preds in pred_lists]
    most = max(covered, default=0)
    n = len(pred_lists)
    lines = []
    for src, preds, k in zip(sources, pred_lists, covered):
        if not preds:
            lines.append(f"{src}: 0 detections (a crashed detector or the wrong folder?); it is fused as a model "
                         f"that found nothing, which lowers the scores of aggregators that average over the {n} "
                         f"inputs")
        elif 2 * k < most:
            lines.append(f"{src}: detections on only {k} of the {num_images} images of {images_source} (another "
                         f"input covers {most}); on the others it is fused as a model that found nothing")
    return lines


# ------------------------------------------------------------------------------------------------ aggregation
def fuse_results(pred_lists: Sequence[Sequence[Mapping[str, Any]]],
                 coco_images: Mapping[str, Any] | Sequence[Mapping[str, Any]],
                 method_cfg: Mapping[str, Any] | str, *, sources: Sequence[str] | None = None,
                 registry: Any = None, box_tolerance: float = DEFAULT_BOX_TOLERANCE,
                 check_categories: bool = True, images_source: str = "images") -> list[dict[str, Any]]:
    """Fuse several COCO results lists (one per model/view) image by image.

    Args:
        pred_lists: one COCO results list per model: ``[{image_id, category_id, bbox [x,y,w,h], score}, ...]``.
        coco_images: a COCO dict (its ``images`` give each image's ``height`` and ``width``; its ``categories``,
            when present, the valid category ids) or the ``images`` list itself.
        method_cfg: an aggregator block, e.g. ``{"name": "wbf", "iou_thr": 0.55, "weights": [2, 1]}``.
        sources: names of the inputs in error messages (default ``input0``, ``input1``, ...).
        box_tolerance: pixels a box may stick out of its image before it is reported.
        check_categories: report category ids that the COCO dict's ``categories`` does not list.
        images_source: names ``coco_images`` (its file) in error messages.

    Returns:
        the fused COCO results list, sorted by image id (then as the aggregator ordered them).

    Raises:
        DataError: listing every bad entry (file, index, the entry); nothing is fused then.
    """
    if not pred_lists:
        raise ConfigError("fuse needs at least one predictions list")
    if not _finite(box_tolerance) or box_tolerance < 0:
        raise ConfigError(f"box_tolerance must be a number of pixels >= 0, got {box_tolerance!r}")
    sources = list(sources) if sources is not None else [f"input{i}" for i in range(len(pred_lists))]
    sizes = image_sizes(coco_images, images_source)
    cats = None
    if check_categories and isinstance(coco_images, Mapping) and coco_images.get("categories"):
        cats = [c["id"] for c in coco_images["categories"]]
    problems: list[Problem] = []
    for preds, src in zip(pred_lists, sources):
        if not isinstance(preds, (list, tuple)):
            problems.append(Problem(src, None, "not a list of results"))
            continue
        problems += validate_results(preds, sizes, src, cats, box_tolerance)
    if problems:
        raise problems_error(problems)
    agg = build_instance_aggregator(method_cfg, registry)
    k = _carried_keypoints(agg, num_keypoints(pred_lists, sources), registry)
    _warn_segmentation(pred_lists, sources)
    ids = sorted({int(e["image_id"]) for preds in pred_lists for e in preds})
    per_view = [results_to_instances(preds, sizes, ids, k) for preds in pred_lists]
    views = [[pv[iid] for pv in per_view] for iid in ids]
    fused = aggregate_images(agg, views, [sizes[i] for i in ids])
    out: list[dict[str, Any]] = []
    for iid, inst in zip(ids, fused):
        out += keypoint_results(iid, inst, keep_scores=True)
    return out


def _carried_keypoints(agg: Any, k: int | None, registry: Any = None) -> int | None:
    """K when the inputs have keypoints and ``agg`` carries them to its output; else None, with a warning when the
    inputs' keypoints are dropped."""
    if k is None or carries_keypoints(agg):
        return k
    log.warning("the inputs' keypoints are dropped: the aggregator %s neither fuses nor keeps keypoints (boxes only); "
                "for keypoints use one of: %s", getattr(agg, "name", type(agg).__name__),
                ", ".join(keypoint_aggregators(registry)))
    return None


def _warn_segmentation(pred_lists: Sequence[Sequence[Mapping[str, Any]]], sources: Sequence[str]) -> None:
    with_masks = [src for preds, src in zip(pred_lists, sources) if any("segmentation" in e for e in preds)]
    if with_masks:
        log.warning("%s: the 'segmentation' of the results is dropped: fuse ensembles boxes (and keypoints), "
                    "not masks", ", ".join(with_masks))
