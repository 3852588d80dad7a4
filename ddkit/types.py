"""Shared structures: the strategy specs that plugins yield and the data that flows between stages.

Conventions: boxes are ``xyxy`` in pixels of the image they refer to, never normalised; keypoints are
``[N, K, 3]`` with ``(x, y, score_or_visibility)``; images are float tensors ``[C, H, W]`` in ``[0, 1]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

from ddkit.strategy_kinds import KINDS  # noqa: F401  (re-exported: the registry and plugins read it here)


@dataclass(frozen=True)
class StrategySpec:
    """One named strategy a plugin registers.

    Args:
        name: the name a config block uses (``{name: wbf, ...}``); lower case, unique per kind.
        factory: called with the validated parameters as keyword arguments; returns the strategy.
        params: a dataclass whose fields are the keys a config block may set (``None``: no keys).
        summary: one line for ``ddkit plugins``.
        examples: config blocks (without ``name``) the contract tests build the strategy with; needed when some
            parameter has no default (a dataset's path, say). ``{}`` is always tried when every field has a default.
    """

    kind: ClassVar[str] = ""
    name: str
    factory: Callable[..., Any]
    params: type | None = None
    summary: str = ""
    examples: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class TransformSpec(StrategySpec):
    kind: ClassVar[str] = "transforms"


@dataclass(frozen=True)
class AggregatorSpec(StrategySpec):
    """``input`` says what the aggregator ensembles: ``instances`` (boxes), ``heatmaps`` or ``probs``."""

    kind: ClassVar[str] = "aggregators"
    input: str = "instances"


AGGREGATOR_INPUTS = ("instances", "heatmaps", "probs")  # what AggregatorSpec.input may say


@dataclass(frozen=True)
class SelectorSpec(StrategySpec):
    kind: ClassVar[str] = "selectors"


@dataclass(frozen=True)
class LossSpec(StrategySpec):
    kind: ClassVar[str] = "losses"


@dataclass(frozen=True)
class TaskSpec(StrategySpec):
    kind: ClassVar[str] = "tasks"


@dataclass(frozen=True)
class DatasetSpec(StrategySpec):
    """``read_at``, given a fixed-size model's input shape ``[C, H, W]``, returns the block keys that make the
    dataset read its images at that shape (an image folder's ``image_size`` and ``grayscale``), so that each file is
    resized once: a recipe's test and unlabeled parts at the train part's shape, ``ddkit eval --data`` at the
    model's. ``None``: the dataset reads at a shape of its own and its items are converted (``adapt_image``)."""

    kind: ClassVar[str] = "datasets"
    read_at: Callable[[list[int]], dict[str, Any]] | None = None


@dataclass(frozen=True)
class ModelSpec(StrategySpec):
    """``task`` names the task the model is built for (``classification``, ``detection``, ``keypoints``);
    ``also_tasks`` the other tasks it serves (one YOLO spec builds detectors and pose models); ``explain_file``,
    given a file that is not a ddkit checkpoint, returns one line saying how this model loads it (e.g. its weights
    under ``pretrained``), or ``None``: the core adds it to its refusal of such a file. ``export_hint``, given what
    ``ddkit export`` exported (a run, stage or checkpoint path), returns one line it prints after writing, e.g. how to
    write the file another library loads. ``open_file``, given a file that is not a ddkit checkpoint and that the user
    trusts (it may be a pickle: reading it runs code from it), returns ``(task name, model block, dataset info)``
    whose ``task.build_model(block, info)`` builds the model with the file's weights, or ``None`` when this model
    does not know the file: ``ddkit eval`` / ``ddkit predict --trust-checkpoint`` then take the file as it is."""

    kind: ClassVar[str] = "models"
    task: str = "classification"
    also_tasks: tuple[str, ...] = ()
    explain_file: Callable[[Any], str | None] | None = None
    export_hint: Callable[[str], str | None] | None = None
    open_file: Callable[[Any], tuple[str, dict[str, Any], DatasetInfo] | None] | None = None


SPEC_TYPES: dict[str, type[StrategySpec]] = {
    cls.kind: cls
    for cls in (TransformSpec, AggregatorSpec, SelectorSpec, LossSpec, TaskSpec, DatasetSpec, ModelSpec)
}


@dataclass
class Instances:
    """Detections (or labels) of one image.

    Attributes:
        boxes: ``[N, 4]`` float, ``xyxy`` in pixels.
        scores: ``[N]`` float confidence (1 for ground truth).
        labels: ``[N]`` int64 category ids of the dataset.
        keypoints: ``[N, K, 3]`` float ``(x, y, score)`` in pixels, or ``None``.
        image_size: ``(height, width)`` of the frame the coordinates refer to.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    keypoints: Tensor | None = None
    image_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        n = self.boxes.shape[0]
        if self.boxes.ndim != 2 or self.boxes.shape[1] != 4:
            raise ValueError(f"Instances.boxes must be [N, 4], got {tuple(self.boxes.shape)}")
        if self.scores.shape != (n,) or self.labels.shape != (n,):
            raise ValueError(
                f"Instances.scores and .labels must be [N]={n}, got {tuple(self.scores.shape)} and "
                f"{tuple(self.labels.shape)}"
            )
        if self.keypoints is not None and (self.keypoints.ndim != 3 or self.keypoints.shape[0] != n
                                           or self.keypoints.shape[2] != 3):
            raise ValueError(f"Instances.keypoints must be [N, K, 3], got {tuple(self.keypoints.shape)}")

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @classmethod
    def empty(cls, num_keypoints: int | None = None, image_size: tuple[int, int] | None = None) -> "Instances":
        kps = None if num_keypoints is None else torch.zeros(0, num_keypoints, 3)
        return cls(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), kps, image_size)

    def __getitem__(self, index: Tensor | slice) -> "Instances":
        """Select instances by boolean mask, index tensor or slice."""
        kps = None if self.keypoints is None else self.keypoints[index]
        return Instances(self.boxes[index], self.scores[index], self.labels[index], kps, self.image_size)

    def to(self, device: torch.device | str) -> "Instances":
        kps = None if self.keypoints is None else self.keypoints.to(device)
        return replace(self, boxes=self.boxes.to(device), scores=self.scores.to(device),
                       labels=self.labels.to(device), keypoints=kps)

    def sorted_by_score(self) -> "Instances":
        return self[torch.argsort(self.scores, descending=True, stable=True)]


@runtime_checkable
class Transform(Protocol):
    """One view of multi-transform inference: maps images forward and predictions back.

    A transform factory returns one ``Transform`` or a list of them (``scale`` with several sizes is several views).
    """

    name: str

    def forward_image(self, image: Tensor) -> Tensor:
        """``[C, H, W] -> [C, H', W']``."""

    def forward_instances(self, inst: Instances, image_size: tuple[int, int]) -> Instances:
        """Map instances of the original ``(H, W)`` frame into the transformed image (RoIs for keypoint heads)."""

    def inverse_instances(self, inst: Instances, image_size: tuple[int, int]) -> Instances:
        """Map predictions made on the transformed image back to the original ``(H, W)`` frame."""

    def inverse_heatmaps(self, heatmaps: Tensor) -> Tensor:
        """``[N, K, h, w]`` heatmaps of RoIs in the transformed frame -> the same RoIs' frame in the original."""

    def inverse_probs(self, probs: Tensor) -> Tensor:
        """``[..., C]`` class probabilities (identity for geometric transforms)."""


@dataclass
class DatasetInfo:
    """What a task and the labelling stage need to know about a dataset.

    Attributes:
        categories: COCO-style ``[{"id": int, "name": str}, ...]``; for classification ids are ``0..C-1``.
        num_keypoints: ``K`` for keypoint datasets, else ``None``.
        flip_indices: for each keypoint, the index of its mirror (left <-> right) under a horizontal flip.
        keypoint_sigmas: COCO OKS sigmas, one per keypoint.
    """

    categories: list[dict[str, Any]]
    num_keypoints: int | None = None
    flip_indices: list[int] | None = None
    keypoint_sigmas: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.categories)
