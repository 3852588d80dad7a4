"""A small wrapper around pycocotools' ``COCOeval`` (bbox or keypoints) that returns named metrics.

``coco_evaluate(gt, results)`` -> ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR@100", "ARs",
"ARm", "ARl"}`` (keypoints: ``AP, AP50, AP75, APm, APl, AR@20, AR50, AR75, ARm, ARl`` with ``AR@100`` an alias of the
max-detections recall). Values are pycocotools' summary statistics in ``[0, 1]``; ``-1`` means "no ground truth in
that range", exactly as pycocotools reports it. pycocotools' printing is silenced. ``coco_evaluate_per_category``
gives each category's AP and AP50 beside the summary, from one evaluation.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

BBOX_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR@100", "ARs", "ARm", "ARl")
KEYPOINT_KEYS = ("AP", "AP50", "AP75", "APm", "APl", "AR@20", "AR50", "AR75", "ARm", "ARl")
# The metrics the issue asks for, in the order tables show them.
SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR@100")


def load_coco_dict(gt: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """A COCO ground-truth dict from a path or a dict (the dict is not modified)."""
    if isinstance(gt, (str, Path)):
        with open(gt) as fh:
            return json.load(fh)
    return dict(gt)


def make_coco(gt: str | Path | Mapping[str, Any] | Any):
    """A ``pycocotools.coco.COCO`` object from a path, a dict or an existing ``COCO`` (returned as is).

    Annotations lacking ``area`` (box area is used), ``iscrowd`` (0) or ``num_keypoints`` (counted from the
    visibilities: crowdpose-style files) are completed in a copy, so synthetic ground truth needs only
    ``image_id``, ``category_id``, ``bbox`` and ``id``.
    """
    from pycocotools.coco import COCO

    if isinstance(gt, COCO):
        return gt
    data = copy.deepcopy(load_coco_dict(gt))
    data.setdefault("info", {})  # pycocotools 2.0.10's loadRes copies it unconditionally (KeyError without it)
    data.setdefault("images", [])
    data.setdefault("categories", [])
    anns = data.setdefault("annotations", [])
    for i, ann in enumerate(anns):
        ann.setdefault("id", i + 1)
        ann.setdefault("iscrowd", 0)
        if "area" not in ann and "bbox" in ann:
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
        if "keypoints" in ann and "num_keypoints" not in ann:  # crowdpose-style files; pycocotools needs it
            ann["num_keypoints"] = sum(1 for v in ann["keypoints"][2::3] if v > 0)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_evaluate(gt: str | Path | Mapping[str, Any] | Any, results: Sequence[Mapping[str, Any]],
                  iou_type: str = "bbox", image_ids: Iterable[int] | None = None,
                  max_dets: Sequence[int] | None = None,
                  sigmas: Sequence[float] | None = None) -> dict[str, float]:
    """Evaluate COCO *results* (``[{image_id, category_id, bbox [x, y, w, h], score}, ...]``; ``keypoints`` for
    ``iou_type="keypoints"``) against ground truth.

    Args:
        gt: a COCO json path, a COCO dict or a ``pycocotools.coco.COCO``.
        results: the detections; an empty list scores 0 where there is ground truth, ``-1`` where a range has none
            (as pycocotools would; its ``loadRes`` refuses an empty list).
        iou_type: ``"bbox"`` or ``"keypoints"``.
        image_ids: evaluate only these images (default: every image of ``gt``).
        max_dets: pycocotools' ``maxDets`` (default ``[1, 10, 100]`` for bbox, ``[20]`` for keypoints).
        sigmas: per-keypoint OKS sigmas (default: COCO's 17), for keypoint sets other than COCO's.

    Returns:
        the named summary statistics (see the module docstring).
    """
    return _summary(_cocoeval(gt, results, iou_type, image_ids, max_dets, sigmas), iou_type)


def coco_evaluate_per_category(gt: str | Path | Mapping[str, Any] | Any, results: Sequence[Mapping[str, Any]],
                               iou_type: str = "bbox", sigmas: Sequence[float] | None = None
                               ) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
    """:func:`coco_evaluate`'s summary and, from the same evaluation (all areas, the most detections),
    ``{category id: {"AP", "AP50", "instances"}}`` for every category of ``gt``, as detectron2's per-category
    table: AP averages pycocotools' precision over the IoU thresholds and recall points where it is defined;
    ``nan`` for a category without ground truth. ``instances``: its non-crowd ground-truth annotations."""
    coco_gt = make_coco(gt)
    ev = _cocoeval(coco_gt, results, iou_type, None, None, sigmas)
    return _summary(ev, iou_type), _per_category(ev, coco_gt)


def _summary(ev: Any, iou_type: str) -> dict[str, float]:
    keys = BBOX_KEYS if iou_type == "bbox" else KEYPOINT_KEYS
    out = {k: 0.0 for k in keys} if ev is None else {k: float(v) for k, v in zip(keys, ev.stats)}
    if iou_type == "keypoints":
        out["AR@100"] = out["AR@20"]
    return out


def _per_category(ev: Any, coco_gt: Any) -> dict[int, dict[str, float]]:
    import numpy as np

    out = {}
    for k, cat in enumerate(sorted(coco_gt.getCatIds())):
        instances = sum(1 for a in coco_gt.loadAnns(coco_gt.getAnnIds(catIds=[cat])) if not a.get("iscrowd"))
        row = {"AP": float("nan"), "AP50": float("nan"), "instances": instances}
        if instances and ev is None:
            row.update(AP=0.0, AP50=0.0)
        elif instances:
            precision = ev.eval["precision"][:, :, k, 0, -1]  # [IoU thresholds, recall points]
            for key, p in (("AP", precision), ("AP50", precision[0])):
                p = p[p > -1]
                row[key] = float(np.mean(p)) if p.size else float("nan")
        out[int(cat)] = row
    return out


def _cocoeval(gt: Any, results: Sequence[Mapping[str, Any]], iou_type: str, image_ids: Iterable[int] | None,
              max_dets: Sequence[int] | None, sigmas: Sequence[float] | None) -> Any:
    """pycocotools' ``COCOeval`` evaluated, accumulated and summarised (silenced); ``None`` when there is no image
    to score."""
    from pycocotools.cocoeval import COCOeval

    if iou_type not in ("bbox", "keypoints"):
        raise ValueError(f"iou_type must be 'bbox' or 'keypoints', got {iou_type!r}")
    coco_gt = make_coco(gt)
    ids = sorted(coco_gt.getImgIds()) if image_ids is None else sorted(int(i) for i in image_ids)
    results = [dict(r) for r in results]
    if not ids:
        return None
    for r in results:  # loadRes recomputes area from bbox; keep ids pycocotools-friendly
        r.pop("id", None)
    with contextlib.redirect_stdout(io.StringIO()):
        # no detections: an empty detection set (loadRes refuses []), so that a size range without ground truth
        # reads -1 and one with ground truth 0, as pycocotools gives beside any detection
        coco_dt = coco_gt.loadRes(results) if results else make_coco({"images": coco_gt.dataset["images"],
                                                                       "categories": coco_gt.dataset["categories"]})
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.params.imgIds = ids
        if max_dets is not None:
            ev.params.maxDets = list(max_dets)
        if sigmas is not None:
            import numpy as np

            ev.params.kpt_oks_sigmas = np.asarray(sigmas, dtype=np.float64)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def format_metrics_table(rows: Mapping[str, Mapping[str, float]], keys: Sequence[str] = SUMMARY_KEYS) -> str:
    """A markdown table: one row per named result, one column per metric (in percent, one decimal)."""
    header = "| | " + " | ".join(keys) + " |"
    sep = "|---|" + "---:|" * len(keys)
    lines = [header, sep]
    for name, metrics in rows.items():
        cells = []
        for k in keys:
            v = metrics.get(k)
            cells.append("-" if v is None or v < 0 else f"{100 * v:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
