"""Checkpoints that rebuild their model from the file alone and load with ``torch.load(weights_only=True)``.

Two formats, both plain dicts of tensors and primitive containers:

* ``ddkit-model-v1`` (``ddkit export``, ``<run>/model.pt``): ``task`` (the task's config block), ``model_cfg`` (the
  model's config block), ``info`` (the dataset's :class:`~ddkit.types.DatasetInfo` as a dict) and ``model`` (the
  state dict). Student-only: no optimizer, no adaptation layers, no teacher. Exported from an unfinished checkpoint,
  it keeps ``iteration`` and ``total_iterations``, so that loading it still warns that it is unfinished.
* ``ddkit-checkpoint-v1`` (``<run>/checkpoints/last.pt``, written atomically by the trainer): the same keys plus
  ``optimizer``, ``scheduler``, ``scaler``, ``sampler``, ``rng``, ``losses`` (loss terms' own parameters, e.g. hint
  adaptation layers), ``iteration`` and ``total_iterations``.

:func:`load_model` accepts either file, or a run folder (``model.pt`` first, then ``checkpoints/last.pt``); with
``trust_foreign``, also another library's file that a model plugin opens (``ModelSpec.open_file``).
"""
from __future__ import annotations

import dataclasses
import logging
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ddkit.engine.task import Task, model_info, unwrap_model
from ddkit.errors import ConfigError, DataError
from ddkit.io import atomic_torch_save
from ddkit.types import DatasetInfo

log = logging.getLogger("ddkit.checkpoint")

CHECKPOINT_FORMAT = "ddkit-checkpoint-v1"
MODEL_FORMAT = "ddkit-model-v1"
LAST = "last.pt"


def info_to_dict(info: DatasetInfo) -> dict[str, Any]:
    return _plain(dataclasses.asdict(info))


def info_from_dict(d: Mapping[str, Any]) -> DatasetInfo:
    names = {f.name for f in dataclasses.fields(DatasetInfo)}
    return DatasetInfo(**{k: v for k, v in d.items() if k in names})


def _plain(obj: Any) -> Any:
    """Containers of primitives only (tuples -> lists), so the file loads with ``weights_only=True``."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return obj
    if hasattr(obj, "item"):  # numpy scalar
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} in a weights-only checkpoint")


def cpu_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in unwrap_model(module).state_dict().items()}


def model_record(model: nn.Module) -> dict[str, Any]:
    """The student-only record: task, model config, dataset info and weights."""
    model_cfg, info, task_cfg = model_info(model)
    return {"format": MODEL_FORMAT, "task": _plain(task_cfg), "model_cfg": _plain(model_cfg),
            "info": info_to_dict(info), "model": cpu_state_dict(model)}


def save_model(model: nn.Module, path: str | Path) -> Path:
    """Write student-only weights (``ddkit-model-v1``) atomically."""
    return atomic_torch_save(model_record(model), path)


def save_checkpoint(path: str | Path, model: nn.Module, **state: Any) -> Path:
    """Write a full training checkpoint atomically; ``state`` holds optimizer/scheduler/sampler/rng/... entries."""
    record = model_record(model)
    record["format"] = CHECKPOINT_FORMAT
    record.update({k: v for k, v in state.items()})
    return atomic_torch_save(record, path)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the best file in a run folder (``model.pt``, then ``checkpoints/last.pt``)."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "model.pt", path / "checkpoints" / LAST):
            if candidate.is_file():
                return candidate
        raise ConfigError(f"{path}: no model.pt or checkpoints/{LAST} in this run folder")
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    return path


PASS_INSTEAD = ("pass a model.pt or checkpoints/last.pt written by ddkit train / ddkit export, or their run folder "
                "(plain state dicts go to a model's 'pretrained' key)")


def _unreadable(path: Path, err: Exception) -> str:
    """Why torch could not load ``path`` with ``weights_only=True``, in words (torch's own advice to retry with
    ``weights_only=False`` would run arbitrary code from the file: never repeated)."""
    text = str(err)
    if "Unsupported global" in text:  # a well-formed pickle naming a class: the only sign of Python objects
        return "it holds Python objects, not only tensors and plain containers: it is not a ddkit checkpoint"
    if ("Weights only load failed" in text or "zip" in text.lower() or "central directory" in text
            or isinstance(err, (EOFError, RuntimeError, KeyError, pickle.UnpicklingError))):
        return "it is corrupt, truncated or not a torch file (an interrupted copy or write?)"
    return f"it cannot be read ({type(err).__name__})"


def _explained(path: Path, registry: Any = None, trust_hint: str | None = None) -> str | None:
    """A model plugin's line on how it loads ``path`` (its ``ModelSpec.explain_file``), e.g. another library's
    checkpoint; the first that recognises the file. ``trust_hint`` (how the caller takes a trusted file as it is)
    follows the line of a plugin that can also open the file (its ``ModelSpec.open_file``)."""
    from ddkit.plugin_manager import get_registry

    for entry in (registry or get_registry()).entries("models"):
        explain = getattr(entry.spec, "explain_file", None)
        line = explain(path) if explain is not None else None
        if line:
            opens = trust_hint and getattr(entry.spec, "open_file", None) is not None
            return f"{line}; or {trust_hint}" if opens else line
    return None


def _open_foreign(path: Path, registry: Any,
                  device: str | torch.device) -> tuple[Task, nn.Module, DatasetInfo] | None:
    """``(task, model, info)`` of a trusted file that is not a ddkit checkpoint, built by the first model plugin
    whose ``ModelSpec.open_file`` knows it (reading it may run code from it); ``None`` when none does."""
    for entry in registry.entries("models"):
        open_file = getattr(entry.spec, "open_file", None)
        opened = open_file(path) if open_file is not None else None
        if opened is not None:
            task_name, block, info = opened
            task = registry.build("tasks", {"name": task_name}, where=f"{path}: task")
            return task, task.build_model(block, info).to(device).eval(), info
    return None


def _plain_state_dict(record: Any) -> bool:
    """Whether ``record`` is a bare ``model.state_dict()`` (tensor names to tensors), not a ddkit record."""
    return isinstance(record, dict) and bool(record) and all(isinstance(v, torch.Tensor) for v in record.values())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    fresh_hint: str | None = None, registry: Any = None,
                    plain_hint: str | None = None, trust_hint: str | None = None) -> dict[str, Any]:
    """Load a ddkit file with ``weights_only=True``; raise :class:`DataError` naming the file if it is not one.

    ``fresh_hint``: what to do instead (default: a model plugin's way to load the file, else which files to pass),
    e.g. for a run's own checkpoint. ``registry``: whose model plugins are asked (default: the installed ones).
    ``plain_hint``: what to do with a plain state dict, for a command that has its own route (e.g. ``ddkit label``).
    ``trust_hint``: how the caller takes a file a model plugin opens as it is (:func:`_explained`).
    """
    path = resolve_checkpoint(path)
    try:
        record = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        hint = fresh_hint or _explained(path, registry, trust_hint) or PASS_INSTEAD
        raise DataError(f"{path}: cannot load: {_unreadable(path, err)}; {hint}") from None
    if plain_hint and _plain_state_dict(record):
        raise DataError(f"{path}: a plain state dict (tensor names to tensors), not a ddkit checkpoint; {plain_hint}")
    hint = fresh_hint or PASS_INSTEAD
    if not isinstance(record, dict) or record.get("format") not in (CHECKPOINT_FORMAT, MODEL_FORMAT):
        raise DataError(f"{path}: not a ddkit checkpoint (no 'format' key of {MODEL_FORMAT} or {CHECKPOINT_FORMAT}); "
                        f"{hint}")
    return record


def unfinished(record: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(iteration, total_iterations)`` of a checkpoint saved before its training finished; None otherwise."""
    iteration, total = record.get("iteration"), record.get("total_iterations")
    if isinstance(iteration, int) and isinstance(total, int) and iteration < total:
        return iteration, total
    return None


def warn_unfinished(path: str | Path, record: Mapping[str, Any]) -> None:
    """One warning line when ``record`` (read from ``path``) is an unfinished training checkpoint."""
    counts = unfinished(record)
    if counts:
        log.warning("%s: an unfinished training checkpoint (iteration %d of %d), not the finished model; finish "
                    "it with ddkit train --resume, or ddkit run", path, *counts)


def load_model(path: str | Path, device: str | torch.device = "cpu", registry: Any = None,
               warn: bool = True, plain_hint: str | None = None, trust_foreign: bool = False,
               trust_hint: str | None = None) -> tuple[Task, nn.Module, DatasetInfo]:
    """Rebuild ``(task, model, info)`` from a ddkit checkpoint or exported model alone; the model is in eval mode.

    Args:
        path: a ``.pt`` written by the trainer or ``ddkit export``, or a run folder.
        device: where to put the model.
        registry: the registry to build the task and model from (default: the installed plugins).
        warn: warn when the file is an unfinished training checkpoint (:func:`warn_unfinished`).
        plain_hint: what to do with a plain state dict instead (:func:`load_checkpoint`).
        trust_foreign: the user trusts ``path``: a file that is not a ddkit checkpoint is built by the model plugin
            that knows it (``ModelSpec.open_file``; reading it may run code from it). Never without this consent.
        trust_hint: how the caller gives that consent, added to the refusal of a file a plugin could open.
    """
    from ddkit.plugin_manager import get_registry

    registry = registry or get_registry()
    try:
        record = load_checkpoint(path, registry=registry, plain_hint=plain_hint, trust_hint=trust_hint)
    except DataError:
        opened = _open_foreign(resolve_checkpoint(path), registry, device) if trust_foreign else None
        if opened is None:
            raise
        return opened
    task = registry.build("tasks", record["task"], where=f"{path}: task")
    info = info_from_dict(record["info"])
    model_cfg = dict(record["model_cfg"])
    for key in [k for k in model_cfg if k.startswith("pretrained")]:
        model_cfg[key] = None  # the weights come from this file: no init file, no download (pretrained_backbone too)
    if warn:
        warn_unfinished(path, record)
    model = task.build_model(model_cfg, info)
    missing, unexpected = model.load_state_dict(record["model"], strict=False)
    if missing or unexpected:
        raise DataError(f"{path}: weights do not fit the model {model_cfg.get('name')!r}: missing "
                        f"{missing[:5]}, unexpected {unexpected[:5]}")
    return task, model.to(device).eval(), info
