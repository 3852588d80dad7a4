"""``ddkit bench``: benchmark aggregation x selection choices on a split whose ground truth is known.

The raw multi-transform predictions are computed once (by labelling with raw predictions kept, or given as a file,
or generated synthetically), then a grid is evaluated: every registered aggregator of the matching input type (with
the parameter variants the recipe lists; unlisted ones run with their defaults or their spec's examples) x every
registered selector (likewise). Third-party aggregators and selectors join the grid as soon as they are installed.

Per cell, for boxes (``instances``):

* ``AP``, ``AP50``, ``AR`` (AR@100): COCO metrics (pycocotools) of the *aggregated* predictions (before selection);
* ``precision``, ``recall``: of the *selected* pseudo-labels against the ground truth; a pseudo-label is a true
  positive when it matches a not yet matched ground-truth box of the same class with IoU >= 0.5, greedily in
  descending score order (the matched box is the one of highest IoU); crowd boxes are left out of the ground truth;
* ``inst_per_image``: selected pseudo-labels per image (``gt_per_image`` is the ground truth's);
* ``agg_ms_per_image``: wall-clock aggregation time per image (the aggregator's ``batch`` over all images when it
  has one), in milliseconds.

For class probabilities (``probs``): ``accuracy`` of the hard labels of every image, ``selected_accuracy`` of the
kept ones, ``coverage`` (fraction of images kept) and ``agg_ms_per_image``.

The raw predictions format is documented in :mod:`ddkit.engine.raw_predictions`.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from ddkit.engine.aggregation import aggregate_images
from ddkit.engine.bench_results import (LOWER_IS_BETTER, BenchResult, csv_text, markdown_table,  # noqa: F401
                                         plot_results, sort_rows, write_outputs)
from ddkit.engine.bench_synthetic import (SYNTHETIC_KINDS, make_synthetic_classification,  # noqa: F401
                                           make_synthetic_detection, synthetic_raw)
from ddkit.engine.coco_results import coco_ground_truth, instances_to_results
from ddkit.engine.matching import greedy_match
from ddkit.engine.prediction_kinds import INSTANCES, PROBS
from ddkit.engine.raw_predictions import (RAW_FILE, RAW_FORMAT, RAW_VERSION, RawImage, RawPredictions,  # noqa: F401
                                          load_raw, raw_file, raw_from_dict, save_raw)
from ddkit.engine.spec_examples import all_defaults, example_blocks
from ddkit.errors import ConfigError, DataError
from ddkit.registry import _to_plain, parse_section

log = logging.getLogger("ddkit.bench")

INSTANCE_METRICS = INSTANCES.bench_metrics
PROBS_METRICS = PROBS.bench_metrics


# ------------------------------------------------------------------------------------------------ ground truth
@dataclass
class GroundTruth:
    """The benched split's ground truth: per image boxes/labels (crowd boxes removed) and the COCO dict; or, for
    classification, one label per image."""

    boxes: dict[int, Tensor] = field(default_factory=dict)
    labels: dict[int, Tensor] = field(default_factory=dict)
    coco: dict[str, Any] | None = None
    class_labels: dict[int, int] = field(default_factory=dict)

    @classmethod
    def from_coco(cls, coco: Mapping[str, Any]) -> "GroundTruth":
        gt = cls(coco=dict(coco))
        for img in coco.get("images", []):
            gt.boxes[int(img["id"])] = []
            gt.labels[int(img["id"])] = []
        for ann in coco.get("annotations", []):
            if ann.get("iscrowd", 0):
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            gt.boxes.setdefault(int(ann["image_id"]), []).append([x, y, x + w, y + h])
            gt.labels.setdefault(int(ann["image_id"]), []).append(int(ann["category_id"]))
        gt.boxes = {k: torch.tensor(v, dtype=torch.float32).reshape(-1, 4) for k, v in gt.boxes.items()}
        gt.labels = {k: torch.tensor(v, dtype=torch.int64).reshape(-1) for k, v in gt.labels.items()}
        return gt

    @classmethod
    def from_raw_targets(cls, raw: RawPredictions) -> "GroundTruth":
        missing = [img.image_id for img in raw.images if img.target is None]
        if missing:
            fix = ("label images whose classes are known: the unlabeled share of a labeled dataset's data.split "
                   "(as configs/bench_mnist_selection.yaml), not a folder of images") if raw.kind is PROBS else \
                "give bench.gt: a COCO json of these images"
            raise DataError(f"raw predictions carry no ground truth ('target') for image {missing[0]} (and "
                            f"{len(missing) - 1} more); {fix}")
        if raw.kind is PROBS:
            return cls(class_labels={img.image_id: int(torch.as_tensor(img.target["label"]))
                                     for img in raw.images})
        keys = ("boxes", "labels", "iscrowd")  # the box area, not a stored one, as the format has none
        coco = coco_ground_truth(((img.image_id, *img.image_size, {k: v for k, v in img.target.items() if k in keys})
                                  for img in raw.images), raw.categories)
        return cls.from_coco(coco)

    def num_instances(self) -> int:
        return int(sum(len(v) for v in self.labels.values()))


def labeled_stats_from_gt(gt: GroundTruth, image_ids: Sequence[int], category_ids: Sequence[int]):
    """:class:`~ddkit.engine.select.LabeledStats` of the benched split itself (the counts a selector matches)."""
    from ddkit.engine.select import LabeledStats

    counts = {int(c): 0 for c in category_ids}
    if gt.class_labels:
        for iid in image_ids:
            c = gt.class_labels[int(iid)]
            counts[c] = counts.get(c, 0) + 1
    else:
        for iid in image_ids:
            for c in gt.labels.get(int(iid), torch.zeros(0, dtype=torch.int64)).tolist():
                counts[int(c)] = counts.get(int(c), 0) + 1
    return LabeledStats(num_images=len(image_ids), instances=counts)


# ------------------------------------------------------------------------------------------------ the grid
@dataclass
class Variant:
    """One strategy configuration of the grid: ``label`` (shown in tables), ``name`` and the config ``block``."""

    label: str
    name: str
    block: dict[str, Any]


def _variant_label(name: str, params: Mapping[str, Any]) -> str:
    if not params:
        return name
    return name + "(" + ",".join(f"{k}={_fmt_value(v)}" for k, v in params.items()) + ")"


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt_value(x) for x in v) + "]"
    return str(v)


def grid_variants(registry: Any, kind: str, listed: Mapping[str, Any] | None, *, input_type: str | None = None,
                  exclude: Iterable[str] = (), include_unlisted: bool = True,
                  where: str = "bench") -> tuple[list[Variant], list[str]]:
    """The grid axis of one kind: every registered strategy (of ``input_type`` for aggregators) with the variants
    ``listed`` gives it (``{name: [params, ...]}``; ``None`` or ``[]``: defaults), the unlisted ones with their
    defaults (or, when some parameter has no default, their spec's examples). Returns ``(variants, notes)``; the
    notes say what was skipped and why."""
    listed = dict(_to_plain(listed) or {})
    exclude = set(_to_plain(list(exclude)) or [])
    notes: list[str] = []
    entries = {e.spec.name: e for e in registry.entries(kind)}
    for name in listed:
        if name not in entries:
            try:
                registry.get(kind, name)  # raises with the available names and a suggestion
            except ConfigError as err:
                raise ConfigError(f"{where}.{kind}.{name}: {err}") from None
    variants: list[Variant] = []
    for name, entry in entries.items():
        if name in exclude:
            continue
        if input_type is not None and getattr(entry.spec, "input", input_type) != input_type:
            if name in listed:
                raise ConfigError(f"{where}: {kind[:-1]} {name!r} takes {entry.spec.input}, but these raw "
                                  f"predictions are {input_type}")
            continue
        if name in listed:
            blocks = listed[name] or [{}]
            if isinstance(blocks, Mapping):
                blocks = [blocks]
            if not isinstance(blocks, list) or not all(isinstance(b, Mapping) for b in blocks):
                raise ConfigError(f"{where}.{kind}.{name}: expected a list of parameter blocks, e.g. "
                                  f"[{{iou_thr: 0.55}}], got {blocks!r}")
        elif include_unlisted:
            # defaults when every parameter has one, else the spec's examples
            blocks = [{}] if all_defaults(entry.spec.params) else example_blocks(entry)
            if not blocks:
                notes.append(f"{kind[:-1]} {name!r} skipped: it needs parameters; list it under bench.{kind}")
                continue
        else:
            continue
        for params in blocks:
            params = {k: v for k, v in dict(params).items() if k != "name"}
            block = {"name": name, **params}
            registry.params(kind, block, where=f"{where}.{kind}.{name}")  # validate now, with a good message
            variants.append(Variant(_variant_label(name, params), name, block))
    return variants, notes


# numeric row keys a bench of each prediction kind writes beyond its ``bench_metrics`` (sortable as well)
_COUNT_KEYS = {INSTANCES.name: ("tp", "kept", "agg_recall")}


def sort_keys(kinds: Iterable[Any] = (INSTANCES, PROBS)) -> list[str]:
    """The metrics a bench of these prediction kinds can be sorted by."""
    return list(dict.fromkeys(k for kind in kinds for k in (*kind.bench_metrics, *_COUNT_KEYS.get(kind.name, ()))))


def check_sort_by(sort_by: str | None, kinds: Iterable[Any] = (INSTANCES, PROBS), where: str = "bench") -> None:
    """Refuse a ``sort_by`` that no row of a bench of these kinds has, before anything runs."""
    keys = sort_keys(kinds)
    if sort_by is not None and sort_by not in keys:
        raise ConfigError(f"{where}.sort_by: {sort_by!r} is not a metric of this bench; choose one of "
                          f"{', '.join(keys)}")


def _time_aggregation(fn, repeats: int) -> tuple[Any, float]:
    best = math.inf
    out = None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def run_bench(raw: RawPredictions, gt: GroundTruth | None = None, *, aggregators: Mapping[str, Any] | None = None,
              selectors: Mapping[str, Any] | None = None, exclude_aggregators: Iterable[str] = (),
              exclude_selectors: Iterable[str] = (), include_unlisted: bool = True, labeled: Any = None,
              sort_by: str | None = None, iou_thr: float = 0.5, timing_repeats: int = 1, registry: Any = None,
              progress: bool = False, where: str = "bench") -> BenchResult:
    """Evaluate the aggregator x selector grid on raw predictions with known ground truth.

    Args:
        raw: the raw per-view predictions.
        gt: the ground truth (default: the raw file's per-image ``target``).
        aggregators, selectors: ``{name: [params, ...]}`` variants (see :func:`grid_variants`).
        labeled: :class:`~ddkit.engine.select.LabeledStats` that count-matching selectors match (default: the
            benched split's own ground truth, i.e. the counts a labeled set drawn from the same distribution has).
        sort_by: the metric the table is sorted by (default ``AP``, or ``accuracy`` for probs).
        iou_thr: IoU of a true-positive pseudo-label.
        timing_repeats: aggregation is timed this many times; the fastest counts.
        where: names the recipe section in errors (``"R.yaml: bench"``).
    """
    from ddkit.plugin_manager import get_registry

    registry = registry or get_registry()
    if not raw.images:
        raise DataError("raw predictions hold no image")
    gt = gt if gt is not None else GroundTruth.from_raw_targets(raw)
    ptype = raw.prediction_type
    check_sort_by(sort_by, [raw.kind], where)
    aggs, notes = grid_variants(registry, "aggregators", aggregators, input_type=ptype, exclude=exclude_aggregators,
                                include_unlisted=include_unlisted, where=where)
    sels, sel_notes = grid_variants(registry, "selectors", selectors, exclude=exclude_selectors,
                                    include_unlisted=include_unlisted, where=where)
    notes += sel_notes
    if not aggs:
        raise ConfigError(f"bench: no aggregator of input type {ptype!r} is registered (or all are excluded)")
    if not sels:
        raise ConfigError("bench: no selector is registered (or all are excluded)")
    image_ids = [img.image_id for img in raw.images]
    check_gt, bench = _BY_KIND[raw.kind.name]
    cat_ids = check_gt(raw, gt, image_ids)
    if labeled is None:
        labeled = labeled_stats_from_gt(gt, image_ids, cat_ids)
    sort_by = sort_by or raw.kind.quality_metric
    rows = bench(raw, gt, aggs, sels, labeled, registry, iou_thr, timing_repeats, progress)
    failed = [r for r in rows if r["error"]]
    if failed:
        notes.append(f"{len(failed)} of {len(rows)} cells failed (their strategy raised; see the error column): "
                     + "; ".join(dict.fromkeys(r["error"] for r in failed)))
    result = BenchResult(ptype, rows, sort_by, len(raw.images), raw.num_views, notes)
    result.sorted_rows()  # validates sort_by
    return result


def _instance_categories(raw: RawPredictions, gt: GroundTruth, image_ids: list[int]) -> list[int]:
    """The category ids of a box bench; every raw image must have ground truth."""
    missing = [i for i in image_ids if i not in gt.boxes]
    if missing:
        raise DataError(f"bench: the ground truth has no image {missing[0]} ({len(missing)} raw images lack "
                        f"ground truth)")
    return [int(c["id"]) for c in (gt.coco or {}).get("categories", [])] or \
        sorted({int(c) for v in gt.labels.values() for c in v.tolist()})


def _probs_categories(raw: RawPredictions, gt: GroundTruth, image_ids: list[int]) -> list[int]:
    """The category ids of a classification bench; every raw image must have a ground-truth label."""
    missing = [i for i in image_ids if i not in gt.class_labels]
    if missing:
        raise DataError(f"bench: no ground-truth label for image {missing[0]} ({len(missing)} in all)")
    return [int(c["id"]) for c in raw.categories] or list(range(int(raw.images[0].probs.shape[1])))


def _select(selector: Any, preds: list, labeled: Any, who: str) -> tuple[list[Tensor], Any]:
    from ddkit.engine.select import ListStream, check_selection

    fitted = selector.fit(labeled, ListStream(preds)) if hasattr(selector, "fit") else None
    keeps = [check_selection(p, selector.select(p), who).keep for p in preds]
    return keeps, fitted


def _failure(who: str, err: Exception) -> str:
    """One line for a grid cell whose strategy raised: ``aggregator 'x': ValueError: ...``."""
    text = str(err).strip().splitlines()
    return f"{who}: {type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def _failed_row(agg_v: Variant, sel_v: Variant, error: str) -> dict[str, Any]:
    """The row of a cell that could not be measured: its metrics are filled in (as missing) by :func:`_fill_rows`."""
    return {"aggregator": agg_v.label, "selector": sel_v.label, "error": error,
            "aggregator_name": agg_v.name, "aggregator_block": json.dumps(agg_v.block),
            "selector_name": sel_v.name, "selector_block": json.dumps(sel_v.block)}


def _fill_rows(rows: list[dict[str, Any]], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Every row with the same keys (a measured row's, in its order): a failed cell's metrics are NaN."""
    keys = next((list(r) for r in rows if not r.get("error")), ["aggregator", "selector", *metrics, "error"])
    keys += [k for r in rows for k in r if k not in keys]
    return [{k: r.get(k, "" if k == "error" else float("nan")) for k in keys} for r in rows]


def _run_cells(aggs: list[Variant], sels: list[Variant], metrics: Sequence[str], aggregate: Any,
               cell: Any) -> list[dict[str, Any]]:
    """The grid: ``aggregate(agg_v) -> state`` once per aggregator variant, ``cell(agg_v, state, sel_v) -> row``
    per selector variant. A strategy that raises makes its cells failed rows (with the one-line reason) and the
    others are still measured, so one broken installed plugin does not lose the grid."""
    rows = []
    for agg_v in aggs:
        try:
            state = aggregate(agg_v)
        except Exception as err:  # a plugin's code: the row says what went wrong
            error = _failure(f"aggregator {agg_v.label!r}", err)
            log.warning("bench: %s; its %d cells are marked failed", error, len(sels))
            rows += [_failed_row(agg_v, sel_v, error) for sel_v in sels]
            continue
        for sel_v in sels:
            try:
                rows.append({**cell(agg_v, state, sel_v), "error": ""})
            except Exception as err:  # likewise, for the selector
                error = _failure(f"selector {sel_v.label!r}", err)
                log.warning("bench: %s x %s failed: %s", agg_v.label, sel_v.label, error)
                rows.append(_failed_row(agg_v, sel_v, error))
    return _fill_rows(rows, metrics)


def _bench_instances(raw, gt, aggs, sels, labeled, registry, iou_thr, repeats, progress) -> list[dict[str, Any]]:
    from ddkit.engine.coco_eval import coco_evaluate
    from ddkit.engine.select import ScoredPredictions

    ids = [img.image_id for img in raw.images]
    sizes = [tuple(img.image_size) for img in raw.images]
    views = [img.views for img in raw.images]
    n = len(ids)
    gt_total = sum(len(gt.labels.get(i, ())) for i in ids)

    def aggregate(agg_v: Variant) -> tuple:
        agg = registry.build("aggregators", agg_v.block, where=f"bench aggregator {agg_v.label}")
        who = f"aggregator {agg_v.label!r}"
        fused, seconds = _time_aggregation(lambda: aggregate_images(agg, views, sizes, who), repeats)
        results = [r for iid, inst in zip(ids, fused) for r in instances_to_results(iid, inst)]
        coco = coco_evaluate(gt.coco, results, image_ids=ids)
        preds = [ScoredPredictions(inst.scores.float(), inst.labels.long()) for inst in fused]
        tps_all = [greedy_match(inst.boxes, inst.scores, inst.labels, gt.boxes[i], gt.labels[i], iou_thr)
                   for i, inst in zip(ids, fused)]
        if progress:
            log.info("bench: %s AP %.3f (%.2f ms/image)", agg_v.label, coco["AP"], 1000 * seconds / n)
        return fused, seconds, coco, preds, tps_all

    def cell(agg_v: Variant, state: tuple, sel_v: Variant) -> dict[str, Any]:
        fused, seconds, coco, preds, tps_all = state
        selector = registry.build("selectors", sel_v.block, where=f"bench selector {sel_v.label}")
        keeps, fitted = _select(selector, preds, labeled, f"selector {sel_v.label!r}")
        kept = tp = 0
        for inst, keep, iid in zip(fused, keeps, ids):
            kept += int(keep.sum())
            # matching is recomputed on the kept subset: a kept box may take a ground truth that a dropped,
            # higher-scoring box took in the full set
            tp += int(greedy_match(inst.boxes[keep], inst.scores[keep], inst.labels[keep], gt.boxes[iid],
                                   gt.labels[iid], iou_thr).sum())
        return {
            "aggregator": agg_v.label, "selector": sel_v.label,
            "AP": coco["AP"], "AP50": coco["AP50"], "AR": coco["AR@100"],
            "precision": tp / kept if kept else float("nan"),
            "recall": tp / gt_total if gt_total else float("nan"),
            "inst_per_image": kept / n, "agg_inst_per_image": sum(len(f) for f in fused) / n,
            "gt_per_image": gt_total / n, "agg_ms_per_image": 1000.0 * seconds / n,
            "tp": tp, "kept": kept,
            "agg_recall": int(sum(int(t.sum()) for t in tps_all)) / gt_total if gt_total else float("nan"),
            "aggregator_name": agg_v.name, "aggregator_block": json.dumps(agg_v.block),
            "selector_name": sel_v.name, "selector_block": json.dumps(sel_v.block),
            "thresholds": json.dumps(fitted, default=str),
        }

    return _run_cells(aggs, sels, INSTANCES.bench_metrics, aggregate, cell)


def _bench_probs(raw, gt, aggs, sels, labeled, registry, iou_thr, repeats, progress) -> list[dict[str, Any]]:
    from ddkit.engine.aggregation import check_probs_output
    from ddkit.engine.select import ScoredPredictions

    ids = [img.image_id for img in raw.images]
    shapes = {tuple(img.probs.shape) for img in raw.images}
    if len(shapes) != 1:
        raise DataError(f"bench: images have probs of different shapes {sorted(shapes)[:3]}; every image needs the "
                        f"same views and classes")
    probs = torch.stack([img.probs for img in raw.images], 1)  # [V, N, C]
    truth = torch.tensor([gt.class_labels[i] for i in ids], dtype=torch.int64)
    n, num_classes = probs.shape[1], probs.shape[2]
    column_ids = None
    if raw.categories and len(raw.categories) == probs.shape[2]:
        column_ids = torch.tensor([int(c["id"]) for c in raw.categories], dtype=torch.int64)

    def aggregate(agg_v: Variant) -> tuple:
        agg = registry.build("aggregators", agg_v.block, where=f"bench aggregator {agg_v.label}")
        out, seconds = _time_aggregation(lambda: agg(probs), repeats)
        labels, scores = check_probs_output(out, n, num_classes, f"aggregator {agg_v.label!r}")
        if column_ids is not None:  # probs columns -> dataset category ids
            labels = column_ids[labels]
        preds = [ScoredPredictions(scores[i:i + 1], labels[i:i + 1]) for i in range(n)]
        return labels == truth, preds, seconds

    def cell(agg_v: Variant, state: tuple, sel_v: Variant) -> dict[str, Any]:
        correct, preds, seconds = state
        selector = registry.build("selectors", sel_v.block, where=f"bench selector {sel_v.label}")
        keeps, fitted = _select(selector, preds, labeled, f"selector {sel_v.label!r}")
        keep = torch.cat(keeps)
        k = int(keep.sum())
        return {
            "aggregator": agg_v.label, "selector": sel_v.label,
            "accuracy": float(correct.double().mean()),
            "selected_accuracy": float(correct[keep].double().mean()) if k else float("nan"),
            "coverage": k / n, "selected": k, "agg_ms_per_image": 1000.0 * seconds / n,
            "aggregator_name": agg_v.name, "aggregator_block": json.dumps(agg_v.block),
            "selector_name": sel_v.name, "selector_block": json.dumps(sel_v.block),
            "thresholds": json.dumps(fitted, default=str),
        }

    return _run_cells(aggs, sels, PROBS.bench_metrics, aggregate, cell)


_BY_KIND = {INSTANCES.name: (_instance_categories, _bench_instances), PROBS.name: (_probs_categories, _bench_probs)}


# ------------------------------------------------------------------------------------------------ recipe
@dataclass
class BenchConfig:
    """The ``bench`` section of a recipe.

    Attributes:
        raw: path of a raw-predictions ``.pt`` (labelling with ``keep_raw: true`` writes one); or
        synthetic: ``{kind: detection | classification, num_images, num_views, num_categories, seed, ...}``
            generates ground truth + jittered per-view predictions (written to the run folder); or neither, and
            the recipe's ``label`` section is run with raw predictions kept (needs ``data`` with ground truth).
        gt: COCO json of the split's ground truth (default: the raw file's per-image targets).
        labeled: what count-matching selectors match: a COCO json of the labeled set, a labelling
            ``summary.json``, or ``split`` (the benched split's own ground truth). Default: the ``summary.json`` next
            to the raw predictions (labelling's labeled set) when there is one, else ``split``.
        aggregators, selectors: ``{name: [params, ...]}``; registered ones not listed run with their defaults.
        exclude_aggregators, exclude_selectors: names left out of the grid.
        include_unlisted: also bench registered strategies not listed (default true).
        sort_by: the metric the table is sorted by (``AP``; ``accuracy`` for classification).
        iou_thr: IoU of a true-positive pseudo-label; timing_repeats: fastest of this many timed passes.
    """

    raw: str | None = None
    synthetic: dict[str, Any] | None = None
    gt: str | None = None
    labeled: str | None = None
    aggregators: dict[str, Any] = field(default_factory=dict)
    selectors: dict[str, Any] = field(default_factory=dict)
    exclude_aggregators: list[str] = field(default_factory=list)
    exclude_selectors: list[str] = field(default_factory=list)
    include_unlisted: bool = True
    sort_by: str | None = None
    iou_thr: float = 0.5
    timing_repeats: int = 1


def parse_bench_config(section: Any, where: str = "bench") -> BenchConfig:
    """Validate the ``bench`` section (through :func:`ddkit.registry.parse_section`, as every section); ``where``
    names it in errors (``"<recipe>: bench"``)."""
    block = _to_plain(section) or {}
    if not isinstance(block, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(block).__name__}")
    cfg = parse_section(BenchConfig, {k: v for k, v in block.items() if v is not None}, where)
    if cfg.raw is not None and cfg.synthetic is not None:
        raise ConfigError(f"{where}: give raw or synthetic, not both")
    for key in ("aggregators", "selectors"):
        if not isinstance(getattr(cfg, key), Mapping):
            raise ConfigError(f"{where}.{key} must map names to lists of parameter blocks, e.g. "
                              f"{{wbf: [{{iou_thr: 0.55}}]}}")
    return cfg


def _raw_from_labelling(cfg: Any, run_dir: Path, source: str, registry: Any = None) -> Path:
    """Run the recipe's labelling stage with raw predictions kept (``ddkit.engine.label.run_label``); its files go
    to ``run_dir/label`` as ``ddkit label`` would write them (a finished labelling there is resumed, not redone).
    Returns the path of the kept ``raw_predictions.pt``."""
    from ddkit.engine.label import run_label

    teacher = cfg.get("teacher") if hasattr(cfg, "get") else None
    if not (teacher or {}).get("checkpoint") and not (run_dir / "teacher" / "model.pt").is_file():
        raise ConfigError(f"{source}: bench has no raw predictions to bench: give bench.raw (a raw-predictions file, "
                          f"e.g. label/raw_predictions.pt of ddkit label --keep-raw), or a teacher to label with "
                          f"(teacher.checkpoint, or {run_dir / 'teacher'} from ddkit train --stage teacher), "
                          f"or bench.synthetic")
    result = run_label(cfg, run_dir=run_dir, keep_raw=True, registry=registry, source=source)
    if not result.complete or result.raw_path is None:
        raise DataError(f"{source}: labelling did not finish, so no raw predictions were kept; re-run to resume")
    return Path(result.raw_path)


def load_labeled_stats(path: str | Path):
    """:class:`~ddkit.engine.select.LabeledStats` from a labelling ``summary.json`` (its ``labeled`` block) or from
    a COCO json of the labeled set (instances per category per image)."""
    from ddkit.engine.coco_eval import load_coco_dict
    from ddkit.engine.select import LabeledStats

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"bench.labeled: {path} does not exist (give a COCO json of the labeled set, a labelling "
                          f"summary.json, or 'split')")
    data = load_coco_dict(path)
    if isinstance(data.get("labeled"), Mapping):  # ddkit label's summary.json
        lab = data["labeled"]
        return LabeledStats(num_images=int(lab["num_images"]),
                            instances={int(k): int(v) for k, v in lab["instances"].items()},
                            num_keypoints=lab.get("num_keypoints"),
                            visible_keypoints=int(lab.get("visible_keypoints") or 0))
    if "annotations" not in data:
        raise ConfigError(f"bench.labeled: {path} is neither a COCO json nor a labelling summary.json")
    lab = GroundTruth.from_coco(data)
    cats = [int(c["id"]) for c in data.get("categories", [])]
    return labeled_stats_from_gt(lab, [int(i["id"]) for i in data.get("images", [])], cats)


def bench_from_config(cfg: Any, run_dir: str | Path, source: str = "recipe", registry: Any = None,
                      progress: bool = True) -> tuple[BenchResult, dict[str, Path]]:
    """Run ``ddkit bench`` for a loaded recipe; write every artifact to ``run_dir/bench``."""
    from ddkit.engine.coco_eval import load_coco_dict

    run_dir = Path(run_dir)
    out_dir = run_dir / "bench"
    where = f"{source}: bench"
    bcfg = parse_bench_config(cfg.get("bench") if hasattr(cfg, "get") else None, where)
    check_grid(bcfg, registry, where)  # before anything is generated, labelled or written
    gt_coco = None
    raw_path: Path | None = None
    title = "ddkit bench"
    if bcfg.synthetic is not None:
        gt_coco, raw = synthetic_raw(bcfg.synthetic, source)
        title += " (SYNTHETIC data: generated ground truth and jittered per-view predictions)"
    elif bcfg.raw is not None:
        raw_path = raw_file(bcfg.raw)
        raw = load_raw(raw_path)
    else:
        raw_path = _raw_from_labelling(cfg, run_dir, source, registry)
        raw = load_raw(raw_path)
    if bcfg.gt is not None:
        gt_coco = load_coco_dict(bcfg.gt)
    if raw.kind is INSTANCES and gt_coco is not None:
        gt = GroundTruth.from_coco(gt_coco)
    else:
        gt = GroundTruth.from_raw_targets(raw)
    labeled = None
    if bcfg.labeled == "split":
        labeled = None
    elif bcfg.labeled is not None:
        labeled = load_labeled_stats(bcfg.labeled)
    elif raw_path is not None and (raw_path.parent / "summary.json").is_file():
        labeled = load_labeled_stats(raw_path.parent / "summary.json")
    if progress:
        log.info("bench: count matching matches %s", "the benched split's own counts" if labeled is None else
                 f"a labeled set of {labeled.num_images} images")
    result = run_bench(raw, gt, aggregators=bcfg.aggregators, selectors=bcfg.selectors,
                       exclude_aggregators=bcfg.exclude_aggregators, exclude_selectors=bcfg.exclude_selectors,
                       include_unlisted=bcfg.include_unlisted, labeled=labeled, sort_by=bcfg.sort_by,
                       iou_thr=bcfg.iou_thr, timing_repeats=bcfg.timing_repeats, registry=registry,
                       progress=progress, where=where)
    if bcfg.synthetic is not None:  # written with the table, once the bench ran: never beside an older table
        _save_synthetic(raw, gt_coco, out_dir)
    paths = write_outputs(result, out_dir, title)
    return result, paths


def check_grid(bcfg: BenchConfig, registry: Any = None, where: str = "bench") -> None:
    """The listed aggregators and selectors exist and take their parameters, and ``sort_by`` is a metric: checked
    before the raw predictions exist (their input type is checked once they do, by :func:`run_bench`)."""
    from ddkit.plugin_manager import get_registry

    registry = registry or get_registry()
    grid_variants(registry, "aggregators", bcfg.aggregators, exclude=bcfg.exclude_aggregators,
                  include_unlisted=False, where=where)
    grid_variants(registry, "selectors", bcfg.selectors, exclude=bcfg.exclude_selectors, include_unlisted=False,
                  where=where)
    check_sort_by(bcfg.sort_by, where=where)


def _save_synthetic(raw: RawPredictions, gt_coco: dict[str, Any] | None, out_dir: Path) -> None:
    from ddkit.io import atomic_write_json

    save_raw(raw, out_dir / RAW_FILE)
    if gt_coco is not None:
        atomic_write_json(out_dir / "gt.json", gt_coco, indent=None)
