"""Pseudo-label quality against hidden ground truth, accumulated image by image (``quality.json``)."""
from __future__ import annotations

import logging
from typing import Any, Mapping

from torch import Tensor

from ddkit.engine.coco_results import CocoGroundTruthBuilder, keypoint_results
from ddkit.engine.matching import greedy_match
from ddkit.engine.prediction_kinds import PROBS, PredictionKind
from ddkit.types import DatasetInfo

log = logging.getLogger("ddkit.label")

# OKS sigma of every keypoint when the dataset declares none (the builtin datasets' default for non-COCO layouts)
DEFAULT_KEYPOINT_SIGMA = 0.05
_warned: set[int] = set()


def keypoint_sigmas(info: DatasetInfo) -> list[float] | None:
    """The dataset's OKS sigmas; a default (with one warning) when it declares none; ``None`` without keypoints."""
    if not info.num_keypoints:
        return None
    if info.keypoint_sigmas is not None:
        return list(info.keypoint_sigmas)
    if info.num_keypoints not in _warned:
        _warned.add(info.num_keypoints)
        log.warning("the dataset declares no keypoint_sigmas: keypoint AP of the quality report uses %s for each "
                    "of its %d keypoints", DEFAULT_KEYPOINT_SIGMA, info.num_keypoints)
    return [DEFAULT_KEYPOINT_SIGMA] * info.num_keypoints


class ProbsQuality:
    """Accuracy of the hard labels, of all images and of the selected ones."""

    def __init__(self, info: DatasetInfo):
        self.correct = self.total = self.sel_correct = self.sel_total = 0

    def add(self, image_id: int, height: int, width: int, pred: Any, keep: Tensor, gt: Mapping[str, Any]) -> None:
        ok = int(int(pred[0][0]) == int(gt["label"]))
        self.correct += ok
        self.total += 1
        if bool(keep[0]):
            self.sel_correct += ok
            self.sel_total += 1

    def report(self) -> dict[str, Any]:
        return {"accuracy": self.correct / max(self.total, 1), "images": self.total,
                "selected": self.sel_total, "coverage": self.sel_total / max(self.total, 1),
                "selected_accuracy": self.sel_correct / self.sel_total if self.sel_total else None}


class InstanceQuality:
    """COCO AP of all aggregated instances (box and keypoint) and precision / recall of the selected ones."""

    def __init__(self, info: DatasetInfo, gt: CocoGroundTruthBuilder | None = None):
        self.info = info
        self.gt = gt if gt is not None else CocoGroundTruthBuilder(info.categories)
        self.owns_gt = gt is None  # two accumulators of the same images share one ground truth
        self.results: list[dict[str, Any]] = []
        self.tp = self.n_sel = self.n_gt = 0

    def add(self, image_id: int, height: int, width: int, pred: Any, keep: Tensor, gt: Mapping[str, Any]) -> None:
        if self.owns_gt:
            self.gt.add(image_id, height, width, gt)
        self.results += keypoint_results(image_id, pred)
        crowd = gt["iscrowd"].bool()
        sel = pred[keep]
        self.tp += int(greedy_match(sel.boxes, sel.scores, sel.labels, gt["boxes"][~crowd],
                                    gt["labels"][~crowd]).sum())
        self.n_sel += len(sel)
        self.n_gt += int((~crowd).sum())

    def report(self) -> dict[str, Any]:
        from ddkit.engine.coco_eval import coco_evaluate

        gt_coco = self.gt.to_dict()
        bbox = coco_evaluate(gt_coco, self.results, "bbox")
        out: dict[str, Any] = {"AP": bbox["AP"], "AP50": bbox["AP50"], "AP75": bbox["AP75"], "AR@100": bbox["AR@100"]}
        if any("keypoints" in r for r in self.results):
            kp = coco_evaluate(gt_coco, [r for r in self.results if "keypoints" in r], "keypoints",
                               sigmas=keypoint_sigmas(self.info))
            out.update({"kp_AP": kp["AP"], "kp_AP50": kp["AP50"]})
        out.update({"precision": self.tp / self.n_sel if self.n_sel else None,
                    "recall": self.tp / self.n_gt if self.n_gt else None,
                    "selected": self.n_sel, "ground_truth": self.n_gt})
        return out


def quality_pair(kind: PredictionKind, info: DatasetInfo) -> tuple[Any, Any]:
    """``(ensemble, single view)`` accumulators of the kind's quality report."""
    if kind is PROBS:
        return ProbsQuality(info), ProbsQuality(info)
    ens = InstanceQuality(info)
    return ens, InstanceQuality(info, gt=ens.gt)


def format_quality_table(quality: Mapping[str, Any], first: str = "view") -> str:
    """A markdown table with one row per view (``{name: {metric: value}}``); ``first`` heads the name column."""
    rows = [(name, q) for name, q in quality.items() if isinstance(q, Mapping)]
    if not rows:
        return ""
    keys = [k for k in rows[0][1] if isinstance(rows[0][1][k], (int, float)) or rows[0][1][k] is None]
    lines = [f"| {first} | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for name, q in rows:
        cells = []
        for k in keys:
            v = q.get(k)
            cells.append("-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v)))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def quality_table(quality: Mapping[str, Any]) -> str:
    """The printed table of ``quality.json``: the single untransformed view next to the ensemble."""
    return format_quality_table({k: v for k, v in quality.items() if k in ("single", "ensemble")})
