"""The models inside a folder that ``ddkit run`` wrote: which stage holds the final student, the teacher, ...

A run folder holds one folder per stage (``teacher``, ``student``, ``student_r2``, ``kd_<variant>``, ...), each with
a ``stage.json`` marker once complete whose ``result["model"]`` is that stage's exported model.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ddkit.errors import ConfigError
from ddkit.engine.checkpoint import resolve_checkpoint

_ROUND = re.compile(r"student(?:_r(\d+))?")


def read_marker(marker: str | Path) -> dict[str, Any] | None:
    """A stage's ``stage.json`` record, its paths moved into the run folder it now lies in: a copied or moved run
    folder names its own files (``run_dir``, the folder it was written in, is recorded since session 20; older
    markers are placed by their stage's own output file). ``None`` when it cannot be read (truncated)."""
    marker = Path(marker)
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("result") or {}, dict):
        return None
    here = str(marker.parent.parent.resolve())
    written_in = record.get("run_dir") or _written_in(record.get("result") or {}, marker.parent.name)
    if written_in and written_in != here:
        record["result"] = _moved(record.get("result") or {}, written_in, here)
    return record


def _written_in(result: dict[str, Any], stage: str) -> str | None:
    """The run folder an older marker was written in: the parent of its stage's own model or pseudo-label file."""
    for key in ("model", "pseudo_labels"):
        path = Path(str(result.get(key) or ""))
        if path.parent.name == stage:
            return str(path.parent.parent)
    return None


def _moved(node: Any, old: str, new: str) -> Any:
    """``node`` with every path string under ``old`` moved under ``new``."""
    if isinstance(node, dict):
        return {k: _moved(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_moved(v, old, new) for v in node]
    if isinstance(node, str) and node.startswith(old) and Path(node).is_relative_to(old):
        return str(Path(new) / Path(node).relative_to(old))
    return node


def completed_stages(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """``{stage: result}`` for every stage folder of ``run_dir`` with a readable ``stage.json`` marker."""
    out = {}
    for marker in sorted(Path(run_dir).glob("*/stage.json")):
        record = read_marker(marker)
        if record is not None:  # a marker is written atomically; an unreadable one is not ours
            out[marker.parent.name] = record.get("result") or {}
    return out


def unreadable_markers(run_dir: str | Path) -> list[str]:
    """The stages of ``run_dir`` whose ``stage.json`` cannot be read (a truncated copy)."""
    return [m.parent.name for m in sorted(Path(run_dir).glob("*/stage.json")) if read_marker(m) is None]


def is_run_folder(path: str | Path) -> bool:
    """A folder written by ``ddkit run`` (stage folders with markers), not a single stage's folder."""
    path = Path(path)
    return path.is_dir() and bool(completed_stages(path))


def stage_model(run_dir: str | Path, stage: str) -> Path:
    """The model file of a completed stage: the file of its ``result["model"]`` in this stage folder (so a copied
    or moved run folder uses its own copy, not the original's), else that recorded path (a teacher given by
    ``teacher.checkpoint`` lives outside the run), else the stage folder's own files."""
    result = completed_stages(run_dir).get(stage)
    if result is None:
        raise ConfigError(f"{run_dir}: no completed stage {stage!r}")
    model = result.get("model")
    if model and (Path(run_dir) / stage / Path(model).name).is_file():
        return Path(run_dir) / stage / Path(model).name
    if model and Path(model).is_file():
        return Path(model)
    return resolve_checkpoint(Path(run_dir) / stage)


def _round(stage: str) -> int:
    match = _ROUND.fullmatch(stage)
    return int(match.group(1) or 1) if match else 0


def final_student(run_dir: str | Path) -> tuple[Path, str, str]:
    """``(model file, stage, note)`` of the run's final student: the last round's data distillation student, else
    the only KD student. Several KD students are a :class:`ConfigError` that asks for one stage folder.

    ``note`` says what else the folder holds that was not taken (an unfinished later round), or is empty.
    """
    run_dir = Path(run_dir)
    stages = completed_stages(run_dir)
    students = sorted((s for s in stages if _round(s)), key=_round)
    if students:
        last = students[-1]
        later = sorted((p.name for p in run_dir.iterdir() if p.is_dir() and _round(p.name) > _round(last)), key=_round)
        note = f"stage {later[-1]} is not finished" if later else ""
        return stage_model(run_dir, last), last, note
    kd = [s for s in stages if s.startswith("kd_")]
    if len(kd) == 1:
        return stage_model(run_dir, kd[0]), kd[0], ""
    if kd:
        raise ConfigError(f"{run_dir}: the run has several KD students ({', '.join(kd)}); pass one stage folder, "
                          f"e.g. {run_dir / kd[0]}")
    bad = unreadable_markers(run_dir)
    raise ConfigError(f"{run_dir}: the run has no finished student (stages done: {', '.join(stages) or 'none'}"
                      + (f"; unreadable stage.json in {', '.join(bad)}: re-run ddkit run to redo them" if bad else "")
                      + f"); pass a stage folder such as {run_dir / 'teacher'} to use that model")


def describe_stage(stage: str) -> str:
    """A stage name in words: ``student_r2`` -> ``student round 2``."""
    if stage == "student":
        return "the data distillation student"
    if _round(stage) > 1:
        return f"the round {_round(stage)} student"
    if stage.startswith("kd_"):
        return f"the KD student {stage[3:]!r}"
    return f"the {stage} model"
