"""One command at a time per run folder: ``<folder>/.ddkit.lock``, an exclusive ``fcntl.flock``.

Two commands on one folder would resume each other's half-written checkpoint, duplicate ``metrics.jsonl`` rows and
interleave ``train.log``. A command therefore holds the lock of the folder it writes (``ddkit run``: ``run.out_dir``;
``ddkit train``: ``<run.out_dir>/<stage>``; ``ddkit label``: its label folder) and a second one is refused in one
line naming the holder (pid, host, start time, command, as written into the file) and what to do.

Why this shape:

* The command owns the lock's lifetime (``with run_lock() as lock``) but the engine says when and where it is taken
  (``lock.acquire(folder)``), at the point it first writes: creating the lock file is writing, and nothing may be
  written before the recipe and the data are known good; only the engine resolves the folder and knows that point.
  ``lock.check(folder)`` refuses earlier, writing nothing, where a command reads the folder's state first (``ddkit
  train`` reads the checkpoint: without it, it would call the other command's checkpoint an interrupted run).
  Between ``check`` and ``acquire`` another command could run and end: ``acquire`` then finds the file rewritten and
  refuses too, as what the command read may be stale.
* ``flock`` is released by the OS when its process dies (``kill -9``, OOM, a lost node), so there is no stale lock
  to detect or remove; the file stays (removing it would race with a command opening it). Where ``fcntl`` is missing
  (Windows) the lock does nothing, and nothing is written.
* A folder's lock also covers the folders above and below it: ``ddkit train`` on ``<out>/teacher`` is refused while
  ``ddkit run`` holds ``<out>``, and ``ddkit run`` while ``ddkit train`` holds ``<out>/teacher``.
* Under ``torchrun`` rank 0 alone takes it, for the whole process group (one command). ``ddkit label --shard I/N``
  workers take it shared: they are meant to run side by side (each writes its own shards), but not beside a
  command that holds the folder alone.
* Once held alone, the folder's stale temporary files of atomic writers killed mid-write (:mod:`ddkit.io`) are
  removed: no writer can own them any more.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Iterator, NoReturn

from ddkit.errors import ConfigError
from ddkit.io import remove_stale_temp

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".ddkit.lock"
_UNSEEN = object()

log = logging.getLogger("ddkit")


def _holder(path: Path) -> str:
    """Who holds (or last held) a lock file, from what it wrote there."""
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "a process that has not said who it is"
    return (f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}: "
            f"{info.get('command')}")


def _read(path: Path) -> str | None:
    """The lock file's text; None when it is missing or empty (as this command's own, just created)."""
    try:
        return path.read_text() or None
    except FileNotFoundError:
        return None


def _held(path: Path, probe: int) -> bool:
    """Whether another open file holds ``path``'s lock in a mode that ``probe`` (LOCK_SH / LOCK_EX) conflicts
    with; opens the file read-only and writes nothing."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, probe | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases the probe's lock


def _nested_holder(folder: Path) -> tuple[Path, str] | None:
    """A held lock of a folder above ``folder`` (held alone) or right below it (held at all): its file and where
    it stands relative to ``folder``."""
    for parent in folder.resolve().parents:
        if (parent / LOCK_NAME).is_file() and _held(parent / LOCK_NAME, fcntl.LOCK_SH):
            return parent / LOCK_NAME, f" writing the folder {parent} that holds it"
    children = [c for c in folder.iterdir() if c.is_dir()] if folder.is_dir() else []
    for child in children:
        if (child / LOCK_NAME).is_file() and _held(child / LOCK_NAME, fcntl.LOCK_EX):
            return child / LOCK_NAME, f" writing its folder {child}"
    return None


class RunLock:
    """The lock of the folder a command writes; see the module docstring. ``enabled=False``: does nothing."""

    def __init__(self, shared: bool = False, enabled: bool = True, command: str | None = None):
        self.shared, self.enabled = shared, enabled and fcntl is not None
        self.command = command or shlex.join(["ddkit", *sys.argv[1:]])
        self.folder: Path | None = None
        self._fd: int | None = None
        self._seen: object = _UNSEEN

    def _refuse(self, folder: Path, lock_file: Path, where: str) -> NoReturn:
        raise ConfigError(f"{folder} is in use by another ddkit command{where} ({_holder(lock_file)}); "
                          f"wait for it to finish, or use another run.out_dir")

    def check(self, folder: str | os.PathLike) -> None:
        """Refuse now if another command holds ``folder`` (or a folder above or below it); writes nothing."""
        if not self.enabled or self._fd is not None:
            return
        folder = Path(folder)
        lock_file = folder / LOCK_NAME
        if _held(lock_file, fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX):
            self._refuse(folder, lock_file, "")
        nested = _nested_holder(folder)
        if nested is not None:
            self._refuse(folder, *nested)
        self._seen = _read(lock_file)

    def acquire(self, folder: str | os.PathLike) -> None:
        """Create ``folder``, take its lock (refused in one line if held), say who holds it, and (held alone)
        remove the stale temporary files under it. Once per command: a second call does nothing."""
        if not self.enabled or self._fd is not None:
            return
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        lock_file = folder / LOCK_NAME
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            self._refuse(folder, lock_file, "")
        self._fd, self.folder = fd, folder
        try:
            self._check_after_locking(folder, lock_file)
        except ConfigError:
            self.release()
            raise
        self._write_holder(fd, self.command)
        if not self.shared and remove_stale_temp(folder):
            log.info("removed the temporary files of writers killed mid-write under %s", folder)

    def _check_after_locking(self, folder: Path, lock_file: Path) -> None:
        nested = _nested_holder(folder)
        if nested is not None:
            self._refuse(folder, *nested)
        if self._seen is not _UNSEEN and _read(lock_file) != self._seen:
            raise ConfigError(f"{folder} was written by another ddkit command while this one was starting "
                              f"({_holder(lock_file)}); re-run this command")

    @staticmethod
    def _write_holder(fd: int, command: str) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": command}
        data = (json.dumps(info) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file releases its lock
            self._fd = None


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike | None = None, shared: bool = False,
             command: str | None = None) -> Iterator[RunLock]:
    """A command's lock, released on exit. With ``folder`` it is taken at once; else the engine takes it where it
    first writes (``lock.acquire(folder)``). Under ``torchrun`` only rank 0 (``RANK``) locks. ``command``: how the
    holder is named to a refused command (default: this process's arguments)."""
    lock = RunLock(shared=shared, enabled=int(os.environ.get("RANK", "0")) == 0, command=command)
    try:
        if folder is not None:
            lock.acquire(folder)
        yield lock
    finally:
        lock.release()
