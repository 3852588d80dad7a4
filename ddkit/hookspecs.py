"""pluggy hook specifications: one registration hook per strategy kind.

Each hook returns an iterable of the kind's spec (see :mod:`ddkit.types`). A plugin module implements any of them::

    from ddkit import hookimpl
    from ddkit.types import AggregatorSpec

    @hookimpl
    def ddkit_aggregators():
        yield AggregatorSpec(name="wbf", factory=WeightedBoxesFusion, params=WBFParams, summary="...")
"""
from __future__ import annotations

from typing import Iterable

import pluggy

from ddkit.types import (AggregatorSpec, DatasetSpec, LossSpec, ModelSpec, SelectorSpec, TaskSpec,
                         TransformSpec)

PROJECT = "ddkit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def ddkit_transforms() -> Iterable[TransformSpec]:
    """Test-time transforms for multi-transform inference (forward on images, inverse on predictions)."""


@hookspec
def ddkit_aggregators() -> Iterable[AggregatorSpec]:
    """Ensembling strategies that turn many views' predictions into one hard label."""


@hookspec
def ddkit_selectors() -> Iterable[SelectorSpec]:
    """Rules that keep the confident aggregated predictions as pseudo-labels."""


@hookspec
def ddkit_losses() -> Iterable[LossSpec]:
    """Training loss terms (hard labels, soft targets, hints)."""


@hookspec
def ddkit_tasks() -> Iterable[TaskSpec]:
    """Tasks: model builders, native loss, inference adapter and evaluator for one problem type."""


@hookspec
def ddkit_datasets() -> Iterable[DatasetSpec]:
    """Dataset formats and bundled datasets."""


@hookspec
def ddkit_models() -> Iterable[ModelSpec]:
    """Model architectures by name."""


HOOK_OF_KIND: dict[str, str] = {
    "transforms": "ddkit_transforms",
    "aggregators": "ddkit_aggregators",
    "selectors": "ddkit_selectors",
    "losses": "ddkit_losses",
    "tasks": "ddkit_tasks",
    "datasets": "ddkit_datasets",
    "models": "ddkit_models",
}
