"""The ``label`` recipe section and the strategies built from it (transforms, aggregators, selector)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping

from ddkit.engine.prediction_kinds import PredictionKind, prediction_kind
from ddkit.engine.pseudo import COCO
from ddkit.errors import ConfigError
from ddkit.engine.keypoint_meta import require_flip_indices
from ddkit.ops.geometry import check_flip_indices
from ddkit.registry import _to_plain, parse_section
from ddkit.types import DatasetInfo

VIEW_METHODS = ("forward_image", "inverse_instances", "inverse_heatmaps", "inverse_probs")


@dataclass
class LabelConfig:
    """The ``label`` section of a recipe.

    Attributes:
        transforms: transform blocks; each may give several views (``scale`` with several sizes). The
            untransformed view (a transform whose views declare ``is_identity``) is also the "single view" of the
            quality report.
        aggregator: how views are ensembled (default ``prob_mean`` for classification, ``box_voting`` for boxes).
        keypoints: ``{aggregator: {name: heatmap_mean}}``: how keypoint heatmaps of the views are ensembled.
        selector: which aggregated predictions become pseudo-labels (default ``count_match``).
        batch_size: images per batch (each batch runs every view).
        shards: number of shard files (default: ``ceil(N / shard_size)``); the unit of resuming and of parallelism.
        shard_size: images per shard when ``shards`` is not set.
        keep_raw: also keep every view's own predictions (for ``ddkit bench``: ``raw_predictions.pt``).
        num_workers: DataLoader worker processes that decode images.
        quality: report pseudo-label quality (``None``: when the images have hidden ground truth).
        images: label the image files of this folder instead of the data section's unlabeled split; with ``coco``,
            the folder of that file's images (default: the COCO file's folder).
        coco: label the images listed in this COCO JSON (its annotations, if any, are the hidden ground truth).
        max_images: label only the first ``max_images`` unlabeled images (smoke runs).
        format: ``coco`` (``pseudo_labels.json``, what the student reads), ``yolo`` or ``both``: also a YOLO dataset
            in ``yolo/`` (``images/``, ``labels/*.txt``, ``data.yaml``) that Ultralytics trains on directly.
        yolo_images: how the YOLO dataset holds the images: ``symlink``, ``hardlink`` or ``copy``.
        yolo_labeled: merge the labeled images and their ground truth into the YOLO dataset (part ``labeled``).
    """

    transforms: list[Any] = field(default_factory=lambda: [{"name": "identity"}])
    aggregator: Any = None
    keypoints: dict[str, Any] = field(default_factory=lambda: {"aggregator": {"name": "heatmap_mean"}})
    selector: Any = field(default_factory=lambda: {"name": "count_match"})
    batch_size: int = 8
    shards: int | None = None
    shard_size: int = 256
    keep_raw: bool = False
    num_workers: int = 0
    quality: bool | None = None
    images: str | None = None
    coco: str | None = None
    max_images: int | None = None
    format: Literal["coco", "yolo", "both"] = "coco"
    yolo_images: Literal["symlink", "hardlink", "copy"] = "symlink"
    yolo_labeled: bool = False

    @property
    def writes_yolo(self) -> bool:
        return self.format != "coco"

    def __post_init__(self) -> None:
        for key in ("batch_size", "shard_size"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{key} must be an int >= 1, got {v!r}")
        if self.shards is not None and (isinstance(self.shards, bool) or not isinstance(self.shards, int)
                                        or self.shards < 1):
            raise ValueError(f"shards must be an int >= 1 or null, got {self.shards!r}")
        if self.max_images is not None and (not isinstance(self.max_images, int) or self.max_images < 1):
            raise ValueError(f"max_images must be an int >= 1 or null, got {self.max_images!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {self.num_workers!r}")
        if not isinstance(self.transforms, (list, tuple)) or not self.transforms:
            raise ValueError("transforms must be a non-empty list of transform blocks, e.g. [{name: identity}]")
        if not isinstance(self.keypoints, Mapping) or set(self.keypoints) - {"aggregator"}:
            raise ValueError(f"keypoints must be {{aggregator: {{name: heatmap_mean}}}}, got {self.keypoints!r}")
        if self.yolo_labeled and not self.writes_yolo:
            raise ValueError("yolo_labeled: true needs a YOLO dataset to merge into; set format: both (or yolo), "
                             "or yolo_labeled: false")


def parse_label_config(section: Any, where: str = "label") -> LabelConfig:
    """Validate the ``label`` section's own keys (strategy blocks are checked when they are built)."""
    block = _to_plain(section) or {}
    if isinstance(block, LabelConfig):
        return block
    if not isinstance(block, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(block).__name__}")
    block = {k: v for k, v in block.items() if not (v is None and k in ("transforms", "selector", "keypoints"))}
    return parse_section(LabelConfig, block, where)


def strategy_block(cfg: Any) -> dict[str, Any]:
    """A strategy block as a plain dict (``"wbf"`` -> ``{"name": "wbf"}``)."""
    b = _to_plain(cfg)
    return {"name": b} if isinstance(b, str) else dict(b)


@dataclass
class Strategies:
    """Everything built from the ``label`` section before any image is read.

    ``views[i]`` came from ``view_blocks[i]``; ``ensemble_views`` are the views the aggregator ensembles (all but an
    untransformed view added only for the quality report); ``single_index`` is the untransformed view, if any."""

    kind: PredictionKind
    views: list[Any]
    view_blocks: list[dict[str, Any]]
    aggregator: Any
    aggregator_block: dict[str, Any]
    keypoint_aggregator: Any
    keypoint_block: dict[str, Any] | None
    selector_block: dict[str, Any]
    make_selector: Callable[[], Any]
    single_index: int | None
    transform_blocks: list[dict[str, Any]] = field(default_factory=list)  # as configured (one may give many views)
    ensemble_views: list[int] = field(default_factory=list)
    selector_needs_labeled: bool = False

    @property
    def view_names(self) -> list[str]:
        return [getattr(v, "name", type(v).__name__) for v in self.views]

    def fingerprint_views(self) -> list[dict[str, Any]]:
        """The view blocks as the shard fingerprint describes them (an added single view is marked, so shards of
        a run with and without the quality report differ)."""
        return [b if i in self.ensemble_views else {**b, "ddkit_single_only": True}
                for i, b in enumerate(self.view_blocks)]


def _build_views(cfg: LabelConfig, info: DatasetInfo, registry: Any, where: str
                 ) -> tuple[list[Any], list[dict[str, Any]], list[dict[str, Any]]]:
    views, view_blocks, transform_blocks = [], [], []
    for i, raw in enumerate(cfg.transforms):
        block = strategy_block(raw)
        transform_blocks.append(block)
        given = block.get("flip_indices") is not None  # null (the default) means the dataset's own pairs
        entry, _ = registry.params("transforms", block, where=f"{where}.transforms[{i}]")
        params = entry.spec.params
        takes_pairs = params is not None and "flip_indices" in {f.name for f in dataclasses.fields(params)}
        if given and takes_pairs and info.num_keypoints:
            try:
                check_flip_indices(block["flip_indices"], info.num_keypoints)
            except ValueError as err:
                raise ConfigError(f"{where}.transforms[{i}].flip_indices: {err}") from None
        if info.flip_indices and takes_pairs and not given:
            block["flip_indices"] = list(info.flip_indices)  # the dataset's mirror pairs, not COCO's
        built = registry.build("transforms", block, where=f"{where}.transforms[{i}]")
        built = built if isinstance(built, (list, tuple)) else [built]
        if info.num_keypoints and not given and any(getattr(v, "flip", False) for v in built):
            require_flip_indices(info, f"{where}.transforms[{i}] ({block['name']})")  # never COCO's pairs by default
        for view in built:
            for method in VIEW_METHODS:
                if not callable(getattr(view, method, None)):
                    raise ConfigError(f"{where}.transforms[{i}]: {block['name']!r} gave a view without {method}()")
            views.append(view)
            view_blocks.append(block)
    return views, view_blocks, transform_blocks


def _build_aggregator(block: dict[str, Any], takes: str, registry: Any, where: str, task: Any) -> Any:
    """Build an aggregator block that must ensemble ``takes`` (``probs``, ``instances`` or ``heatmaps``)."""
    entry, _ = registry.params("aggregators", block, where=where)
    if entry.spec.input != takes:
        fits = [s.name for s in registry.specs("aggregators") if s.input == takes]
        if takes == "heatmaps":
            raise ConfigError(f"{where}: {entry.spec.name!r} ensembles {entry.spec.input}, not heatmaps; use one "
                              f"of: {', '.join(fits)}")
        extra = " (heatmap aggregators go under label.keypoints.aggregator)" if entry.spec.input == "heatmaps" else ""
        raise ConfigError(f"{where}: {entry.spec.name!r} ensembles {entry.spec.input}, but the task "
                          f"{task.name!r} predicts {takes}{extra}; use one of: {', '.join(fits)}")
    aggregator = registry.build("aggregators", block, where=where)
    if not callable(aggregator):
        raise ConfigError(f"{where}: {entry.spec.name!r} ({entry.provider}) built a {type(aggregator).__name__}, "
                          f"which is not callable: an aggregator is called with the views' predictions")
    return aggregator


def selector_factory(block: dict[str, Any], registry: Any, where: str) -> Callable[[], Any]:
    """A function that builds a fresh selector of ``block`` (checked now), one per fit."""
    registry.params("selectors", block, where=where)

    def make_selector() -> Any:
        sel = registry.build("selectors", block, where=where)
        for method in ("fit", "select"):
            if not callable(getattr(sel, method, None)):
                raise ConfigError(f"{where}: {block['name']!r} has no {method}() (see ddkit.engine.select)")
        return sel

    return make_selector


def build_selector(cfg: LabelConfig, registry: Any = None, where: str = "label") -> tuple[dict[str, Any], Any]:
    """``(block, selector)`` of the section's selector (built once to check it and to ask its capabilities)."""
    if registry is None:
        from ddkit.plugin_manager import get_registry

        registry = get_registry()
    block = strategy_block(cfg.selector)
    return block, selector_factory(block, registry, f"{where}.selector")()


def build_strategies(cfg: LabelConfig, task: Any, info: DatasetInfo, registry: Any = None,
                     where: str = "label", need_single: bool = False) -> Strategies:
    """Build transforms, aggregators and the selector of a label section; a bad block raises ConfigError here."""
    if registry is None:
        from ddkit.plugin_manager import get_registry

        registry = get_registry()
    kind = prediction_kind(task)
    views, view_blocks, transform_blocks = _build_views(cfg, info, registry, where)
    agg_block = strategy_block(cfg.aggregator if cfg.aggregator is not None else kind.default_aggregator)
    aggregator = _build_aggregator(agg_block, kind.name, registry, f"{where}.aggregator", task)
    kp_agg, kp_block = None, None
    with_keypoints = kind.has_keypoint_heads and bool(info.num_keypoints)
    if with_keypoints and getattr(aggregator, "fuses_keypoints", False):
        kp_block = agg_block  # it fuses the views' predicted (regressed) keypoints itself: no heatmap stage
    elif with_keypoints and callable(getattr(task, "keypoint_heatmaps", None)):
        kp_block = strategy_block(cfg.keypoints.get("aggregator") or {"name": "heatmap_mean"})
        kp_agg = _build_aggregator(kp_block, "heatmaps", registry, f"{where}.keypoints.aggregator", task)
        missing = [i for i, v in enumerate(views) if not callable(getattr(v, "forward_instances", None))]
        if missing:
            raise ConfigError(f"{where}.transforms: view {view_blocks[missing[0]]['name']!r} has no "
                              f"forward_instances(), needed to map keypoint RoIs into it")
    sel_block = strategy_block(cfg.selector)
    make_selector = selector_factory(sel_block, registry, f"{where}.selector")
    needs_labeled = bool(getattr(make_selector(), "needs_labeled_stats", False))
    single = next((i for i, v in enumerate(views) if getattr(v, "is_identity", False)), None)
    ensemble = list(range(len(views)))
    if single is None and need_single:  # an untransformed view for the quality report only
        views.append(registry.build("transforms", "identity"))
        view_blocks.append({"name": "identity"})
        single = len(views) - 1
    return Strategies(kind, views, view_blocks, aggregator, agg_block, kp_agg, kp_block, sel_block, make_selector,
                      single, transform_blocks, ensemble, needs_labeled)


def check_output_format(cfg: LabelConfig, kind: PredictionKind, where: str = "label") -> None:
    """``label.format: yolo | both`` writes boxes: refused for pseudo-labels of another kind (one label per image)."""
    if cfg.writes_yolo and kind.pseudo_format != COCO:
        raise ConfigError(f"{where}.format={cfg.format!r}: a YOLO dataset holds boxes; {kind.name} pseudo-labels "
                          f"are one label per image (use {where}.format=coco)")


def check_label_section(cfg: LabelConfig, task: Any, info: DatasetInfo, registry: Any = None,
                        where: str = "label") -> None:
    """What the label and select stages would refuse, checked before any model trains: every strategy built (the
    aggregator's input against the task's predictions, the keypoint aggregator, the views, the selector) and the
    output format against the pseudo-labels' kind."""
    strategies = build_strategies(cfg, task, info, registry, where=where)
    check_output_format(cfg, strategies.kind, where)


# The recipe keys that decide the shards (every label key but the selection's): ``ddkit run``'s label stage reads
# these, its select stage the whole section, so another selector re-uses the shards.
LABEL_STAGE_KEYS: tuple[str, ...] = tuple(f"label.{f.name}" for f in dataclasses.fields(LabelConfig)
                                          if f.name not in ("selector", "quality"))
