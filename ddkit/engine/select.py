"""Pseudo-label selection: the selector interface and the count-matching maths (core, no plugin imports).

A *selector* (kind ``selectors``) turns the aggregated predictions of every unlabeled image into pseudo-labels in two
steps::

    thresholds = selector.fit(labeled_stats, predictions)   # once, after every image has been labelled
    selection = selector.select(pred)                       # per image

``fit(labeled, predictions) -> dict``
    ``labeled`` is a :class:`LabeledStats` (instances per category per labeled image, visible keypoints per
    instance); ``predictions`` is a :class:`PredictionStream`: ``len()`` is the number of unlabeled images and every
    ``iter()`` is a *fresh streaming pass* over the stored predictions (the shard files), one
    :class:`ScoredPredictions` per image, in a fixed order. A selector may take as many passes as it needs; memory is
    bounded by what it keeps (for count matching: the ``k`` best scores of each category, one float each). The
    return value is JSON-serialisable (numbers, ``None`` for "keep nothing" / "keep all") and goes into the
    provenance and ``summary.json``. Selectors that need no statistics return their fixed thresholds.
``select(pred) -> Selection``
    which predictions of one image to keep and, for keypoints, which keypoints stay visible (the others are
    written with visibility 0). Must be a pure function of ``pred`` and the fitted state.

One structure serves every task: an image's predictions are ``scores [N]``, ``labels [N]`` and, for keypoints,
``keypoint_scores [N, K]``. Classification is the case ``N = 1`` (the argmax class and its probability), so count
matching "keep the round(frac_c x N_unlabeled) most confident images predicted as c" is the same rule as for boxes
"keep the round(m_c x N_unlabeled) highest-scoring predictions of c".

Rounding is half-up (``floor(x + 0.5)``), not Python's banker's rounding. Ties at a threshold are kept, so a
category may keep more than its count when several predictions share the k-th score.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from ddkit.errors import PluginContractError

KEEP_NOTHING = math.inf
KEEP_ALL = -math.inf


# ------------------------------------------------------------------------------------------------ data structures
@dataclass
class ScoredPredictions:
    """The aggregated predictions of one image, as a selector sees them.

    Attributes:
        scores: ``[N]`` float confidence.
        labels: ``[N]`` int64 category ids (class indices for classification).
        keypoint_scores: ``[N, K]`` float keypoint confidences, or ``None`` when the task has no keypoints.
    """

    scores: Tensor
    labels: Tensor
    keypoint_scores: Tensor | None = None

    def __post_init__(self) -> None:
        n = self.scores.shape[0] if self.scores.ndim == 1 else -1
        if self.scores.ndim != 1 or self.labels.shape != (n,):
            raise ValueError(f"ScoredPredictions: scores and labels must be [N], got {tuple(self.scores.shape)} "
                             f"and {tuple(self.labels.shape)}")
        if self.keypoint_scores is not None and (self.keypoint_scores.ndim != 2
                                                 or self.keypoint_scores.shape[0] != n):
            raise ValueError(f"ScoredPredictions: keypoint_scores must be [N, K], got "
                             f"{tuple(self.keypoint_scores.shape)}")

    def __len__(self) -> int:
        return int(self.scores.shape[0])


@dataclass
class Selection:
    """What a selector keeps of one image: ``keep [N]`` bool and, for keypoints, ``keypoints [N, K]`` bool
    (True: the keypoint stays visible). ``keypoints`` is ``None`` when the selector does not judge keypoints."""

    keep: Tensor
    keypoints: Tensor | None = None


@dataclass
class LabeledStats:
    """Statistics of the labeled set that count matching matches.

    Attributes:
        num_images: labeled images (for classification: labeled examples).
        instances: ``{category_id: number of labeled instances}`` (for classification: examples per class).
            Every category of the dataset should appear, with 0 when it has no instance.
        num_keypoints: ``K`` for keypoint tasks, else ``None``.
        visible_keypoints: visible (``v > 0``) keypoints summed over all labeled instances.
    """

    num_images: int
    instances: dict[int, int]
    num_keypoints: int | None = None
    visible_keypoints: int = 0

    @property
    def num_instances(self) -> int:
        return int(sum(self.instances.values()))

    def per_image(self, category: int | None = None) -> float:
        """Mean instances per labeled image, of one category or of all."""
        if self.num_images <= 0:
            return 0.0
        count = self.num_instances if category is None else self.instances.get(int(category), 0)
        return count / self.num_images

    @property
    def keypoints_per_instance(self) -> float:
        return self.visible_keypoints / self.num_instances if self.num_instances else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"num_images": self.num_images, "instances": {str(k): v for k, v in sorted(self.instances.items())},
                "num_keypoints": self.num_keypoints, "visible_keypoints": self.visible_keypoints}

    @classmethod
    def from_targets(cls, targets: Iterable[Mapping[str, Any]], category_ids: Sequence[int],
                     num_keypoints: int | None = None) -> "LabeledStats":
        """Count a labeled set from its training targets (``{"label": int}`` or ``{"labels": [N], "keypoints":
        [N, K, 3]}``; instances with ``iscrowd`` set are not counted)."""
        counts = {int(c): 0 for c in category_ids}
        num_images = 0
        visible = 0
        for target in targets:
            num_images += 1
            if "labels" in target:
                labels = torch.as_tensor(target["labels"]).reshape(-1).long()
                crowd = target.get("iscrowd")
                mask = torch.ones_like(labels, dtype=torch.bool) if crowd is None else \
                    ~torch.as_tensor(crowd).reshape(-1).bool()
                for c, n in zip(*torch.unique(labels[mask], return_counts=True)):
                    counts[int(c)] = counts.get(int(c), 0) + int(n)
                kps = target.get("keypoints")
                if num_keypoints and kps is not None and len(kps):
                    visible += int((torch.as_tensor(kps)[mask][..., 2] > 0).sum())
            else:
                label = int(torch.as_tensor(target["label"]))
                counts[label] = counts.get(label, 0) + 1
        return cls(num_images=num_images, instances=counts, num_keypoints=num_keypoints, visible_keypoints=visible)


@runtime_checkable
class PredictionStream(Protocol):
    """Re-iterable predictions of all unlabeled images: ``len()`` images, each ``iter()`` a new pass.

    A stream may also offer ``chunks()``: a pass that yields the predictions of many images concatenated into one
    :class:`ScoredPredictions` (image boundaries lost), for rules that only look at single predictions; use
    :func:`iter_chunks`, which falls back to per-image iteration.
    """

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[ScoredPredictions]: ...


def iter_chunks(predictions: PredictionStream) -> Iterator[ScoredPredictions]:
    """One pass over ``predictions`` in chunks of many images when the stream supports it (see
    :class:`PredictionStream`), else image by image."""
    chunks = getattr(predictions, "chunks", None)
    return chunks() if callable(chunks) else iter(predictions)


class ListStream:
    """A :class:`PredictionStream` over predictions held in memory (tests, small sets); counts its passes."""

    def __init__(self, predictions: Sequence[ScoredPredictions]):
        self.predictions = list(predictions)
        self.passes = 0

    def __len__(self) -> int:
        return len(self.predictions)

    def __iter__(self) -> Iterator[ScoredPredictions]:
        self.passes += 1
        return iter(self.predictions)


@runtime_checkable
class Selector(Protocol):
    """See the module docstring."""

    def fit(self, labeled: LabeledStats, predictions: PredictionStream) -> dict[str, Any]: ...

    def select(self, pred: ScoredPredictions) -> Selection: ...


# ------------------------------------------------------------------------------------------------ the maths
def round_half_up(x: float) -> int:
    """``round`` as in the paper's "round(m_c x N)": 2.5 -> 3 (Python's ``round`` gives 2)."""
    return int(math.floor(x + 0.5 + 1e-9))


def count_target(per_image: float, num_images: int) -> int:
    """How many pseudo-labels count matching keeps: ``round(per_image x num_images)``."""
    return max(0, round_half_up(per_image * num_images))


def kth_largest_threshold(scores: np.ndarray | Tensor, k: int) -> float:
    """The score threshold that keeps the ``k`` highest scores (``score >= threshold``; ties at it are kept).

    ``k <= 0`` -> ``inf`` (keep nothing); ``k >= len(scores)`` -> ``-inf`` (keep all).
    """
    arr = np.asarray(scores.numpy() if isinstance(scores, Tensor) else scores, dtype=np.float64).reshape(-1)
    if k <= 0:
        return KEEP_NOTHING
    if k >= arr.size:
        return KEEP_ALL
    return float(np.partition(arr, arr.size - k)[arr.size - k])


class TopK:
    """The ``k`` largest of a stream of floats, exactly, in ``O(k + chunk)`` memory."""

    def __init__(self, k: int):
        self.k = max(0, int(k))
        self._parts: list[np.ndarray] = []
        self._size = 0
        self.seen = 0

    def add(self, values: np.ndarray | Tensor) -> None:
        if self.k == 0:
            return
        arr = np.asarray(values.numpy() if isinstance(values, Tensor) else values, dtype=np.float64).reshape(-1)
        if arr.size == 0:
            return
        self._parts.append(arr)
        self._size += arr.size
        self.seen += arr.size
        if self._size > 2 * self.k + 1024:
            self._compact()

    def _compact(self) -> None:
        arr = np.concatenate(self._parts) if self._parts else np.zeros(0)
        if arr.size > self.k:
            arr = np.partition(arr, arr.size - self.k)[arr.size - self.k:]
        self._parts = [arr]
        self._size = arr.size

    def threshold(self) -> float:
        """The k-th largest value seen, as :func:`kth_largest_threshold` of everything added."""
        if self.k == 0:
            return KEEP_NOTHING
        if self.seen <= self.k:
            return KEEP_ALL
        self._compact()
        return float(self._parts[0].min())


def _keep_at(scores: Tensor, threshold: float) -> Tensor:
    # Scores are compared in float64, as the thresholds were computed, so a tie is a tie.
    return scores.double() >= threshold


def json_threshold(t: float) -> float | None:
    """Thresholds in JSON: ``None`` for "keep nothing" (+inf) and "keep all" (-inf) are told apart by the count."""
    return None if math.isinf(t) else float(t)


def count_match_thresholds(labeled: LabeledStats, predictions: PredictionStream, per_category: bool = True,
                           share: float = 1.0) -> tuple[dict[int, float], dict[int, int]]:
    """One streaming pass: per category (or one global, key ``-1``) the threshold keeping ``round(share x m x N)``
    (``share`` 1: the paper's count matching).

    Returns ``(thresholds, targets)``: the threshold and the target count of each category.
    """
    n = len(predictions)
    if per_category:
        targets = {int(c): count_target(share * labeled.per_image(c), n) for c in labeled.instances}
    else:
        targets = {-1: count_target(share * labeled.per_image(), n)}
    tops = {c: TopK(k) for c, k in targets.items()}
    for pred in iter_chunks(predictions):
        if len(pred) == 0:
            continue
        if not per_category:
            tops[-1].add(pred.scores)
            continue
        for c in torch.unique(pred.labels).tolist():
            if c in tops:
                tops[c].add(pred.scores[pred.labels == c])
    return {c: top.threshold() for c, top in tops.items()}, targets


class ThresholdTable:
    """Per-category thresholds as a dense lookup (``keep = score >= table[label]``); a category without a threshold
    keeps nothing. ``-1`` as the only key is one threshold for every category."""

    def __init__(self, thresholds: Mapping[int, float]):
        self.thresholds = dict(thresholds)
        self.global_threshold = self.thresholds.get(-1) if set(self.thresholds) == {-1} else None
        ids = [c for c in self.thresholds if c >= 0]
        self.size = (max(ids) + 1) if ids else 0
        table = torch.full((self.size + 1,), KEEP_NOTHING, dtype=torch.float64)
        for c in ids:
            table[c] = self.thresholds[c]
        self.table = table

    def keep(self, scores: Tensor, labels: Tensor) -> Tensor:
        if self.global_threshold is not None:
            return _keep_at(scores, self.global_threshold)
        if len(labels) <= 64:  # a few predictions: plain Python beats the fixed cost of tensor ops
            get = self.thresholds.get
            return torch.tensor([s >= get(c, KEEP_NOTHING) for s, c in zip(scores.double().tolist(),
                                                                             labels.tolist())], dtype=torch.bool)
        idx = torch.where((labels >= 0) & (labels < self.size), labels, torch.full_like(labels, self.size))
        return scores.double() >= self.table[idx]


def instance_keep(pred: ScoredPredictions, thresholds: Mapping[int, float] | ThresholdTable,
                  per_category: bool = True) -> Tensor:
    """Keep mask ``[N]`` for per-category thresholds (categories without a threshold are dropped) or a global one
    (key ``-1``)."""
    if not per_category:
        return _keep_at(pred.scores, thresholds[-1] if isinstance(thresholds, Mapping) else
                        thresholds.global_threshold)
    table = thresholds if isinstance(thresholds, ThresholdTable) else ThresholdTable(thresholds)
    return table.keep(pred.scores, pred.labels)


def keypoint_count_threshold(labeled: LabeledStats, predictions: PredictionStream,
                             keep_fn) -> tuple[float, int, int]:
    """Second threshold of the paper: over the *kept* instances, keep the ``round(kpi x M)`` best keypoints where
    ``kpi`` is the labeled set's visible keypoints per instance and ``M`` the kept instances. Two streaming passes
    (count ``M``, then the exact k-th largest keypoint score); ``keep_fn(pred) -> [N] bool`` must be elementwise
    (it may be given many images' predictions at once). Returns ``(threshold, target, kept_instances)``."""
    kept = 0
    for pred in iter_chunks(predictions):
        if pred.keypoint_scores is not None and len(pred):
            kept += int(keep_fn(pred).sum())
    target = count_target(labeled.keypoints_per_instance, kept)
    top = TopK(target)
    for pred in iter_chunks(predictions):
        if pred.keypoint_scores is not None and len(pred):
            top.add(pred.keypoint_scores[keep_fn(pred)])
    return top.threshold(), target, kept


@dataclass
class SelectionCounter:
    """Running totals of a selection, for ``summary.json``."""

    num_images: int = 0
    predictions: dict[int, int] = field(default_factory=dict)
    kept: dict[int, int] = field(default_factory=dict)
    kept_keypoints: int = 0
    images_without_pseudo: int = 0

    def update(self, pred: ScoredPredictions, sel: Selection) -> None:
        self.num_images += 1
        labels = pred.labels.tolist()
        keep = sel.keep.tolist()
        for c, k in zip(labels, keep):
            self.predictions[c] = self.predictions.get(c, 0) + 1
            if k:
                self.kept[c] = self.kept.get(c, 0) + 1
        if sel.keypoints is not None:
            self.kept_keypoints += int(sel.keypoints[sel.keep].sum())
        if not any(keep):
            self.images_without_pseudo += 1


def check_selection(pred: ScoredPredictions, sel: Any, who: str = "selector") -> Selection:
    """Validate what a selector returned (shapes and dtypes); raise :class:`PluginContractError` (a ``TypeError``)
    naming the selector."""
    if not isinstance(sel, Selection):
        raise PluginContractError(f"{who}.select must return ddkit.engine.select.Selection, got {type(sel).__name__}")
    if sel.keep.dtype != torch.bool or sel.keep.shape != pred.scores.shape:
        raise PluginContractError(f"{who}.select: keep must be bool [{len(pred)}], got {sel.keep.dtype} "
                        f"{tuple(sel.keep.shape)}")
    if sel.keypoints is not None:
        want = None if pred.keypoint_scores is None else tuple(pred.keypoint_scores.shape)
        if sel.keypoints.dtype != torch.bool or tuple(sel.keypoints.shape) != want:
            raise PluginContractError(f"{who}.select: keypoints must be bool {want}, got {sel.keypoints.dtype} "
                            f"{tuple(sel.keypoints.shape)}")
    return sel
