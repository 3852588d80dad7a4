"""Shard files of the labelling stage: how the unlabeled images are split, and what each part stores.

The ``N`` unlabeled images (in the source's fixed order) are cut into ``S`` contiguous shards; shard ``s`` holds
images ``[s * N // S, (s + 1) * N // S)``. The cut depends on ``N`` and ``S`` only, never on how many processes
run, so one process and ``P`` processes (worker ``p`` takes the shards ``s`` with ``s % P == p``) run the teacher on
the very same batches and write byte-identical shard files.

A shard file ``label/shards/shard-00003-of-00010.pt`` is a dict of tensors and plain containers that loads with
``torch.load(weights_only=True)``::

    format       "ddkit-label-shard-v1"
    fingerprint  hash of everything that determines the predictions (teacher weights, transforms, aggregator, data,
                 batch size, shard count); a shard with another fingerprint is stale and is labelled again
    shard, num_shards
    images       {"index": int64 [n] (position in the source), "image_id": int64 [n], "height", "width": int64 [n],
                  "file_names": the n file names joined by NUL}            (readable images only)
    ensemble     the aggregated predictions of the n images (see :func:`pack_instances` / :func:`pack_probs`)
    single       the untransformed view's own predictions, or None (kept for the quality report)
    raw          {view name: packed predictions} when ``keep_raw``, else None
    targets      hidden ground truth packed like instances (or ``{"label": [n]}``), or None
    skipped      [{"index", "image_id", "file", "reason"}] for images that could not be read
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from ddkit.errors import ConfigError, DataError
from ddkit.io import atomic_torch_save
from ddkit.types import Instances

SHARD_FORMAT = "ddkit-label-shard-v1"
_NAME_RE = re.compile(r"^shard-(\d{5})-of-(\d{5})\.pt$")


def shard_bounds(num_items: int, num_shards: int, shard: int) -> tuple[int, int]:
    """``[start, stop)`` of ``shard`` when ``num_items`` are cut into ``num_shards`` contiguous parts."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is not in [0, {num_shards})")
    return shard * num_items // num_shards, (shard + 1) * num_items // num_shards


def shard_name(shard: int, num_shards: int) -> str:
    return f"shard-{shard:05d}-of-{num_shards:05d}.pt"


def shard_path(folder: str | Path, shard: int, num_shards: int) -> Path:
    return Path(folder) / shard_name(shard, num_shards)


def parse_shard_arg(text: str) -> tuple[int, int]:
    """``"I/N"`` (``0 <= I < N``) -> ``(I, N)``: this worker's index and the number of workers."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise ConfigError(f"--shard must be I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def worker_shards(num_shards: int, worker: int, num_workers: int) -> list[int]:
    """The shards worker ``worker`` of ``num_workers`` labels (round robin, so parts stay balanced)."""
    return [s for s in range(num_shards) if s % num_workers == worker]


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able description."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ packing
def pack_instances(items: Sequence[Instances], num_keypoints: int | None = None) -> dict[str, Tensor]:
    """Per-image Instances -> concatenated CPU tensors plus ``counts [n]`` (float32 coordinates and scores)."""
    counts = torch.tensor([len(i) for i in items], dtype=torch.int64)
    out = {
        "counts": counts,
        "boxes": torch.cat([i.boxes.detach().float().cpu() for i in items]) if items else torch.zeros(0, 4),
        "scores": torch.cat([i.scores.detach().float().cpu() for i in items]) if items else torch.zeros(0),
        "labels": torch.cat([i.labels.detach().long().cpu() for i in items]) if items else
        torch.zeros(0, dtype=torch.int64),
    }
    has_kps = [i.keypoints is not None for i in items]
    if num_keypoints or any(has_kps):
        k = num_keypoints or next(i.keypoints.shape[1] for i in items if i.keypoints is not None)
        out["keypoints"] = torch.cat([i.keypoints.detach().float().cpu() if i.keypoints is not None
                                      else torch.zeros(len(i), k, 3) for i in items]) if items \
            else torch.zeros(0, k, 3)
    return out


def unpack_instances(packed: dict[str, Tensor], image_sizes: Sequence[tuple[int, int]] | None = None
                     ) -> list[Instances]:
    counts = packed["counts"].tolist()
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    kps = packed.get("keypoints")
    out = []
    for j, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
        size = None if image_sizes is None else tuple(int(v) for v in image_sizes[j])
        out.append(Instances(packed["boxes"][a:b], packed["scores"][a:b], packed["labels"][a:b],
                             None if kps is None else kps[a:b], size))
    return out


def pack_probs(probs: Tensor, category_ids: Sequence[int]) -> dict[str, Tensor]:
    """``probs [n, C]`` (columns ordered like ``category_ids``) -> argmax category ids, their probability, probs."""
    probs = probs.detach().float().cpu()
    if probs.numel() == 0:
        return {"labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0),
                "probs": probs.reshape(0, len(category_ids))}
    scores, idx = probs.max(1)
    ids = torch.as_tensor(list(category_ids), dtype=torch.int64)
    return {"labels": ids[idx], "scores": scores, "probs": probs}


def pack_targets(targets: Sequence[dict[str, Any]]) -> dict[str, Tensor] | None:
    """Hidden ground truth of the labelled images, for the quality report (``None`` if there is none)."""
    if not targets or any(t is None for t in targets):
        return None
    if all("label" in t for t in targets):
        return {"label": torch.tensor([int(torch.as_tensor(t["label"])) for t in targets], dtype=torch.int64)}
    if not all("boxes" in t and "labels" in t for t in targets):
        return None
    insts = []
    for t in targets:
        boxes = torch.as_tensor(t["boxes"], dtype=torch.float32).reshape(-1, 4)
        kps = t.get("keypoints")
        insts.append(Instances(boxes, torch.ones(len(boxes)), torch.as_tensor(t["labels"]).long().reshape(-1),
                               None if kps is None else torch.as_tensor(kps, dtype=torch.float32)))
    packed = pack_instances(insts)
    packed["iscrowd"] = torch.cat([torch.as_tensor(t.get("iscrowd", torch.zeros(len(t["labels"])))).long().reshape(-1)
                                   for t in targets])
    packed["area"] = torch.cat([torch.as_tensor(t["area"], dtype=torch.float32).reshape(-1) if "area" in t else
                                torch.full((len(t["labels"]),), -1.0) for t in targets])
    return packed


# ------------------------------------------------------------------------------------------------ files
def save_shard(path: str | Path, record: dict[str, Any]) -> Path:
    record = dict(record)
    record["format"] = SHARD_FORMAT
    return atomic_torch_save(record, path)


def load_shard(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Load a shard file (``mmap=True``: tensors are mapped, not read, e.g. to look at the fingerprint)."""
    try:
        record = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:
        raise DataError(f"{path}: cannot load shard file: {str(err).splitlines()[0] if str(err) else err!r}") \
            from None
    if not isinstance(record, dict) or record.get("format") != SHARD_FORMAT:
        raise DataError(f"{path}: not a ddkit label shard (format {SHARD_FORMAT})")
    return record


def shard_is_done(path: str | Path, fp: str) -> bool:
    """True when ``path`` is a complete shard written with fingerprint ``fp`` (a torn or stale file is not)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        return load_shard(path, mmap=True).get("fingerprint") == fp
    except DataError:
        return False


@dataclass
class ShardSet:
    """The shard files of one labelling run."""

    folder: Path
    num_shards: int
    fingerprint: str

    def path(self, shard: int) -> Path:
        return shard_path(self.folder, shard, self.num_shards)

    def done(self, shard: int) -> bool:
        return shard_is_done(self.path(shard), self.fingerprint)

    def missing(self) -> list[int]:
        return [s for s in range(self.num_shards) if not self.done(s)]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Load every shard in order (one at a time: memory holds one shard)."""
        for s in range(self.num_shards):
            record = load_shard(self.path(s))
            if record.get("fingerprint") != self.fingerprint:
                raise DataError(f"{self.path(s)}: written by another configuration (fingerprint "
                                f"{record.get('fingerprint')} != {self.fingerprint}); label it again")
            yield record

    def stale_files(self) -> list[Path]:
        """Shard files in the folder that belong to another shard count."""
        out = []
        for p in sorted(self.folder.glob("shard-*-of-*.pt")):
            m = _NAME_RE.match(p.name)
            if m and int(m.group(2)) != self.num_shards:
                out.append(p)
        return out
