"""Builtin selectors: which aggregated predictions become pseudo-labels.

The interface (``fit(labeled, predictions) -> thresholds``, ``select(pred) -> Selection``) and the count-matching
maths live in :mod:`ddkit.engine.select`; this module only names and parametrises the rules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ddkit import hookimpl
from ddkit.engine.select import (LabeledStats, PredictionStream, ScoredPredictions, Selection, ThresholdTable,
                                 count_match_thresholds, instance_keep, json_threshold, keypoint_count_threshold)
from ddkit.types import SelectorSpec


def _keypoint_mask(pred: ScoredPredictions, threshold: float | None) -> torch.Tensor | None:
    if pred.keypoint_scores is None:
        return None
    if threshold is None:
        return torch.ones_like(pred.keypoint_scores, dtype=torch.bool)
    return pred.keypoint_scores.double() >= threshold


# ------------------------------------------------------------------------------------------------ count_match
@dataclass
class CountMatchParams:
    per_category: bool = True
    keypoints: bool = True
    keep: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"keep is the share of the matched count kept, in (0, 1] (1: the paper's rule), "
                             f"got {self.keep}")


class CountMatch:
    """The paper's rule: per category ``c`` keep the ``round(m_c x N)`` highest-scoring predictions of ``c``, where
    ``m_c`` is the labeled instances of ``c`` per labeled image and ``N`` the unlabeled images (ties kept).

    ``keep < 1`` keeps only that share of each matched count, the most confident ones: with one label per image
    (classification) matching the count keeps nearly every image, so the pseudo-labels are only as right as the
    teacher; dropping its least confident ones trades coverage for precision.

    ``per_category=False`` uses one threshold for all categories (``m`` = all labeled instances per image). With
    keypoints (``keypoints=True``), a second threshold on keypoint scores makes the mean number of visible keypoints
    per kept instance match the labeled set; keypoints below it get visibility 0. For classification (one
    prediction per image) it keeps the ``round(frac_c x N)`` most confident images predicted as ``c``.
    """

    needs_labeled_stats = True  # capability: fit() matches the labeled set's counts, so it needs that set

    def __init__(self, per_category: bool = True, keypoints: bool = True, keep: float = 1.0):
        self.per_category = per_category
        self.keypoints = keypoints
        self.keep = keep
        self.thresholds: dict[int, float] | None = None
        self._table: ThresholdTable | None = None
        self.keypoint_threshold: float | None = None

    def fit(self, labeled: LabeledStats, predictions: PredictionStream) -> dict[str, Any]:
        self.thresholds, targets = count_match_thresholds(labeled, predictions, self.per_category, self.keep)
        self._table = ThresholdTable(self.thresholds)
        out: dict[str, Any] = {
            "rule": "count_match" if self.per_category else "count_match_global",
            "score": {str(c): json_threshold(t) for c, t in sorted(self.thresholds.items())},
            "target": {str(c): k for c, k in sorted(targets.items())},
            "keep": self.keep,
        }
        self.keypoint_threshold = None
        if self.keypoints and labeled.num_keypoints:
            thr, target, kept = keypoint_count_threshold(labeled, predictions, self._keep)
            self.keypoint_threshold = thr
            out.update(keypoint=json_threshold(thr), keypoint_target=target, keypoint_instances=kept,
                       keypoints_per_instance_labeled=labeled.keypoints_per_instance)
        return out

    def _keep(self, pred: ScoredPredictions) -> torch.Tensor:
        if self._table is None:
            raise RuntimeError("count_match: call fit() before select()")
        return instance_keep(pred, self._table, self.per_category)

    def select(self, pred: ScoredPredictions) -> Selection:
        kp = None
        if pred.keypoint_scores is not None:
            kp = _keypoint_mask(pred, self.keypoint_threshold if self.keypoints else None)
        return Selection(self._keep(pred), kp)


def _count_match_global(keypoints: bool = True, keep: float = 1.0) -> CountMatch:
    return CountMatch(per_category=False, keypoints=keypoints, keep=keep)


@dataclass
class CountMatchGlobalParams:
    keypoints: bool = True
    keep: float = 1.0

    __post_init__ = CountMatchParams.__post_init__


# ------------------------------------------------------------------------------------------------ score_threshold
@dataclass
class ScoreThresholdParams:
    threshold: float = 0.5
    keypoint_threshold: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")


class ScoreThreshold:
    """Keep the predictions whose score is at least a fixed threshold (and, optionally, the keypoints whose score
    is at least ``keypoint_threshold``)."""

    def __init__(self, threshold: float = 0.5, keypoint_threshold: float | None = None):
        self.threshold = threshold
        self.keypoint_threshold = keypoint_threshold

    def fit(self, labeled: LabeledStats, predictions: PredictionStream) -> dict[str, Any]:
        return {"rule": "score_threshold", "score": self.threshold, "keypoint": self.keypoint_threshold}

    def select(self, pred: ScoredPredictions) -> Selection:
        return Selection(pred.scores.double() >= self.threshold, _keypoint_mask(pred, self.keypoint_threshold))


# ------------------------------------------------------------------------------------------------ top_k
@dataclass
class TopKParams:
    k: int = 10
    min_score: float = 0.0
    keypoint_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.k < 0:
            raise ValueError(f"k must be >= 0, got {self.k}")


class TopKPerImage:
    """Keep the ``k`` highest-scoring predictions of each image (of those with score >= ``min_score``); equal
    scores are ordered by position, so exactly ``min(k, N)`` are kept."""

    def __init__(self, k: int = 10, min_score: float = 0.0, keypoint_threshold: float | None = None):
        self.k = k
        self.min_score = min_score
        self.keypoint_threshold = keypoint_threshold

    def fit(self, labeled: LabeledStats, predictions: PredictionStream) -> dict[str, Any]:
        return {"rule": "top_k", "k": self.k, "score": self.min_score, "keypoint": self.keypoint_threshold}

    def select(self, pred: ScoredPredictions) -> Selection:
        keep = torch.zeros(len(pred), dtype=torch.bool)
        order = torch.argsort(pred.scores, descending=True, stable=True)[: self.k]
        keep[order] = True
        keep &= pred.scores.double() >= self.min_score
        return Selection(keep, _keypoint_mask(pred, self.keypoint_threshold))


@hookimpl
def ddkit_selectors():
    yield SelectorSpec(name="count_match", factory=CountMatch, params=CountMatchParams,
                       summary="per category keep round(m_c x N) best (paper); keypoint count matched too")
    yield SelectorSpec(name="count_match_global", factory=_count_match_global, params=CountMatchGlobalParams,
                       summary="count_match with one threshold for all categories")
    yield SelectorSpec(name="score_threshold", factory=ScoreThreshold, params=ScoreThresholdParams,
                       summary="keep predictions with score >= a fixed threshold")
    yield SelectorSpec(name="top_k", factory=TopKPerImage, params=TopKParams,
                       summary="keep the k highest-scoring predictions of each image")
