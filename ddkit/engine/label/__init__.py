"""``ddkit label``: streaming multi-transform pseudo-labelling, count-matched selection, COCO output, shards, resume.

Two stages (all artifacts under the stage folder, ``<run.out_dir>/label`` for the CLI)::

    label:  unlabeled images --(batches)--> every transform's forward_image --> teacher (views of one shape in one
            call) --> inverse_instances / inverse_probs --> aggregator (batched) [--> keypoints: RoIs of the
            aggregated boxes mapped into each view, keypoint head, inverse_heatmaps, heatmap aggregator]
            --> shards/shard-*.pt
    select: shards --(streaming passes)--> selector.fit --> selector.select per image --> pseudo_labels.json
            + summary.json + skipped.jsonl (+ quality.json when the images have hidden ground truth,
            + raw_predictions.pt with ``keep_raw``)

Memory is bounded by one batch of views and one shard, whatever the number of images: shards hold at most
``shard_size`` images unless ``shards`` is set. A shard is written atomically with a fingerprint of everything
that determines its predictions; a restarted run skips the shards already written, and since the shard cut and the
batches inside a shard do not depend on the number of workers, ``--shard I/N``, ``torchrun`` and one process give
the same files. The selector is not part of the fingerprint: another selector re-uses every shard.

Modules, by job: :mod:`.config` (the ``label`` section, strategies), :mod:`.sources` (image sources),
:mod:`.labeller` (views -> teacher -> inverse -> aggregate), :mod:`.sharded` (the label stage),
:mod:`.selecting` (the select stage), :mod:`.quality` (quality against hidden ground truth), :mod:`.runner`
(both stages, a recipe).

Python API::

    result = label_dataset(task, teacher, info, unlabeled, labeled, {"transforms": [...], ...}, out_dir)
    result.pseudo_path, result.summary, result.quality
    train_set = load_pseudo_dataset(result.pseudo_path, source=unlabeled)   # ddkit.engine.pseudo
    result = run_label(cfg)                                               # a whole recipe, as the CLI does
    preds = Labeller(task, model, info, build_strategies(parse_label_config(block), task, info)).label(images)
"""
from __future__ import annotations

from ddkit.engine.label.config import (LABEL_STAGE_KEYS, LabelConfig, Strategies, build_selector,
                                       build_strategies, check_label_section, parse_label_config, selector_factory,
                                       strategy_block)
from ddkit.engine.label.labeller import BatchPredictions, Labeller, Timer
from ddkit.engine.label.quality import format_quality_table, keypoint_sigmas, quality_table
from ddkit.engine.label.runner import label_dataset, label_stage, run_label, select_stage
from ddkit.engine.label.selecting import (LabelResult, SelectInputs, ShardStream, file_names, labeled_stats,
                                          select_pseudo_labels)
from ddkit.engine.label.sharded import ShardedLabels, label_shard, label_shards, plan_shards
from ddkit.engine.label.sources import (IMAGE_EXTENSIONS, CocoSource, DatasetSource, FolderSource, Item, Source,
                                        adapt_image, make_source)
from ddkit.engine.shards import unpack_instances

__all__ = [
    "LABEL_STAGE_KEYS", "BatchPredictions", "CocoSource", "DatasetSource", "FolderSource", "IMAGE_EXTENSIONS", "Item", "LabelConfig",
    "LabelResult", "Labeller", "SelectInputs", "ShardStream", "ShardedLabels", "Source", "Strategies", "Timer",
    "adapt_image", "build_selector", "build_strategies", "check_label_section", "file_names", "format_quality_table",
    "keypoint_sigmas", "label_dataset", "label_shard", "label_shards", "label_stage", "labeled_stats", "make_source",
    "parse_label_config", "plan_shards", "quality_table", "run_label", "select_pseudo_labels", "select_stage",
    "selector_factory", "strategy_block", "unpack_instances",
]
