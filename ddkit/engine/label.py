"""``ddkit label``: streaming multi-transform pseudo-labelling, count-matched selection, COCO output, shards, resume.

Stages (all artifacts under the stage folder, ``<run.out_dir>/label`` for the CLI)::

    unlabeled images --(batches)--> every transform's forward_image --> teacher (views of one shape in one call)
        --> inverse_instances / inverse_probs --> aggregator (batched) [--> keypoints: RoIs of the aggregated boxes
        mapped into each view, keypoint head, inverse_heatmaps, heatmap aggregator] --> shards/shard-*.pt
    shards --(streaming passes)--> selector.fit --> selector.select per image --> pseudo_labels.json
        + summary.json + skipped.jsonl (+ quality.json when the images have hidden ground truth,
        + raw_predictions.pt with ``keep_raw``)

Memory is bounded by one batch of views and one shard, whatever the number of images: shards hold at most
``shard_size`` images unless ``shards`` is set. A shard is written atomically with a fingerprint of everything
that determines its predictions; a restarted run skips the shards already written, and since the shard cut and the
batches inside a shard do not depend on the number of workers, ``--shard I/N``, ``torchrun`` and one process give
the same files.

Python API::

    result = label_dataset(task, teacher, info, unlabeled, labeled, {"transforms": [...], ...}, out_dir)
    result.pseudo_path, result.summary, result.quality
    train_set = load_pseudo_dataset(result.pseudo_path, source=unlabeled)   # ddkit.engine.pseudo
    result = run_label(cfg)                                               # a whole recipe, as the CLI does
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ddkit.engine.data import HiddenLabels, LABEL_KEYS, get_target, read_image
from ddkit.engine.pseudo import COCO, IMAGE_LABELS, PseudoLabelWriter
from ddkit.engine.select import LabeledStats, ScoredPredictions, SelectionCounter, check_selection
from ddkit.engine.shards import (ShardSet, fingerprint, load_shard, pack_instances, pack_probs, pack_targets,
                                 save_shard, shard_bounds, unpack_instances, worker_shards)
from ddkit.errors import ConfigError, DataError
from ddkit.engine.checkpoint import resolve_checkpoint
from ddkit.io import atomic_write_json, atomic_write_text, file_sha256
from ddkit.runtime import join_process_group, resolve_device, state_sha256
from ddkit.types import DatasetInfo, Instances

log = logging.getLogger("ddkit.label")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
DEFAULT_AGGREGATORS = {"probs": {"name": "prob_mean"}, "instances": {"name": "box_voting"}}


# ================================================================================================== configuration
@dataclass
class LabelConfig:
    """The ``label`` section of a recipe.

    Attributes:
        transforms: transform blocks; each may give several views (``scale`` with several sizes). The
            untransformed view (``identity``) is also the "single view" of the quality report.
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


def parse_label_config(section: Any, where: str = "label") -> LabelConfig:
    """Validate the ``label`` section's own keys (strategy blocks are checked when they are built)."""
    from ddkit.registry import _to_plain

    block = _to_plain(section) or {}
    if isinstance(block, LabelConfig):
        return block
    if not isinstance(block, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(block).__name__}")
    names = [f.name for f in dataclasses.fields(LabelConfig)]
    for key in block:
        if key not in names:
            hint = difflib.get_close_matches(str(key), names, n=1)
            did = f" Did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(f"{where}: unknown key {key!r}.{did} Valid keys: {', '.join(names)}")
    block = {k: v for k, v in block.items() if not (v is None and k in ("transforms", "selector", "keypoints"))}
    try:
        return LabelConfig(**block)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None


# ================================================================================================== strategies
@dataclass
class Strategies:
    """Everything built from the ``label`` section before any image is read."""

    views: list[Any]
    view_blocks: list[dict[str, Any]]
    aggregator: Any
    aggregator_block: dict[str, Any]
    keypoint_aggregator: Any
    keypoint_block: dict[str, Any] | None
    selector_block: dict[str, Any]
    make_selector: Callable[[], Any]
    single_index: int | None  # the view whose predictions are the "single untransformed view"
    transform_blocks: list[dict[str, Any]] = field(default_factory=list)  # as configured (one may give many views)

    @property
    def view_names(self) -> list[str]:
        return [getattr(v, "name", type(v).__name__) for v in self.views]


def _block(cfg: Any) -> dict[str, Any]:
    from ddkit.registry import _to_plain

    b = _to_plain(cfg)
    return {"name": b} if isinstance(b, str) else dict(b)


def build_strategies(cfg: LabelConfig, task: Any, info: DatasetInfo, registry: Any = None,
                     where: str = "label", need_single: bool = False) -> Strategies:
    """Build transforms, aggregators and the selector of a label section; a bad block raises ConfigError here."""
    if registry is None:
        from ddkit.plugin_manager import get_registry

        registry = get_registry()
    ptype = getattr(task, "prediction_type", None)
    if ptype not in ("probs", "instances"):
        raise ConfigError(f"task {getattr(task, 'name', task)!r}: prediction_type must be 'probs' or 'instances'")
    views, view_blocks, transform_blocks = [], [], []
    for i, raw in enumerate(cfg.transforms):
        block = _block(raw)
        transform_blocks.append(block)
        entry, _ = registry.params("transforms", block, where=f"{where}.transforms[{i}]")
        params = entry.spec.params
        if (info.flip_indices and params is not None and "flip_indices" not in block
                and "flip_indices" in {f.name for f in dataclasses.fields(params)}):
            block["flip_indices"] = list(info.flip_indices)  # the dataset's mirror pairs, not COCO's default
        built = registry.build("transforms", block, where=f"{where}.transforms[{i}]")
        for view in (built if isinstance(built, (list, tuple)) else [built]):
            for method in ("forward_image", "inverse_instances", "inverse_heatmaps", "inverse_probs"):
                if not callable(getattr(view, method, None)):
                    raise ConfigError(f"{where}.transforms[{i}]: {block['name']!r} gave a view without {method}()")
            views.append(view)
            view_blocks.append(block)
    agg_block = _block(cfg.aggregator if cfg.aggregator is not None else DEFAULT_AGGREGATORS[ptype])
    entry, _ = registry.params("aggregators", agg_block, where=f"{where}.aggregator")
    if entry.spec.input != ptype:
        fits = [s.name for s in registry.specs("aggregators") if s.input == ptype]
        extra = " (heatmap aggregators go under label.keypoints.aggregator)" if entry.spec.input == "heatmaps" else ""
        raise ConfigError(f"{where}.aggregator: {entry.spec.name!r} ensembles {entry.spec.input}, but the task "
                          f"{task.name!r} predicts {ptype}{extra}; use one of: {', '.join(fits)}")
    aggregator = registry.build("aggregators", agg_block, where=f"{where}.aggregator")
    kp_agg, kp_block = None, None
    if ptype == "instances" and info.num_keypoints and callable(getattr(task, "keypoint_heatmaps", None)):
        kp_block = _block(cfg.keypoints.get("aggregator") or {"name": "heatmap_mean"})
        entry, _ = registry.params("aggregators", kp_block, where=f"{where}.keypoints.aggregator")
        if entry.spec.input != "heatmaps":
            fits = [s.name for s in registry.specs("aggregators") if s.input == "heatmaps"]
            raise ConfigError(f"{where}.keypoints.aggregator: {entry.spec.name!r} ensembles {entry.spec.input}, "
                              f"not heatmaps; use one of: {', '.join(fits)}")
        kp_agg = registry.build("aggregators", kp_block, where=f"{where}.keypoints.aggregator")
        missing = [i for i, v in enumerate(views) if not callable(getattr(v, "forward_instances", None))]
        if missing:
            raise ConfigError(f"{where}.transforms: view {view_blocks[missing[0]]['name']!r} has no "
                              f"forward_instances(), needed to map keypoint RoIs into it")
    sel_block = _block(cfg.selector)
    registry.params("selectors", sel_block, where=f"{where}.selector")

    def make_selector() -> Any:
        sel = registry.build("selectors", sel_block, where=f"{where}.selector")
        for method in ("fit", "select"):
            if not callable(getattr(sel, method, None)):
                raise ConfigError(f"{where}.selector: {sel_block['name']!r} has no {method}() "
                                  f"(see ddkit.engine.select)")
        return sel

    make_selector()
    single = next((i for i, v in enumerate(views) if getattr(v, "name", None) == "identity"), None)
    strategies = Strategies(views, view_blocks, aggregator, agg_block, kp_agg, kp_block, sel_block, make_selector,
                            single, transform_blocks)
    if single is None and need_single:
        strategies.views.append(registry.build("transforms", "identity"))  # for the quality report only
        strategies.view_blocks.append({"name": "identity", "ddkit_single_only": True})
        strategies.single_index = len(strategies.views) - 1
    return strategies


def _ensemble_views(strategies: Strategies) -> list[int]:
    return [i for i, b in enumerate(strategies.view_blocks) if not b.get("ddkit_single_only")]


# ================================================================================================== sources
@dataclass
class Item:
    """One unlabeled image as read by a source (``image is None``: unreadable, ``reason`` says why)."""

    index: int
    image_id: int
    file_name: str
    image: Tensor | None
    target: dict[str, Any] | None = None  # hidden ground truth
    reason: str | None = None


class Source:
    """Unlabeled images in a fixed order. ``load(i) -> Item`` never raises for a bad image."""

    image_root: str | None = None
    has_ground_truth: bool = False

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, i: int) -> Item:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError


def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".strip()


def adapt_image(image: Tensor, shape: Sequence[int] | None) -> Tensor:
    """An image file read as RGB, made to fit a model with a fixed input ``[C, H, W]`` (``DatasetInfo.extra
    ["image_shape"]``, set by fixed-size datasets): grey or RGB channels, then a bilinear resize."""
    if not shape:
        return image
    c, h, w = (int(v) for v in shape)
    if image.shape[0] != c:
        if c == 1:
            image = (image[:3] * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
        elif image.shape[0] == 1:
            image = image.expand(c, -1, -1)
    if tuple(image.shape[-2:]) != (h, w):
        image = torch.nn.functional.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False,
                                                antialias=True)[0].clamp_(0, 1)
    return image.contiguous()


class FolderSource(Source):
    """The image files under a folder (recursively, sorted by path); ids are positions ``0..N-1``. With
    ``image_shape`` (a fixed-size classifier's input ``[C, H, W]``) images are converted to it."""

    def __init__(self, root: str | Path, image_shape: Sequence[int] | None = None):
        self.image_shape = image_shape
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConfigError(f"label.images: {self.root} is not a folder")
        self.files = sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*")
                            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        self.image_root = str(self.root.resolve())

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int) -> Item:
        try:
            image = adapt_image(read_image(self.root / self.files[i]), self.image_shape)
            return Item(i, i, self.files[i], image)
        except Exception as err:  # noqa: BLE001 - any failure skips the image
            return Item(i, i, self.files[i], None, reason=_reason(err))

    def describe(self) -> dict[str, Any]:
        return {"kind": "folder", "root": self.image_root, "num_images": len(self)}


class CocoSource(Source):
    """The images a COCO JSON lists (in its order); its annotations, if any, are the hidden ground truth."""

    def __init__(self, path: str | Path, image_root: str | Path | None = None,
                 image_shape: Sequence[int] | None = None):
        self.image_shape = image_shape
        self.path = Path(path)
        try:
            with open(self.path) as fh:
                data = json.load(fh)
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"label.coco: cannot read {self.path}: {err}") from None
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise ConfigError(f"label.coco: {self.path} has no 'images' list")
        self.images = [{"id": int(im["id"]), "file_name": str(im["file_name"])} for im in data["images"]]
        self.image_root = str(Path(image_root or self.path.parent).resolve())
        anns: dict[int, list] = defaultdict(list)
        for a in data.get("annotations") or []:
            anns[int(a["image_id"])].append(a)
        self.anns = dict(anns)
        self.has_ground_truth = bool(data.get("annotations"))

    def __len__(self) -> int:
        return len(self.images)

    def _target(self, image_id: int) -> dict[str, Any]:
        anns = self.anns.get(image_id, [])
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        t = {"image_id": image_id, "boxes": boxes,
             "labels": torch.tensor([int(a["category_id"]) for a in anns], dtype=torch.int64),
             "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64),
             "area": torch.tensor([float(a.get("area", 0.0)) for a in anns], dtype=torch.float32)}
        if anns and all("keypoints" in a for a in anns):
            t["keypoints"] = torch.tensor([a["keypoints"] for a in anns], dtype=torch.float32).reshape(len(anns), -1, 3)
        return t

    def load(self, i: int) -> Item:
        im = self.images[i]
        target = self._target(im["id"]) if self.has_ground_truth else None
        try:
            image = adapt_image(read_image(Path(self.image_root) / im["file_name"]), self.image_shape)
            return Item(i, im["id"], im["file_name"], image, target)
        except Exception as err:  # noqa: BLE001
            return Item(i, im["id"], im["file_name"], None, target, reason=_reason(err))

    def describe(self) -> dict[str, Any]:
        return {"kind": "coco", "file": str(self.path.resolve()), "image_root": self.image_root,
                "num_images": len(self)}


class DatasetSource(Source):
    """A dataset's items (e.g. the unlabeled split). With a :class:`~ddkit.engine.data.HiddenLabels` view, its
    ``ground_truth`` is read (one decode per image) and kept as the hidden ground truth."""

    def __init__(self, dataset: Any, name: str = "dataset"):
        self.dataset = dataset
        self.name = name
        self.gt = getattr(dataset, "ground_truth", None)
        self.has_ground_truth = self.gt is not None
        root = getattr(dataset, "image_root", None) or getattr(self.gt, "image_root", None)
        self.image_root = None if root is None else str(root)

    def __len__(self) -> int:
        return len(self.dataset)

    def _file_name(self, i: int, target: Mapping[str, Any], image_id: int) -> str:
        if "file_name" in target:
            return str(target["file_name"])
        path = _file_of(self.dataset, i)
        return str(path) if path is not None else str(image_id)

    def load(self, i: int) -> Item:
        gt = None
        try:
            if self.gt is not None:
                image, gt = self.gt[i]
                target = HiddenLabels._hide(gt)
            else:
                image, target = self.dataset[i]
        except Exception as err:  # noqa: BLE001
            try:
                meta = get_target(self.gt if self.gt is not None else self.dataset, i)
            except Exception:  # noqa: BLE001
                meta = {}
            image_id = int(meta.get("image_id", i))
            gt = meta if self.gt is not None and any(k in meta for k in LABEL_KEYS) else None
            return Item(i, image_id, self._file_name(i, meta, image_id), None, gt, reason=_reason(err))
        image_id = int(target.get("image_id", i))
        if not isinstance(image, Tensor) or image.ndim != 3:
            return Item(i, image_id, self._file_name(i, target, image_id), None, gt,
                        reason=f"not an image tensor [C, H, W]: {type(image).__name__}")
        return Item(i, image_id, self._file_name(i, target, image_id), image, gt)

    def describe(self) -> dict[str, Any]:
        return {"kind": "dataset", "name": self.name, "type": type(self.dataset).__name__, "num_images": len(self)}


def _file_of(dataset: Any, i: int, depth: int = 0) -> str | None:
    """The image file of item ``i`` through Subset / HiddenLabels / ConcatDataset views (absolute path), if any."""
    if depth > 8:
        return None
    files = getattr(dataset, "files", None)
    if isinstance(files, (list, tuple)) and 0 <= i < len(files):
        return str(Path(files[i]).resolve())
    if hasattr(dataset, "ground_truth"):
        return _file_of(dataset.ground_truth, i, depth + 1)
    if hasattr(dataset, "indices") and hasattr(dataset, "dataset"):
        return _file_of(dataset.dataset, int(dataset.indices[i]), depth + 1)
    if hasattr(dataset, "_locate"):
        ds, j = dataset._locate(i)
        return _file_of(ds, j, depth + 1)
    return None


class _Range(torch.utils.data.Dataset):
    def __init__(self, source: Source, start: int, stop: int):
        self.source, self.start, self.stop = source, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> Item:
        return self.source.load(self.start + i)


def _as_list(items: list[Item]) -> list[Item]:
    return items


# ================================================================================================== timing
class Timer:
    """Wall-clock seconds per phase (``model`` is time inside the teacher)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def __call__(self, phase: str) -> "_Phase":
        return _Phase(self, phase)

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in sorted(self.seconds.items())}


class _Phase:
    def __init__(self, timer: Timer, phase: str):
        self.timer, self.phase = timer, phase

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        self.timer.seconds[self.phase] += time.perf_counter() - self.t0


# ================================================================================================== labelling
class Labeller:
    """Runs every view of a batch through the teacher and aggregates per image."""

    def __init__(self, task: Any, model: nn.Module, info: DatasetInfo, strategies: Strategies,
                 device: torch.device | str = "cpu", keep_raw: bool = False, timer: Timer | None = None):
        self.task, self.model, self.info, self.s = task, model, info, strategies
        self.device = torch.device(device)
        self.keep_raw = keep_raw
        self.timer = timer or Timer()
        self.ptype = task.prediction_type
        self.category_ids = [int(c["id"]) for c in info.categories]
        self.ens_views = _ensemble_views(strategies)
        self.keypoints = strategies.keypoint_aggregator is not None

    # ----------------------------------------------------------------------------------------- teacher calls
    def _predict(self, view_images: list[list[Tensor]]) -> list[list[Any]]:
        """Predictions ``[V][B]`` of the transformed images ``[V][B]``; images of one shape share a call."""
        groups: dict[Any, list[tuple[int, int]]] = defaultdict(list)
        shapes = {tuple(x.shape) for imgs in view_images for x in imgs}
        # Same-shape images batch without padding. Images of many sizes (real photos) go one call per view
        # instead, so that calls stay large; a task that stacks its input (probs) always gets one shape per call.
        by_shape = self.ptype == "probs" or len(shapes) <= len(view_images)
        for v, imgs in enumerate(view_images):
            for b, x in enumerate(imgs):
                groups[tuple(x.shape) if by_shape else ("view", v)].append((v, b))
        out: list[list[Any]] = [[None] * len(imgs) for imgs in view_images]
        with torch.no_grad():
            for members in groups.values():
                with self.timer("model"):
                    preds = self.task.predict(self.model, [view_images[v][b] for v, b in members], native_size=True)
                if len(preds) != len(members):
                    raise RuntimeError(f"task {self.task.name!r}: predict returned {len(preds)} results for "
                                       f"{len(members)} images")
                for (v, b), p in zip(members, preds):
                    out[v][b] = p
        return out

    def _keypoints(self, view_images: list[list[Tensor]], ens: list[Instances],
                   sizes: list[tuple[int, int]]) -> list[Instances]:
        """Keypoints of the aggregated boxes: RoIs mapped into each view, heatmaps back into the RoI frame,
        averaged by the heatmap aggregator."""
        todo = [b for b, inst in enumerate(ens) if len(inst)]
        if not todo:
            return [Instances(i.boxes, i.scores, i.labels, torch.zeros(len(i), self.info.num_keypoints, 3), i.image_size)
                    for i in ens]
        maps_per_view: list[list[Tensor]] = []
        for v in self.ens_views:
            view = self.s.views[v]
            with self.timer("transform"):
                rois = [view.forward_instances(Instances(ens[b].boxes, ens[b].scores, ens[b].labels,
                                                         image_size=sizes[b]), sizes[b]).boxes.to(self.device)
                        for b in todo]
            with torch.no_grad(), self.timer("model"):
                maps = self.task.keypoint_heatmaps(self.model, [view_images[v][b] for b in todo], rois,
                                                   native_size=True)
            with self.timer("inverse"):
                maps_per_view.append([view.inverse_heatmaps(m) for m in maps])
        out = list(ens)
        with self.timer("aggregate"):
            for j, b in enumerate(todo):
                stacked = torch.stack([maps_per_view[k][j] for k in range(len(self.ens_views))])
                kps = self.s.keypoint_aggregator(stacked, ens[b].boxes.to(stacked.device)).cpu()
                out[b] = Instances(ens[b].boxes, ens[b].scores, ens[b].labels, kps, sizes[b])
        for b, inst in enumerate(out):
            if inst.keypoints is None:
                out[b] = Instances(inst.boxes, inst.scores, inst.labels,
                                   torch.zeros(len(inst), self.info.num_keypoints, 3), inst.image_size)
        return out

    # ----------------------------------------------------------------------------------------- one batch
    def label(self, images: list[Tensor]) -> dict[str, Any]:
        """``images`` (readable, ``[C, H, W]``) -> packed ``ensemble``, ``single`` and ``raw`` predictions."""
        sizes = [(int(x.shape[-2]), int(x.shape[-1])) for x in images]
        with self.timer("transform"):
            images = [x.to(self.device) for x in images]
            view_images = [[view.forward_image(x) for x in images] for view in self.s.views]
        preds = self._predict(view_images)
        with self.timer("inverse"):
            if self.ptype == "probs":
                back = [torch.stack([view.inverse_probs(p.detach().float()) for p in preds[v]]).cpu()
                        for v, view in enumerate(self.s.views)]  # [V] x [B, C]
            else:
                back = [[view.inverse_instances(p, sizes[b]).to("cpu") for b, p in enumerate(preds[v])]
                        for v, view in enumerate(self.s.views)]
        single = None if self.s.single_index is None else back[self.s.single_index]
        with self.timer("aggregate"):
            if self.ptype == "probs":
                stacked = torch.stack([back[v] for v in self.ens_views])  # [V, B, C]
                labels, scores = self.s.aggregator(stacked)
                ids = torch.as_tensor(self.category_ids, dtype=torch.int64)
                ensemble = {"labels": ids[labels.long().cpu()], "scores": scores.float().cpu()}
            else:
                from ddkit.engine.fuse import aggregate_images

                per_image = [[back[v][b] for v in self.ens_views] for b in range(len(images))]
                ens = aggregate_images(self.s.aggregator, per_image, sizes)
        if self.ptype == "instances":
            if self.keypoints:
                ens = self._keypoints(view_images, ens, sizes)
            k = self.info.num_keypoints if self.keypoints else None
            ensemble = pack_instances(ens, k)
        out: dict[str, Any] = {"ensemble": ensemble, "single": None, "raw": None}
        if single is not None:
            out["single"] = pack_probs(single, self.category_ids) if self.ptype == "probs" else \
                pack_instances(single, self.info.num_keypoints if self.keypoints else None)
        if self.keep_raw:
            out["raw"] = [pack_probs(back[v], self.category_ids) if self.ptype == "probs" else
                          pack_instances(back[v]) for v in self.ens_views]
        return out


def _cat_packed(parts: list[dict[str, Tensor]]) -> dict[str, Tensor] | None:
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def label_shard(labeller: Labeller, source: Source, start: int, stop: int, batch_size: int,
                num_workers: int = 0, progress: Any = None) -> dict[str, Any]:
    """Label images ``[start, stop)`` of ``source``; returns the shard record (without format/fingerprint)."""
    loader = torch.utils.data.DataLoader(_Range(source, start, stop), batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, collate_fn=_as_list)
    meta: dict[str, list] = {"index": [], "image_id": [], "height": [], "width": [], "file_name": []}
    ensemble, single, raw, targets, skipped = [], [], [], [], []
    t_read = time.perf_counter()
    for items in loader:
        labeller.timer.seconds["read"] += time.perf_counter() - t_read
        ok = [it for it in items if it.image is not None]
        for it in items:
            if it.image is None:
                skipped.append({"index": it.index, "image_id": it.image_id, "file": it.file_name,
                                "reason": it.reason or "unreadable"})
        if ok:
            out = labeller.label([it.image for it in ok])
            with labeller.timer("pack"):
                for it in ok:
                    meta["index"].append(it.index)
                    meta["image_id"].append(it.image_id)
                    meta["height"].append(int(it.image.shape[-2]))
                    meta["width"].append(int(it.image.shape[-1]))
                    meta["file_name"].append(it.file_name)
                    targets.append(it.target)
                ensemble.append(out["ensemble"])
                single.append(out["single"])
                raw.append(out["raw"])
        if progress is not None:
            progress.update(len(items))
        t_read = time.perf_counter()
    with labeller.timer("pack"):
        images = {k: torch.tensor(v, dtype=torch.int64) for k, v in meta.items() if k != "file_name"}
        images["file_names"] = "\0".join(meta["file_name"])  # one string unpickles much faster than a list
        raw_views = None
        if labeller.keep_raw:
            raw_views = {"names": [labeller.s.view_names[v] for v in labeller.ens_views],
                         "views": [_cat_packed([r[v] for r in raw]) for v in range(len(labeller.ens_views))]}
        empty = pack_probs(torch.zeros(0, len(labeller.category_ids)), labeller.category_ids)
        if labeller.ptype == "probs":
            empty_ens = {"labels": empty["labels"], "scores": empty["scores"]}
        else:
            empty_ens = pack_instances([], labeller.info.num_keypoints if labeller.keypoints else None)
            empty = empty_ens
        return {"images": images, "ensemble": _cat_packed(ensemble) or empty_ens,
                "single": (_cat_packed(single) or empty) if labeller.s.single_index is not None else None,
                "raw": raw_views, "targets": pack_targets(targets) if targets else None, "skipped": skipped}


# ================================================================================================== merging
def _image_slices(record: Mapping[str, Any], key: str, ptype: str) -> Iterator[tuple[int, Any]]:
    """``(j, per-image prediction)`` for every image of a shard: Instances or ``(label, score)``."""
    packed = record[key]
    n = len(record["images"]["image_id"])
    if ptype == "probs":
        for j in range(n):
            yield j, (packed["labels"][j:j + 1], packed["scores"][j:j + 1])
    else:
        sizes = torch.stack([record["images"]["height"], record["images"]["width"]], 1).tolist()
        for j, inst in enumerate(unpack_instances(packed, sizes)):
            yield j, inst


def _scored(pred: Any, ptype: str) -> ScoredPredictions:
    if ptype == "probs":
        labels, scores = pred
        return ScoredPredictions(scores.float(), labels.long())
    kps = None if pred.keypoints is None else pred.keypoints[..., 2]
    return ScoredPredictions(pred.scores, pred.labels, kps)


class ShardStream:
    """A :class:`~ddkit.engine.select.PredictionStream` over the shard files (each pass re-reads them, mapped)."""

    def __init__(self, shards: ShardSet, key: str, ptype: str, num_images: int):
        self.shards, self.key, self.ptype, self.num_images = shards, key, ptype, num_images

    def __len__(self) -> int:
        return self.num_images

    def __iter__(self) -> Iterator[ScoredPredictions]:
        for s in range(self.shards.num_shards):
            record = load_shard(self.shards.path(s), mmap=True)
            for _, pred in _image_slices(record, self.key, self.ptype):
                yield _scored(pred, self.ptype)

    def chunks(self) -> Iterator[ScoredPredictions]:
        """One :class:`ScoredPredictions` per shard (all its images' predictions concatenated)."""
        for s in range(self.shards.num_shards):
            packed = load_shard(self.shards.path(s), mmap=True)[self.key]
            kps = packed.get("keypoints")
            yield ScoredPredictions(packed["scores"].float(), packed["labels"].long(),
                                    None if kps is None else kps[..., 2])


def labeled_stats(dataset: Any, info: DatasetInfo, keypoints: bool) -> LabeledStats:
    """:class:`LabeledStats` of a labeled dataset, from its targets (no image is decoded when it has
    ``get_target``)."""
    targets = (get_target(dataset, i) for i in range(len(dataset)))
    return LabeledStats.from_targets(targets, [int(c["id"]) for c in info.categories],
                                     info.num_keypoints if keypoints else None)


@dataclass
class LabelResult:
    """What a labelling run produced (``complete`` is False for a worker that only labelled its part)."""

    out_dir: Path
    complete: bool
    pseudo_path: Path | None = None
    summary: dict[str, Any] | None = None
    quality: dict[str, Any] | None = None
    raw_path: Path | None = None
    skipped_path: Path | None = None
    shards_done: list[int] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)


class _Quality:
    """Accumulates pseudo-label quality against hidden ground truth, image by image."""

    def __init__(self, ptype: str, info: DatasetInfo):
        self.ptype, self.info = ptype, info
        self.correct = self.total = self.sel_correct = self.sel_total = 0
        self.results: list[dict[str, Any]] = []
        self.tp = self.n_sel = self.n_gt = 0

    def add(self, image_id: int, pred: Any, keep: Tensor, gt: Mapping[str, Tensor]) -> None:
        if self.ptype == "probs":
            label = int(pred[0][0])
            ok = int(label == int(gt["label"]))
            self.correct += ok
            self.total += 1
            if bool(keep[0]):
                self.sel_correct += ok
                self.sel_total += 1
            return
        from ddkit.engine.bench import greedy_match
        from ddkit.engine.fuse import instances_to_results

        res = instances_to_results(image_id, pred)
        if pred.keypoints is not None:
            for r, k in zip(res, pred.keypoints.tolist()):
                r["keypoints"] = [v for xyz in k for v in (xyz[0], xyz[1], 1)]
        self.results += res
        crowd = gt["iscrowd"].bool()
        sel = pred[keep]
        self.tp += int(greedy_match(sel.boxes, sel.scores, sel.labels, gt["boxes"][~crowd],
                                    gt["labels"][~crowd]).sum())
        self.n_sel += len(sel)
        self.n_gt += int((~crowd).sum())

    def report(self, gt_coco: dict[str, Any] | None) -> dict[str, Any]:
        if self.ptype == "probs":
            return {"accuracy": self.correct / max(self.total, 1), "images": self.total,
                    "selected": self.sel_total, "coverage": self.sel_total / max(self.total, 1),
                    "selected_accuracy": self.sel_correct / self.sel_total if self.sel_total else None}
        from ddkit.engine.coco_eval import coco_evaluate

        out: dict[str, Any] = {}
        bbox = coco_evaluate(gt_coco, self.results, "bbox")
        out.update({"AP": bbox["AP"], "AP50": bbox["AP50"], "AP75": bbox["AP75"], "AR@100": bbox["AR@100"]})
        sigmas = self.info.keypoint_sigmas  # None: COCO's 17, pycocotools' default
        if (sigmas is not None or self.info.num_keypoints == 17) and any("keypoints" in r for r in self.results):
            kp = coco_evaluate(gt_coco, [r for r in self.results if "keypoints" in r], "keypoints", sigmas=sigmas)
            out.update({"kp_AP": kp["AP"], "kp_AP50": kp["AP50"]})
        out.update({"precision": self.tp / self.n_sel if self.n_sel else None,
                    "recall": self.tp / self.n_gt if self.n_gt else None,
                    "selected": self.n_sel, "ground_truth": self.n_gt})
        return out


def _gt_coco(shards: ShardSet, info: DatasetInfo) -> dict[str, Any]:
    images, anns = [], []
    for s in range(shards.num_shards):
        rec = load_shard(shards.path(s), mmap=True)
        meta, t = rec["images"], rec["targets"]
        for iid, h, w in zip(meta["image_id"].tolist(), meta["height"].tolist(), meta["width"].tolist()):
            images.append({"id": iid, "height": h, "width": w})
        start = 0
        for j, n in enumerate(t["counts"].tolist()):
            iid = int(meta["image_id"][j])
            for k in range(start, start + n):
                x1, y1, x2, y2 = t["boxes"][k].tolist()
                area = float(t["area"][k]) if float(t["area"][k]) >= 0 else (x2 - x1) * (y2 - y1)
                ann = {"id": len(anns) + 1, "image_id": iid, "category_id": int(t["labels"][k]),
                       "bbox": [x1, y1, x2 - x1, y2 - y1], "area": area, "iscrowd": int(t["iscrowd"][k])}
                if "keypoints" in t:
                    kp = t["keypoints"][k]
                    ann["keypoints"] = kp.reshape(-1).tolist()
                    ann["num_keypoints"] = int((kp[:, 2] > 0).sum())
                anns.append(ann)
            start += n
    return {"images": images, "annotations": anns, "categories": [dict(c) for c in info.categories]}


def _format_quality_table(quality: Mapping[str, Any]) -> str:
    rows = [(name, q) for name, q in quality.items() if isinstance(q, Mapping)]
    if not rows:
        return ""
    keys = [k for k in rows[0][1] if isinstance(rows[0][1][k], (int, float)) or rows[0][1][k] is None]
    lines = ["| view | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for name, q in rows:
        cells = []
        for k in keys:
            v = q.get(k)
            cells.append("-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v)))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def merge_shards(shards: ShardSet, task: Any, info: DatasetInfo, strategies: Strategies, labeled: Any,
                 out_dir: Path, provenance: Mapping[str, Any], keep_raw: bool = False,
                 quality: bool | None = None, timer: Timer | None = None) -> LabelResult:
    """Select and write the outputs from complete shard files (see the module docstring)."""
    timer = timer or Timer()
    ptype = task.prediction_type
    keypoints = strategies.keypoint_aggregator is not None
    num_images = 0
    skipped: list[dict[str, Any]] = []
    has_targets = True
    has_single = True
    for s in range(shards.num_shards):
        rec = load_shard(shards.path(s), mmap=True)
        num_images += len(rec["images"]["image_id"])
        skipped += rec["skipped"]
        has_targets &= rec["targets"] is not None or len(rec["images"]["image_id"]) == 0
        has_single &= rec["single"] is not None
    skipped_path = atomic_write_text(out_dir / "skipped.jsonl", "".join(json.dumps(r) + "\n" for r in skipped))
    if num_images == 0:
        raise DataError(f"none of the {len(skipped)} unlabeled images could be read (see {skipped_path}); "
                        f"first: {skipped[0]['file'] if skipped else '-'}: {skipped[0]['reason'] if skipped else '-'}")
    do_quality = has_targets and has_single and quality is not False
    if quality and not do_quality:
        log.warning("label.quality: the unlabeled images have no hidden ground truth; no quality report")
    with timer("select"):
        stats = labeled_stats(labeled, info, keypoints) if labeled is not None else \
            LabeledStats(num_images=0, instances={int(c["id"]): 0 for c in info.categories})
        selector = strategies.make_selector()
        thresholds = selector.fit(stats, ShardStream(shards, "ensemble", ptype, num_images))
        single_sel = None
        if do_quality:
            single_sel = strategies.make_selector()
            single_thr = single_sel.fit(stats, ShardStream(shards, "single", ptype, num_images))
    prov = dict(provenance)
    prov.update(thresholds=thresholds, selector=strategies.selector_block)
    fmt = IMAGE_LABELS if ptype == "probs" else COCO
    writer = PseudoLabelWriter(out_dir / "pseudo_labels.json", fmt, info.categories, prov)
    counter = SelectionCounter()
    q_ens = _Quality(ptype, info) if do_quality else None
    q_single = _Quality(ptype, info) if do_quality else None
    raw_images: list[Any] = []
    who = f"selector {strategies.selector_block['name']!r}"
    try:
        for s in range(shards.num_shards):
            with timer("write"):
                rec = load_shard(shards.path(s), mmap=True)
                meta = {k: v.tolist() if isinstance(v, Tensor) else v for k, v in rec["images"].items()}
                names = file_names(meta)
                gts = None
                if do_quality:
                    gts = [{"label": int(x)} for x in rec["targets"]["label"]] if "label" in rec["targets"] else \
                        list(_gt_slices(rec))
                singles = dict(_image_slices(rec, "single", ptype)) if do_quality else {}
            for j, pred in _image_slices(rec, "ensemble", ptype):
                with timer("select"):
                    sp = _scored(pred, ptype)
                    sel = check_selection(sp, selector.select(sp), who)
                    counter.update(sp, sel)
                with timer("write"):
                    iid = meta["image_id"][j]
                    if fmt == COCO:
                        writer.add_image(iid, names[j], meta["height"][j], meta["width"][j], meta["index"][j])
                        kept = pred[sel.keep]
                        vis = None if sel.keypoints is None else sel.keypoints[sel.keep]
                        writer.add_instances(iid, kept, vis)
                    elif bool(sel.keep[0]):
                        writer.add_image(iid, names[j], meta["height"][j], meta["width"][j], meta["index"][j])
                        writer.add_label(iid, int(pred[0][0]), float(pred[1][0]))
                if do_quality:
                    with timer("quality"):
                        q_ens.add(iid, pred, sel.keep, gts[j])
                        ssp = _scored(singles[j], ptype)
                        q_single.add(iid, singles[j], single_sel.select(ssp).keep, gts[j])
            if keep_raw:
                raw_images += _raw_images(rec, ptype, gts)
        with timer("write"):
            pseudo_path = writer.close()
    except BaseException:
        writer.abort()
        raise
    summary = _summary(stats, counter, thresholds, info, num_images, skipped, shards, pseudo_path, keypoints)
    quality_report = None
    if do_quality:
        with timer("quality"):
            gt_coco = None if ptype == "probs" else _gt_coco(shards, info)
            quality_report = {"single": q_single.report(gt_coco), "ensemble": q_ens.report(gt_coco),
                              "single_thresholds": single_thr,
                              "views": [strategies.view_names[v] for v in _ensemble_views(strategies)]}
        atomic_write_json(out_dir / "quality.json", quality_report)
    atomic_write_json(out_dir / "summary.json", summary)
    raw_path = None
    if keep_raw:
        from ddkit.engine.bench import RawPredictions, save_raw

        names = load_shard(shards.path(0), mmap=True)["raw"]["names"]
        raw_path = save_raw(RawPredictions(ptype, raw_images, [dict(c) for c in info.categories], names),
                            out_dir / "raw_predictions.pt")
    return LabelResult(out_dir=out_dir, complete=True, pseudo_path=pseudo_path, summary=summary,
                       quality=quality_report, raw_path=raw_path, skipped_path=skipped_path)


def file_names(meta: Mapping[str, Any]) -> list[str]:
    """The file names of a shard's images (stored as one NUL-separated string)."""
    n = len(meta["image_id"])
    return meta["file_names"].split("\0") if n else []


def _gt_slices(rec: Mapping[str, Any]) -> Iterator[dict[str, Tensor]]:
    t = rec["targets"]
    start = 0
    for n in t["counts"].tolist():
        sl = slice(start, start + n)
        g = {"boxes": t["boxes"][sl], "labels": t["labels"][sl], "iscrowd": t["iscrowd"][sl]}
        if "keypoints" in t:
            g["keypoints"] = t["keypoints"][sl]
        start += n
        yield g


def _raw_images(rec: Mapping[str, Any], ptype: str, gts: list | None) -> list[Any]:
    from ddkit.engine.bench import RawImage

    meta, raw = rec["images"], rec["raw"]
    if raw is None:
        return []
    sizes = torch.stack([meta["height"], meta["width"]], 1).tolist()
    per_view = [unpack_instances(v, sizes) if ptype == "instances" else v["probs"] for v in raw["views"]]
    out = []
    for j in range(len(meta["image_id"])):
        target = None
        if gts is not None:
            target = {k: v for k, v in gts[j].items() if k in ("boxes", "labels", "label")}
        img = RawImage(int(meta["image_id"][j]), tuple(sizes[j]), target=target)
        if ptype == "instances":
            img.views = [pv[j] for pv in per_view]
        else:
            img.probs = torch.stack([pv[j] for pv in per_view])
        out.append(img)
    return out


def _summary(stats: LabeledStats, counter: SelectionCounter, thresholds: Mapping[str, Any], info: DatasetInfo,
             num_images: int, skipped: list, shards: ShardSet, pseudo_path: Path, keypoints: bool) -> dict[str, Any]:
    per_cat = []
    score_thr = thresholds.get("score") if isinstance(thresholds.get("score"), Mapping) else None
    for c in info.categories:
        cid = int(c["id"])
        thr = None
        if score_thr is not None:
            thr = score_thr.get(str(cid), score_thr.get("-1"))
        elif isinstance(thresholds.get("score"), (int, float)):
            thr = thresholds["score"]
        per_cat.append({"id": cid, "name": c.get("name", str(cid)), "threshold": thr,
                        "labeled_per_image": stats.per_image(cid),
                        "pseudo_per_image": counter.kept.get(cid, 0) / num_images,
                        "predicted_per_image": counter.predictions.get(cid, 0) / num_images,
                        "pseudo": counter.kept.get(cid, 0)})
    kept = sum(counter.kept.values())
    out = {"images": {"unlabeled": num_images + len(skipped), "labelled": num_images, "skipped": len(skipped),
                      "without_pseudo_labels": counter.images_without_pseudo},
           "instances_per_image": {"labeled": stats.per_image(), "pseudo": kept / num_images,
                                   "aggregated": sum(counter.predictions.values()) / num_images},
           "pseudo_labels": kept, "labeled": stats.to_dict(), "thresholds": dict(thresholds),
           "per_category": per_cat, "num_shards": shards.num_shards, "pseudo_labels_file": pseudo_path.name}
    if keypoints:
        out["keypoints_per_instance"] = {"labeled": stats.keypoints_per_instance,
                                         "pseudo": counter.kept_keypoints / kept if kept else 0.0}
    return out


# ================================================================================================== the runner
def label_dataset(task: Any, teacher: nn.Module, info: DatasetInfo, unlabeled: Any, labeled: Any,
                  label_cfg: Mapping[str, Any] | LabelConfig, out_dir: str | Path, *,
                  teacher_checkpoint: str | Path | None = None, device: str | torch.device = "cpu",
                  worker: tuple[int, int] | None = None, max_shards: int | None = None,
                  progress: bool = False, registry: Any = None, strategies: Strategies | None = None,
                  seed: int = 0) -> LabelResult:
    """Pseudo-label ``unlabeled`` with ``teacher`` and write everything into ``out_dir`` (the stage folder).

    Args:
        task: the teacher's task (``ddkit.engine.task.Task``).
        teacher: the teacher model (put in eval mode here).
        info: the labeled set's dataset info (categories, keypoints).
        unlabeled: a dataset (e.g. ``Splits.unlabeled``, a :class:`HiddenLabels` view whose hidden labels give the
            quality report), a :class:`Source`, or ``None`` with ``label.images`` / ``label.coco`` set.
        labeled: the labeled dataset whose statistics count matching matches.
        label_cfg: the ``label`` section (see :class:`LabelConfig`).
        out_dir: where ``shards/``, ``pseudo_labels.json``, ``summary.json``, ... go.
        teacher_checkpoint: its path, for the provenance (sha256).
        worker: ``(i, n)``: label only the shards ``s % n == i`` and return without merging (``--shard i/n``).
            Under ``torchrun`` (``WORLD_SIZE > 1``) the rank is the worker and rank 0 merges.
        max_shards: stop after labelling this many shards (returns ``complete=False``; re-run to resume).
    """
    torch.manual_seed(seed)
    cfg = parse_label_config(label_cfg)
    out_dir = Path(out_dir)
    source = _make_source(cfg, unlabeled, info)
    need_single = cfg.quality is not False and source.has_ground_truth
    if strategies is None:
        strategies = build_strategies(cfg, task, info, registry, need_single=need_single)
    rank, world, started = join_process_group() if worker is None else (worker[0], worker[1], False)
    distributed = worker is None and world > 1
    n_total = len(source) if cfg.max_images is None else min(len(source), cfg.max_images)
    if n_total == 0:
        raise DataError(f"no unlabeled images to label in {source.describe()}")
    num_shards = cfg.shards or max(1, math.ceil(n_total / cfg.shard_size))
    teacher_sha = file_sha256(teacher_checkpoint) if teacher_checkpoint else state_sha256(teacher)
    fp = fingerprint({"teacher": teacher_sha, "transforms": strategies.view_blocks,
                      "aggregator": strategies.aggregator_block, "keypoints": strategies.keypoint_block,
                      "source": source.describe(), "n": n_total, "shards": num_shards,
                      "batch_size": cfg.batch_size, "keep_raw": cfg.keep_raw, "single": strategies.single_index,
                      "task": getattr(task, "name", None)})
    shards = ShardSet(out_dir / "shards", num_shards, fp)
    if rank == 0:
        for stale in shards.stale_files():
            log.info("removing %s: written with another shard count", stale)
            stale.unlink(missing_ok=True)
    timer = Timer()
    device = torch.device(device)
    teacher = teacher.to(device).eval()
    labeller = Labeller(task, teacher, info, strategies, device, cfg.keep_raw, timer)
    mine = worker_shards(num_shards, rank, world)
    todo = [s for s in mine if not shards.done(s)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = sum(shard_bounds(n_total, num_shards, s)[1] - shard_bounds(n_total, num_shards, s)[0] for s in todo)
        bar = tqdm(total=total, desc="labelling", unit="img")
    done_now: list[int] = []
    t0 = time.perf_counter()
    try:
        for s in todo:
            if max_shards is not None and len(done_now) >= max_shards:
                break
            start, stop = shard_bounds(n_total, num_shards, s)
            record = label_shard(labeller, source, start, stop, cfg.batch_size, cfg.num_workers, bar)
            record.update(fingerprint=fp, shard=s, num_shards=num_shards)
            with timer("write"):
                save_shard(shards.path(s), record)
            done_now.append(s)
    finally:
        if bar is not None:
            bar.close()
    timer.seconds["label_total"] += time.perf_counter() - t0
    partial = LabelResult(out_dir=out_dir, complete=False, shards_done=done_now, timing=timer.to_dict())
    if max_shards is not None and len(done_now) >= max_shards and len(done_now) < len(todo):
        return partial
    if distributed:
        import torch.distributed as dist

        dist.barrier()  # every part is labelled; rank 0 merges
        if rank != 0 and started:
            dist.destroy_process_group()
    if rank != 0 or (worker is not None and world > 1):
        return partial
    missing = shards.missing()
    if missing:
        raise DataError(f"{len(missing)} shard(s) of {num_shards} are not labelled yet ({missing[:10]}); run the "
                        f"workers of the missing parts, or the same command without --shard")
    provenance = {
        "description": "ddkit pseudo-labels", "ddkit_version": _version(),
        "teacher_checkpoint": None if teacher_checkpoint is None else str(teacher_checkpoint),
        "teacher_sha256": teacher_sha, "task": getattr(task, "name", None),
        "transforms": strategies.transform_blocks,
        "views": [strategies.view_names[v] for v in _ensemble_views(strategies)],
        "aggregator": strategies.aggregator_block, "keypoint_aggregator": strategies.keypoint_block,
        "source": source.describe(), "image_root": source.image_root,
        "dataset_info": {"num_keypoints": info.num_keypoints, "flip_indices": info.flip_indices,
                         "keypoint_sigmas": info.keypoint_sigmas},
    }
    t1 = time.perf_counter()
    result = merge_shards(shards, task, info, strategies, labeled, out_dir, provenance, cfg.keep_raw,
                          cfg.quality, timer)
    timer.seconds["merge_total"] += time.perf_counter() - t1
    result.shards_done = done_now
    result.timing = timer.to_dict()
    atomic_write_json(out_dir / "timing.json", result.timing)
    if started:
        import torch.distributed as dist

        dist.destroy_process_group()
    return result


def _make_source(cfg: LabelConfig, unlabeled: Any, info: DatasetInfo) -> Source:
    if isinstance(unlabeled, Source):
        return unlabeled
    shape = info.extra.get("image_shape") if info.extra else None
    if cfg.coco:
        return CocoSource(cfg.coco, cfg.images, shape)
    if cfg.images:
        return FolderSource(cfg.images, shape)
    if unlabeled is None:
        raise ConfigError("label: nothing to label: give label.images (a folder), label.coco (a COCO json) or a "
                          "data section with an unlabeled split")
    return DatasetSource(unlabeled, name="unlabeled")


def _version() -> str:
    import ddkit

    return ddkit.__version__


def quality_table(quality: Mapping[str, Any]) -> str:
    """The printed table of ``quality.json``: the single untransformed view next to the ensemble."""
    return _format_quality_table({k: v for k, v in quality.items() if k in ("single", "ensemble")})


def run_label(cfg: Any, run_dir: str | Path | None = None, keep_raw: bool | None = None,
              worker: tuple[int, int] | None = None, max_shards: int | None = None, progress: bool = False,
              registry: Any = None, source: str = "recipe") -> LabelResult:
    """Run the labelling stage of a loaded recipe (what ``ddkit label`` does): validate everything, load the
    teacher and the data, build every strategy, then label (nothing is read before the recipe is known good)."""
    from omegaconf import OmegaConf

    from ddkit.config import validate_config
    from ddkit.engine.checkpoint import load_model
    from ddkit.engine.data import build_data

    if registry is None:
        from ddkit.plugin_manager import get_registry

        registry = get_registry()
    validate_config(cfg, registry, source=source)
    label_section = OmegaConf.to_container(cfg.get("label"), resolve=True) if cfg.get("label") is not None else {}
    if keep_raw is not None:
        label_section["keep_raw"] = bool(keep_raw)
    lcfg = parse_label_config(label_section, where=f"{source}: label")
    run = cfg.get("run") or {}
    out_root = Path(run_dir if run_dir is not None else run.get("out_dir") or "runs/label")
    teacher_path = (cfg.get("teacher") or {}).get("checkpoint")
    if not teacher_path:
        raise ConfigError(f"{source}: teacher.checkpoint is required (a model.pt or a run folder)")
    device = resolve_device(run.get("device", "cpu"))
    rank = int(os.environ.get("RANK", "0")) if worker is None else 0
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if cfg.get("data") is None and _block(lcfg.selector)["name"].startswith("count_match"):
        raise ConfigError(f"{source}: selector {_block(lcfg.selector)['name']!r} matches the labeled set's counts; "
                          f"the recipe needs a data section with the labeled set")
    task, model, info = load_model(teacher_path, device="cpu", registry=registry)
    if cfg.get("task") is not None:
        want = _block(cfg.task)["name"]
        if want != task.name:
            raise ConfigError(f"{source}: task {want!r} does not match the teacher checkpoint's task {task.name!r}")
    # every strategy is built before the data: a dataset may read (verify) its images when it is built
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") is not None else {}
    has_unlabeled = bool(data_cfg.get("unlabeled")) or bool((data_cfg.get("split") or {}).get("unlabeled"))
    quality_possible = lcfg.coco is not None or (lcfg.images is None and has_unlabeled)
    strategies = build_strategies(lcfg, task, info, registry, where=f"{source}: label",
                                  need_single=lcfg.quality is not False and quality_possible)
    splits = build_data(cfg.data, registry=registry, where=f"{source}: data") if cfg.get("data") is not None \
        else None
    unlabeled = None if splits is None else splits.unlabeled
    if splits is not None and [int(c["id"]) for c in splits.info.categories] != [int(c["id"]) for c in info.categories]:
        raise ConfigError(f"{source}: the data's categories differ from the teacher's")
    if rank == 0:
        from ddkit.config import save_config

        save_config(cfg, out_root / "label")
    result = label_dataset(task, model, info, unlabeled, None if splits is None else splits.labeled, lcfg,
                           out_root / "label", teacher_checkpoint=resolve_checkpoint(teacher_path), device=device,
                           worker=worker, max_shards=max_shards, progress=progress, registry=registry,
                           strategies=strategies, seed=int(run.get("seed", 0) or 0))
    return result
