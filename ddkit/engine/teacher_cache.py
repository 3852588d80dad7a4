"""What the teacher gives a training step: its logits (served from a per-sample cache when allowed) or a forward.

The cache holds the teacher logits of every training sample, computed once in a pass over the training data and
stored as ``teacher_logits-<sha16>-<data16>.pt`` (the teacher checkpoint's sha256 and the training data's
fingerprint): a changed teacher or changed data gets a new file. It is only valid without random augmentation and
serves soft targets, not hint features.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ddkit.engine.data import get_target
from ddkit.engine.task import Task
from ddkit.errors import ConfigError
from ddkit.io import atomic_torch_save

log = logging.getLogger("ddkit.train")


class _Indexed(torch.utils.data.Dataset):
    """Adds ``target["_index"]`` (the sample's index in the training set) for the teacher cache."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, target = self.dataset[i]
        return image, {**target, "_index": i}

    def get_target(self, i: int) -> dict[str, Any]:
        return {**get_target(self.dataset, i), "_index": i}


def _sample_file(dataset: Any, i: int) -> Path | None:
    """The image file behind sample ``i``, through the engine's subset / concat / view wrappers (None: in memory)."""
    for _ in range(16):  # wrappers nest a few levels at most
        if hasattr(dataset, "datasets") and hasattr(dataset, "_locate"):
            dataset, i = dataset._locate(i)
        elif hasattr(dataset, "indices") and hasattr(dataset, "dataset"):
            dataset, i = dataset.dataset, int(dataset.indices[i])
        elif hasattr(dataset, "ground_truth"):  # a view with hidden labels
            dataset = dataset.ground_truth
        elif hasattr(dataset, "images") and hasattr(dataset, "source"):  # pseudo-labels: the unlabeled image
            record = dataset.images[i]
            if dataset.source is None:
                root = getattr(dataset, "image_root", None)
                return Path(record["file_name"]) if root is None else Path(root) / record["file_name"]
            dataset, i = dataset.source, int(record["ddkit_index"])
        elif hasattr(dataset, "files"):
            return Path(dataset.files[i])
        elif hasattr(dataset, "dataset"):
            dataset = dataset.dataset
        else:
            return None
    return None


def _update_target(h: Any, target: dict[str, Any]) -> None:
    for key in sorted(target):
        value = target[key]
        if isinstance(value, torch.Tensor):
            h.update(f"{key}:{value.dtype}:{tuple(value.shape)}:".encode() + value.detach().cpu().numpy().tobytes())
        else:
            h.update(f"{key}={value!r};".encode())


def dataset_fingerprint(dataset: Any) -> str:
    """A digest of what training reads from ``dataset``: every target (ids, labels, boxes, keypoints) and, for
    samples read from files, each file's path, size and mtime (a changed image or annotation changes it)."""
    h = hashlib.sha256(str(len(dataset)).encode())
    for i in range(len(dataset)):
        _update_target(h, get_target(dataset, i))
        path = _sample_file(dataset, i)
        if path is not None:
            h.update(_file_stamp(path))
    return h.hexdigest()[:16]


def _file_stamp(path: str | Path) -> bytes:
    """A file's path, size and mtime: a stat, not a read, so that it stays cheap for a folder of many images."""
    try:
        st = os.stat(path)
        return f"|{path}:{st.st_size}:{st.st_mtime_ns}|".encode()
    except OSError:
        return f"|{path}:missing|".encode()


def files_fingerprint(paths: Sequence[str | Path]) -> str:
    """A digest of a list of files as :func:`dataset_fingerprint` sees each one (path, size, mtime): an added,
    removed or replaced file changes it."""
    h = hashlib.sha256(str(len(paths)).encode())
    for path in paths:
        h.update(_file_stamp(path))
    return h.hexdigest()[:16]


class TeacherCache:
    """Teacher logits of every training sample, computed once and stored as ``teacher_logits-<sha16>-<data>.pt``."""

    def __init__(self, logits: torch.Tensor, sha: str):
        self.logits, self.sha = logits, sha

    @classmethod
    def build(cls, task: Task, teacher: nn.Module, dataset: Any, sha: str, cache_dir: Path, batch_size: int,
              device: torch.device, progress: bool, rank: int = 0,
              fingerprint: str | None = None) -> "TeacherCache":
        """Load the file for (``sha``, the data's fingerprint) or compute it (``fingerprint``: precomputed)."""
        fingerprint = fingerprint or dataset_fingerprint(dataset)
        path = Path(cache_dir) / f"teacher_logits-{sha[:16]}-{fingerprint}.pt"
        if path.is_file():
            rec = torch.load(path, map_location="cpu", weights_only=True)
            if rec.get("sha256") == sha and rec.get("fingerprint") == fingerprint:
                log.info("teacher cache: loaded %s", path)
                return cls(rec["logits"], sha)
        logits = _teacher_logits(task, teacher, dataset, batch_size, device, progress)
        if rank == 0:
            atomic_torch_save({"sha256": sha, "fingerprint": fingerprint, "logits": logits}, path)
            log.info("teacher cache: wrote %s (%d samples)", path, len(logits))
        return cls(logits, sha)

    def get(self, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        if bool((index < 0).any()):
            raise RuntimeError("teacher cache: a batch without sample indices")
        return self.logits[index.cpu()].to(device, non_blocking=True)


def _teacher_logits(task: Task, teacher: nn.Module, dataset: Any, batch_size: int, device: torch.device,
                    progress: bool) -> torch.Tensor:
    """``[N, C]`` float32 CPU logits of every sample of ``dataset``, in order."""
    teacher.eval()
    chunks = []
    starts: Any = range(0, len(dataset), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="teacher cache", unit="batch", leave=False)
    with torch.no_grad():
        for s in starts:
            samples = [dataset[i] for i in range(s, min(len(dataset), s + batch_size))]
            batch = task.to_device(task.collate(samples), device)
            out = task.feature_forward(teacher, batch)
            if out is None:
                raise ConfigError(f"teacher_cache: the task {task.name!r} has no teacher logits to cache")
            chunks.append(out.float().cpu())
    return torch.cat(chunks)


class TeacherOutputs:
    """Per step: the teacher's logits or features for the active loss terms (the cache when it has them)."""

    def __init__(self, teacher: nn.Module | None, terms: Sequence[Any], cache: TeacherCache | None = None):
        self.teacher, self.terms, self.cache = teacher, terms, cache

    def __call__(self, task: Task, batch: dict[str, Any], active: Sequence[int],
                 device: torch.device) -> torch.Tensor | None:
        if self.teacher is None:
            return None
        kinds = {getattr(self.terms[i], "teacher_outputs", "none") for i in active}  # optional, as in _needs_teacher
        need_logits = "logits" in kinds
        logits = None
        if "features" in kinds or (need_logits and self.cache is None):
            with torch.no_grad():
                logits = task.feature_forward(self.teacher, batch)
        if need_logits and self.cache is not None:
            logits = self.cache.get(batch["index"], device)
        return logits
