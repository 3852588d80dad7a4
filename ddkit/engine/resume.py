"""Resuming a run: what a checkpoint records about the recipe, and which differences a resume refuses.

A checkpoint stores ``recipe`` (the train block, the loss blocks, the model block, the seed) and ``inputs`` (a
fingerprint of the training data: every target and each image file's path, size and mtime; the teacher
checkpoint's sha256). On resume every difference is either harmless (logging, evaluation and checkpoint cadence,
``max_iterations``, worker count: they do not change the weights) and noted, or refused in one line that names the
keys, both values and how to start fresh.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, NoReturn, Sequence

from torch import nn

from ddkit.engine.task import model_info
from ddkit.engine.train_config import HARMLESS_KEYS, TrainConfig
from ddkit.errors import ConfigError
from ddkit.io import remove_stale_temp


def _loss_blocks(losses: Sequence[Any] | None) -> list[Any]:
    """The loss blocks as plain data (built terms by their class name), for the checkpoint's recipe."""
    from ddkit.registry import _to_plain

    specs = _to_plain(losses) if losses is not None else [{"name": "hard_label"}]
    return [b if isinstance(b, (dict, str)) else type(b).__name__ for b in specs]


def recipe_record(cfg: TrainConfig, losses: Sequence[Any] | None, student: nn.Module, seed: int) -> dict[str, Any]:
    """What determines the result besides the inputs: stored in the checkpoint, compared on resume."""
    return {"train": dataclasses.asdict(cfg), "losses": _loss_blocks(losses),
            "model": model_info(student)[0], "seed": seed}


def _flat(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: value}


_INPUT_NAMES = {"inputs.data": "the training data (fingerprint of targets and files)",
                "inputs.teacher": "the teacher checkpoint (sha256)"}


def resume_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """``(refused, harmless)``: ``"key: old -> new"`` lines for the keys whose values differ between a checkpoint's
    recipe record and this run's. Harmless keys (:data:`~ddkit.engine.train_config.HARMLESS_KEYS` of the train
    block) do not change the result; nor, by this rule, do keys the checkpoint lacks, at any depth (an older
    ddkit's, written before the key existed: e.g. ``train.fused``, whose step differs from the old one by float
    rounding)."""
    a, b = _flat("", old), _flat("", new)
    refused, harmless = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") == b.get(key, "<unset>"):
            continue
        shown = _INPUT_NAMES.get(key, key.removeprefix("recipe."))
        line = f"{shown}: {a.get(key, '<unset>')!r} -> {b.get(key, '<unset>')!r}"
        train_key = key.removeprefix("recipe.train.") if key.startswith("recipe.train.") else None
        (harmless if train_key in HARMLESS_KEYS or key not in a else refused).append(line)
    return refused, harmless


def recorded_changes(state: Mapping[str, Any], recipe: Mapping[str, Any],
                     inputs: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """``(refused, harmless)`` (see :func:`resume_changes`) between what a checkpoint records and this run."""
    old_recipe = state.get("recipe") or {"train": state.get("train_cfg") or {}}
    return resume_changes({"recipe": old_recipe, "inputs": state.get("inputs") or {}},
                          {"recipe": recipe, "inputs": inputs})


def check_resume(last: Path, state: Mapping[str, Any], recipe: Mapping[str, Any], inputs: Mapping[str, Any],
                  total: int) -> list[str]:
    """Refuse a checkpoint of another recipe or other inputs (one line: keys, both values, how to start fresh);
    return the harmless changes."""
    fresh = "start fresh with --force (ddkit train) or --force <stage> (ddkit run)"
    refused, harmless = recorded_changes(state, recipe, inputs)
    if refused:
        raise ConfigError(f"cannot resume {last}: this run differs in {'; '.join(refused)}; {fresh}, or resume "
                          "with the checkpoint's values")
    if state.get("total_iterations") != total:
        raise ConfigError(f"cannot resume {last}: it was for {state.get('total_iterations')} iterations, this "
                          f"run has {total} (the schedule or the data changed); {fresh}")
    return harmless


def check_finished(stage: str, model: Path, state: Mapping[str, Any], recipe: Mapping[str, Any],
                   inputs: Mapping[str, Any]) -> list[str]:
    """A finished stage stands for this recipe only when its final checkpoint (``state``) records the same recipe
    and inputs: else refuse in one line (the keys, both values, how to retrain); return the harmless changes."""
    refused, harmless = recorded_changes(state, recipe, inputs)
    if refused:
        raise ConfigError(f"stage {stage} finished earlier ({model}) with another recipe: {'; '.join(refused)}; "
                          f"pass --force to train it again with this recipe (replaces model.pt), or use another "
                          f"run.out_dir")
    return harmless


def refuse_fresh_start(stage: str, last: Path, state: Mapping[str, Any]) -> NoReturn:
    """An unfinished stage's checkpoint (interrupted, killed or stopped by ``max_iterations``) is never replaced by
    a fresh start that nobody asked for: refuse in one line that says how to continue or start over."""
    raise ConfigError(f"stage {stage} was interrupted at iteration {state.get('iteration')} of "
                      f"{state.get('total_iterations')} (or stopped by max_iterations; checkpoint {last}); add "
                      f"--resume to continue it, or --force (or another run.out_dir) to start over")


def clean_stale_temp(ckpt_dir: Path) -> None:
    """Temporary files of a writer killed mid-write (``checkpoints/.last.pt.<random>.tmp``) are never read: remove
    them (the commands also clean their whole folder once they hold its lock, :mod:`ddkit.engine.run_lock`)."""
    remove_stale_temp(ckpt_dir, recursive=False)


