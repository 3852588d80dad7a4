"""The sharded labelling stage: cut the unlabeled images into shards, label the shards this worker owns, write
each atomically with a fingerprint (a restarted run skips the shards already written; see
:mod:`ddkit.engine.shards`)."""
from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from ddkit.engine.label.config import LabelConfig, Strategies
from ddkit.engine.label.labeller import Labeller
from ddkit.engine.label.sources import ImageRange, Source, as_list, check_not_empty
from ddkit.engine.shards import (ShardSet, fingerprint, load_shard, pack_targets, save_shard, shard_bounds,
                                 worker_shards)
from ddkit.errors import ConfigError, DataError

log = logging.getLogger("ddkit.label")


def _cat_packed(parts: list[dict[str, Tensor] | None]) -> dict[str, Tensor] | None:
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _shard_record(labeller: Labeller, meta: Mapping[str, list], batches: list[Any], targets: list[Any],
                  skipped: list[dict[str, Any]]) -> dict[str, Any]:
    """The shard record of the labelled batches (see :mod:`ddkit.engine.shards` for the layout)."""
    kind, ids, k = labeller.kind, labeller.category_ids, labeller.num_keypoints
    images = {key: torch.tensor(v, dtype=torch.int64) for key, v in meta.items() if key != "file_name"}
    images["file_names"] = "\0".join(meta["file_name"])  # one string unpickles much faster than a list
    raw_views = None
    if labeller.keep_raw:
        raw_views = {"names": list(labeller.slot_names),
                     "views": [_cat_packed([b.raw[i] for b in batches]) for i in range(len(labeller.ens_slots))]}
    single = None
    if labeller.s.single_index is not None:
        single = _cat_packed([b.single for b in batches]) or kind.empty_view(ids, k)
    return {"images": images, "ensemble": _cat_packed([b.ensemble for b in batches]) or kind.empty_ensemble(ids, k),
            "single": single, "raw": raw_views, "targets": pack_targets(targets) if targets else None,
            "skipped": skipped}


def label_shard(labeller: Labeller, source: Source, start: int, stop: int, batch_size: int,
                num_workers: int = 0, progress: Any = None) -> dict[str, Any]:
    """Label images ``[start, stop)`` of ``source``; returns the shard record (without format/fingerprint)."""
    loader = torch.utils.data.DataLoader(ImageRange(source, start, stop), batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, collate_fn=as_list)
    meta: dict[str, list] = {"index": [], "image_id": [], "height": [], "width": [], "file_name": []}
    batches, targets, skipped = [], [], []
    t_read = time.perf_counter()
    for items in loader:
        labeller.timer.seconds["read"] += time.perf_counter() - t_read
        ok = [it for it in items if it.image is not None]
        skipped += [{"index": it.index, "image_id": it.image_id, "file": it.file_name,
                     "reason": it.reason or "unreadable"} for it in items if it.image is None]
        if ok:
            out = labeller.label_batch([it.image for it in ok])
            with labeller.timer("pack"):
                for it in ok:
                    for key, v in (("index", it.index), ("image_id", it.image_id), ("file_name", it.file_name),
                                   ("height", int(it.image.shape[-2])), ("width", int(it.image.shape[-1]))):
                        meta[key].append(v)
                    targets.append(it.target)
                batches.append(out)
        if progress is not None:
            progress.update(len(items))
        t_read = time.perf_counter()
    with labeller.timer("pack"):
        return _shard_record(labeller, meta, batches, targets, skipped)


@dataclass
class ShardedLabels:
    """What the labelling stage leaves for the select stage: the shard files and the provenance to write.

    ``complete``: every shard of this worker is written (``shards_done``: the ones written by this call)."""

    shards: ShardSet
    provenance: dict[str, Any]
    complete: bool = True
    shards_done: list[int] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description (``ddkit run`` keeps it in the label stage's marker)."""
        return {"shards": str(self.shards.folder), "num_shards": self.shards.num_shards,
                "fingerprint": self.shards.fingerprint, "provenance": self.provenance}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ShardedLabels":
        return cls(ShardSet(Path(d["shards"]), int(d["num_shards"]), str(d["fingerprint"])), dict(d["provenance"]))


def plan_shards(cfg: LabelConfig, source: Source, strategies: Strategies, out_dir: Path, teacher_sha: str,
                task_name: str | None) -> tuple[ShardSet, int]:
    """The shard set of a labelling run (its fingerprint says what determines the predictions) and the number of
    images labelled."""
    n_total = len(source) if cfg.max_images is None else min(len(source), cfg.max_images)
    check_not_empty(source, cfg)
    num_shards = cfg.shards or max(1, math.ceil(n_total / cfg.shard_size))
    fp = fingerprint({"teacher": teacher_sha, "transforms": strategies.fingerprint_views(),
                      "aggregator": strategies.aggregator_block, "keypoints": strategies.keypoint_block,
                      "source": source.describe(), "n": n_total, "shards": num_shards,
                      "batch_size": cfg.batch_size, "keep_raw": cfg.keep_raw, "single": strategies.single_index,
                      "task": task_name})
    return ShardSet(out_dir / "shards", num_shards, fp), n_total


def _progress_bar(todo: list[int], n_total: int, num_shards: int) -> Any:
    from tqdm.auto import tqdm

    total = sum(shard_bounds(n_total, num_shards, s)[1] - shard_bounds(n_total, num_shards, s)[0] for s in todo)
    return tqdm(total=total, desc="labelling", unit="img")


# what the select stage writes beside the shards: it describes the shards of the recipe that wrote it
SELECT_OUTPUTS = ("pseudo_labels.json", "summary.json", "quality.json", "skipped.jsonl", "raw_predictions.pt", "yolo")


def _remove_other_recipes(shards: ShardSet) -> set[int]:
    """Remove the shards of another labelling recipe (another shard count, or another teacher / views / data) and
    the outputs selected from them, before any new shard is written: an interrupted re-label leaves no
    pseudo-labels of the old recipe beside shards of the new one. Returns the shards of this recipe already done."""
    done = {s for s in range(shards.num_shards) if shards.done(s)}
    other = shards.stale_files() + [shards.path(s) for s in range(shards.num_shards)
                                    if s not in done and shards.path(s).is_file()]
    if not other:
        return done
    torn = [p for p in other if not _readable(p)]  # cut short (an interrupted copy), not another recipe's
    for path in other:
        path.unlink(missing_ok=True)
    out_dir = shards.folder.parent
    removed = [name for name in SELECT_OUTPUTS if (out_dir / name).exists()]
    for name in removed:
        shutil.rmtree(out_dir / name) if (out_dir / name).is_dir() else (out_dir / name).unlink()
    also = f", and their {', '.join(removed)}" if removed else ""
    if torn:
        log.warning("%s: %d unreadable (truncated?) shard(s) removed, to be labelled again: %s%s", out_dir,
                    len(torn), ", ".join(p.name for p in torn[:3]), also)
    if len(other) > len(torn):
        log.warning("%s: %d shard(s) of another labelling recipe (teacher, views, unlabeled images added, "
                    "replaced or deleted, data, shard count, batch size or keep_raw changed) "
                    "removed%s", out_dir, len(other) - len(torn), also)
    return done


def _readable(path: Path) -> bool:
    try:
        load_shard(path, mmap=True)
    except DataError:
        return False
    return True


def label_shards(labeller: Labeller, source: Source, cfg: LabelConfig, shards: ShardSet, n_total: int,
                 rank: int = 0, world: int = 1, max_shards: int | None = None, progress: bool = False
                 ) -> tuple[list[int], bool]:
    """Label the shards of worker ``rank`` of ``world`` not written yet (at most ``max_shards``).

    Returns ``(shards written now, whether every shard of this worker is written)``."""
    if max_shards is not None and max_shards < 1:
        raise ConfigError(f"max_shards: {max_shards} is below 1; give how many shards to label (1 or more) or None")
    mine = worker_shards(shards.num_shards, rank, world)
    done = _remove_other_recipes(shards) if rank == 0 else {s for s in mine if shards.done(s)}  # each read once
    todo = [s for s in mine if s not in done]
    if todo and len(todo) < len(mine):
        log.info("resuming: %d of %d shards already labelled in %s; labelling the other %d",
                 len(mine) - len(todo), len(mine), shards.folder, len(todo))
    if max_shards is not None:
        todo, rest = todo[:max_shards], todo[max_shards:]
    else:
        rest = []
    bar = _progress_bar(todo, n_total, shards.num_shards) if progress else None
    done_now: list[int] = []
    t0 = time.perf_counter()
    try:
        for s in todo:
            start, stop = shard_bounds(n_total, shards.num_shards, s)
            record = label_shard(labeller, source, start, stop, cfg.batch_size, cfg.num_workers, bar)
            record.update(fingerprint=shards.fingerprint, shard=s, num_shards=shards.num_shards)
            with labeller.timer("write"):
                save_shard(shards.path(s), record)
            done_now.append(s)
    finally:
        if bar is not None:
            bar.close()
    labeller.timer.seconds["label_total"] += time.perf_counter() - t0
    return done_now, not rest
