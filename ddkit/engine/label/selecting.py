"""The select stage: from complete shard files to ``pseudo_labels.json``, ``summary.json``, ``skipped.jsonl``
(+ ``quality.json`` when the images have hidden ground truth, + ``raw_predictions.pt`` with ``keep_raw``).

Passes over the shards: one scan of the image tables (memory-mapped), the selector's own ``fit`` passes (one per
fitted selector, more if the selector asks), and one pass that selects, writes, scores quality and gathers raw
predictions. Each pass reads every shard once.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from torch import Tensor

from ddkit.engine.data import get_target
from ddkit.engine.label.labeller import Timer
from ddkit.engine.label.quality import quality_pair
from ddkit.engine.label.sharded import ShardedLabels
from ddkit.engine.prediction_kinds import PredictionKind
from ddkit.engine.pseudo import PseudoLabelWriter, coco_categories
from ddkit.engine.raw_predictions import RawImage, RawPredictions, save_raw
from ddkit.engine.select import LabeledStats, ScoredPredictions, SelectionCounter, check_selection
from ddkit.engine.shards import ShardSet, load_shard
from ddkit.errors import DataError
from ddkit.io import atomic_write_json, atomic_write_text
from ddkit.types import DatasetInfo

log = logging.getLogger("ddkit.label")


def file_names(meta: Mapping[str, Any]) -> list[str]:
    """The file names of a shard's images (stored as one NUL-separated string)."""
    n = len(meta["image_id"])
    return meta["file_names"].split("\0") if n else []


class ShardStream:
    """A :class:`~ddkit.engine.select.PredictionStream` over the shard files (each pass re-reads them, mapped)."""

    def __init__(self, shards: ShardSet, key: str, kind: PredictionKind, num_images: int):
        self.shards, self.key, self.kind, self.num_images = shards, key, kind, num_images

    def __len__(self) -> int:
        return self.num_images

    def __iter__(self) -> Iterator[ScoredPredictions]:
        for s in range(self.shards.num_shards):
            record = load_shard(self.shards.path(s), mmap=True)
            for pred in self.kind.unpack(record[self.key], record["images"]):
                yield self.kind.scored(pred)

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
    yolo_path: Path | None = None  # data.yaml of the YOLO dataset (label.format: yolo | both)
    shards_done: list[int] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)


@dataclass
class ShardScan:
    """What one memory-mapped pass over the shards' image tables tells."""

    num_images: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    has_targets: bool = True
    has_single: bool = True
    has_keypoints: bool = False  # the aggregated predictions carry keypoints (heatmap head or regressed)
    raw_names: list[str] | None = None


def scan_shards(shards: ShardSet) -> ShardScan:
    scan = ShardScan()
    for s in range(shards.num_shards):
        rec = load_shard(shards.path(s), mmap=True)
        n = len(rec["images"]["image_id"])
        scan.num_images += n
        scan.skipped += rec["skipped"]
        scan.has_targets &= rec["targets"] is not None or n == 0
        scan.has_single &= rec["single"] is not None
        scan.has_keypoints |= "keypoints" in rec["ensemble"]
        if rec["raw"] is not None and scan.raw_names is None:
            scan.raw_names = list(rec["raw"]["names"])
    return scan


@dataclass
class SelectInputs:
    """Everything the select stage needs besides the shards: how to build the selector, the labeled set whose
    statistics it matches, and what to write."""

    kind: PredictionKind
    info: DatasetInfo
    make_selector: Callable[[], Any]
    selector_block: dict[str, Any]
    labeled: Any = None
    keypoints: bool | None = None  # match keypoint counts too (None: when the shards hold keypoints)
    keep_raw: bool = False
    quality: bool | None = None


@dataclass
class _Fitted:
    stats: LabeledStats
    selector: Any
    thresholds: dict[str, Any]
    single_selector: Any = None
    single_thresholds: Any = None


def _fit(shards: ShardSet, inp: SelectInputs, num_images: int, do_quality: bool) -> _Fitted:
    info = inp.info
    stats = labeled_stats(inp.labeled, info, inp.keypoints) if inp.labeled is not None else \
        LabeledStats(num_images=0, instances={int(c["id"]): 0 for c in info.categories})
    selector = inp.make_selector()
    fitted = _Fitted(stats, selector, selector.fit(stats, ShardStream(shards, "ensemble", inp.kind, num_images)))
    if do_quality:
        fitted.single_selector = inp.make_selector()
        fitted.single_thresholds = fitted.single_selector.fit(stats, ShardStream(shards, "single", inp.kind,
                                                                                 num_images))
    return fitted


class _WritePass:
    """The last pass: select every image, write it, score its quality, keep its raw predictions."""

    def __init__(self, inp: SelectInputs, fitted: _Fitted, writer: PseudoLabelWriter, do_quality: bool,
                 timer: Timer):
        self.inp, self.fitted, self.writer, self.timer = inp, fitted, writer, timer
        self.counter = SelectionCounter()
        self.quality = quality_pair(inp.kind, inp.info) if do_quality else None
        self.raw_images: list[RawImage] = []
        self.who = f"selector {inp.selector_block['name']!r}"

    def shard(self, rec: Mapping[str, Any]) -> None:
        kind = self.inp.kind
        with self.timer("write"):
            meta = {k: v.tolist() if isinstance(v, Tensor) else v for k, v in rec["images"].items()}
            names = file_names(meta)
            gts = kind.unpack_targets(rec["targets"]) if self.quality is not None else None
            singles = kind.unpack(rec["single"], rec["images"]) if self.quality is not None else None
            preds = kind.unpack(rec["ensemble"], rec["images"])
        for j, pred in enumerate(preds):
            with self.timer("select"):
                sp = kind.scored(pred)
                sel = check_selection(sp, self.fitted.selector.select(sp), self.who)
                self.counter.update(sp, sel)
            with self.timer("write"):
                kind.write(self.writer, meta, names[j], j, pred, sel)
            if self.quality is not None:
                with self.timer("quality"):
                    iid, h, w = meta["image_id"][j], meta["height"][j], meta["width"][j]
                    self.quality[0].add(iid, h, w, pred, sel.keep, gts[j])
                    single_keep = self.fitted.single_selector.select(kind.scored(singles[j])).keep
                    self.quality[1].add(iid, h, w, singles[j], single_keep, gts[j])
        if self.inp.keep_raw:
            self.raw_images += _raw_images(rec, kind, gts)


def _raw_images(rec: Mapping[str, Any], kind: PredictionKind, gts: list | None) -> list[RawImage]:
    meta, raw = rec["images"], rec["raw"]
    if raw is None:
        return []
    per_view = kind.unpack_raw_views(raw["views"], meta)
    out = []
    for j, (iid, h, w) in enumerate(zip(meta["image_id"].tolist(), meta["height"].tolist(), meta["width"].tolist())):
        target = None if gts is None else {k: v for k, v in gts[j].items() if k in ("boxes", "labels", "label")}
        out.append(RawImage(int(iid), (h, w), target=target, **kind.raw_fields([pv[j] for pv in per_view])))
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


def _scan_and_check(shards: ShardSet, out_dir: Path, quality: bool | None) -> tuple[ShardScan, Path, bool]:
    scan = scan_shards(shards)
    skipped = scan.skipped
    skipped_path = atomic_write_text(out_dir / "skipped.jsonl", "".join(json.dumps(r) + "\n" for r in skipped))
    if scan.num_images == 0:
        raise DataError(f"none of the {len(skipped)} unlabeled images could be read (see {skipped_path}); "
                        f"first: {skipped[0]['file'] if skipped else '-'}: {skipped[0]['reason'] if skipped else '-'}")
    do_quality = scan.has_targets and scan.has_single and quality is not False
    if quality and not do_quality:
        log.warning("label.quality: the unlabeled images have no hidden ground truth; no quality report")
    return scan, skipped_path, do_quality


def select_pseudo_labels(sharded: ShardedLabels, inp: SelectInputs, out_dir: str | Path,
                         timer: Timer | None = None) -> LabelResult:
    """Select and write the outputs of complete shard files into ``out_dir`` (see the module docstring)."""
    timer = timer or Timer()
    out_dir, shards = Path(out_dir), sharded.shards
    scan, skipped_path, do_quality = _scan_and_check(shards, out_dir, inp.quality)
    if inp.keypoints is None:
        inp = dataclasses.replace(inp, keypoints=scan.has_keypoints)
    with timer("select"):
        fitted = _fit(shards, inp, scan.num_images, do_quality)
    prov = {**sharded.provenance, "thresholds": fitted.thresholds, "selector": inp.selector_block}
    writer = PseudoLabelWriter(out_dir / "pseudo_labels.json", inp.kind.pseudo_format, coco_categories(inp.info),
                               prov)
    write = _WritePass(inp, fitted, writer, do_quality, timer)
    try:
        for s in range(shards.num_shards):
            write.shard(load_shard(shards.path(s), mmap=True))
        with timer("write"):
            pseudo_path = writer.close()
    except BaseException:
        writer.abort()
        raise
    summary = _summary(fitted.stats, write.counter, fitted.thresholds, inp.info, scan.num_images, scan.skipped,
                       shards, pseudo_path, inp.keypoints)
    quality_report = None
    if write.quality is not None:
        with timer("quality"):
            quality_report = {"single": write.quality[1].report(), "ensemble": write.quality[0].report(),
                              "single_thresholds": fitted.single_thresholds,
                              "views": list(sharded.provenance.get("views") or [])}
        atomic_write_json(out_dir / "quality.json", quality_report)
    atomic_write_json(out_dir / "summary.json", summary)
    raw_path = None
    if inp.keep_raw:
        raw = RawPredictions(inp.kind.name, write.raw_images, [dict(c) for c in inp.info.categories],
                             scan.raw_names or [])
        raw_path = save_raw(raw, out_dir / "raw_predictions.pt")
    return LabelResult(out_dir=out_dir, complete=True, pseudo_path=pseudo_path, summary=summary,
                       quality=quality_report, raw_path=raw_path, skipped_path=skipped_path)
