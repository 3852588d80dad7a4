"""Atomic file writes: a file is either the old one or the complete new one, never a torn half."""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, IO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# The temporary file of an atomic write: ``.<name>.<random>.tmp`` beside the target, the random part being
# mkstemp's 8 characters of [a-z0-9_] (CPython's tempfile._RandomNameSequence). Exactly this, so that a clean-up
# never takes a user's file with ".tmp" in its name.
TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def is_atomic_temp(name: str) -> bool:
    """Whether a file name is that of an atomic writer's temporary file (see :data:`TEMP_NAME`)."""
    return TEMP_NAME.fullmatch(name) is not None


def remove_stale_temp(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Remove the temporary files that writers killed mid-write left under ``folder`` (its subfolders too, unless
    ``recursive`` is False; symlinked folders are not entered); returns them. Only safe while no writer can be
    running there (``ddkit.engine.run_lock`` holds the folder)."""
    removed = []
    for root, dirs, files in os.walk(folder):
        for name in files:
            if is_atomic_temp(name):
                (Path(root) / name).unlink(missing_ok=True)
                removed.append(Path(root) / name)
        if not recursive:
            break
    return removed


def _atomic(path: str | os.PathLike, mode: str, write: Callable[[IO], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # TEMP_NAME
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the permissions open() would
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return _atomic(path, "w", lambda fh: fh.write(text))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return _atomic(path, "wb", lambda fh: fh.write(data))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    import torch

    return _atomic(path, "wb", lambda fh: torch.save(obj, fh))


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file: the same path, a symlink or a hard link to it (an output over an input)."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    return a.is_file() and b.is_file() and os.path.samefile(a, b)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
