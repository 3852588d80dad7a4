"""A whole recipe checked before anything runs: every section through its own parser, every strategy block through
the registry, the same one-line errors from ``ddkit config show``, ``train``, ``label``, ``run`` and ``bench``.

:func:`validate_recipe` reads no data and writes nothing; :func:`with_defaults` fills every default in (what
``ddkit config show --defaults`` prints and what a run saves as ``config.yaml``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from omegaconf import DictConfig

from ddkit.config import load_config, validate_config
from ddkit.engine.bench import parse_bench_config
from ddkit.engine.defaults import RunConfig, with_defaults
from ddkit.engine.label import parse_label_config
from ddkit.engine.train import SECTION_KEYS, parse_train_config
from ddkit.errors import ConfigError
from ddkit.registry import Registry, _to_plain, check_keys, parse_section

__all__ = ["RunConfig", "load_recipe", "validate_recipe", "with_defaults"]

KD_VARIANT_KEYS = ("model", "train", "losses", "transfer_set")
# the data parts a KD variant may distil on (Hinton et al.'s transfer set): the labeled part, and the unlabeled one
TRANSFER_PARTS = ("labeled", "unlabeled")


@dataclass
class BaselinesConfig:
    """The ``baselines:`` section: the student's model on the labeled part alone, and with the unlabeled part's
    true labels (the upper bound)."""

    labeled_only: bool = False
    fully_labeled: bool = False


@dataclass
class EvaluateConfig:
    """The ``evaluate:`` section: multi-transform (TTA) evaluation of every model on the test part."""

    tta: bool = False
    transforms: list[Any] | None = None
    aggregator: Any = None


@dataclass
class KDConfig:
    """The ``kd:`` section: knowledge-distillation variants of the student (``{name: {losses, train, model}}``),
    and the variant the others are measured against (default: the one whose losses read no teacher)."""

    variants: dict[str, Any] = dataclasses.field(default_factory=dict)
    baseline: str | None = None


def _model_section(stage: str) -> Callable[[Any, str], None]:
    """The check of a ``teacher`` / ``student`` section: its keys (those ``ddkit train`` reads) and its train block."""
    def check(block: Any, where: str) -> None:
        valid = sorted(SECTION_KEYS[stage])
        if not isinstance(block, Mapping):
            raise ConfigError(f"{where} must be a mapping with keys {', '.join(valid)}")
        check_keys(block, valid, where)
        train = parse_train_config(block.get("train"), where=f"{where}.train")
        if "ensemble" in block:
            _ensemble(block, train.as_built, f"{where}.ensemble")

    return check


def _ensemble(teacher: Mapping[str, Any], as_built: bool, where: str) -> None:
    """``teacher.ensemble: N``: N teachers trained here (seeds run.seed + 1000 k) label together."""
    n = teacher["ensemble"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"{where} must be an integer >= 1 (the number of teachers), got {n!r}")
    if n > 1 and teacher.get("checkpoint"):
        raise ConfigError(f"{where}: {n} teachers are trained by the run; remove teacher.checkpoint (one file is one "
                          "teacher) or set ensemble: 1")
    if n > 1 and as_built:
        raise ConfigError(f"{where}: {n} teachers used as built from the same weights (train.iterations: 0) are one "
                          "model; set ensemble: 1")


def _rounds(value: Any, where: str) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ConfigError(f"{where} must be an integer >= 1, got {value!r}")


def _kd(block: Any, where: str) -> None:
    kd = parse_section(KDConfig, block, where)
    for name, variant in kd.variants.items():
        if "." in str(name):  # the name is a path in the run's stage inputs (kd.variants.<name>)
            raise ConfigError(f"{where}.variants: the name {name!r} has a '.'; use letters, digits and '_'")
        check_keys(variant or {}, KD_VARIANT_KEYS, f"{where}.variants.{name}")
        parse_train_config((variant or {}).get("train"), where=f"{where}.variants.{name}.train")
        _transfer_set((variant or {}).get("transfer_set"), f"{where}.variants.{name}.transfer_set")


def _transfer_set(parts: Any, where: str) -> None:
    """``transfer_set``: the labeled part alone (the default), or with the unlabeled part (each once)."""
    if parts is None:
        return
    ok = (isinstance(parts, list) and all(isinstance(p, str) and p in TRANSFER_PARTS for p in parts)
          and "labeled" in parts and len(set(parts)) == len(parts))
    if not ok:
        raise ConfigError(f"{where}: {parts!r} is not a list of data parts with 'labeled' in it; the parts are "
                          f"{', '.join(TRANSFER_PARTS)} (e.g. [labeled, unlabeled])")


# section -> its check; ``task`` and ``data`` are strategy blocks / data blocks checked elsewhere
SECTION_CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "run": lambda b, w: parse_section(RunConfig, b, w),
    "teacher": _model_section("teacher"),
    "student": _model_section("student"),
    "label": parse_label_config,
    "bench": parse_bench_config,
    "baselines": lambda b, w: parse_section(BaselinesConfig, b, w),
    "evaluate": lambda b, w: parse_section(EvaluateConfig, b, w),
    "kd": _kd,
    "rounds": _rounds,
}


def validate_recipe(cfg: DictConfig, registry: Registry, source: str = "recipe") -> None:
    """Check every section and strategy block of ``cfg``; raise :class:`ConfigError` naming the first problem."""
    validate_config(cfg, registry, source=source)
    for key, check in SECTION_CHECKS.items():
        if cfg.get(key) is not None:
            check(_to_plain(cfg.get(key)), f"{source}: {key}")


def load_recipe(path: str, overrides: Sequence[str] = (), registry: Registry | None = None) -> DictConfig:
    """Load a recipe with its overrides and validate all of it: what every command does first, so that a typo is
    the same one-line error from ``train``, ``label``, ``bench`` and ``run``."""
    if registry is None:
        from ddkit.plugin_manager import get_registry

        registry = get_registry()
    cfg = load_config(path, overrides)
    try:
        validate_recipe(cfg, registry, source=str(path))
    except ConfigError as err:
        if not overrides:
            raise
        in_file = _error(path, (), registry)
        if in_file is not None:  # the file's own mistake first (an override's would be blamed on the file)
            raise in_file from None
        blamed = next(([o] for o in overrides if _error(path, [o], registry) is not None), list(overrides))
        with_overrides = f"{path} with the override{'s' if len(blamed) > 1 else ''} {', '.join(blamed)}"
        raise type(err)(str(err).replace(str(path), with_overrides, 1)) from None
    return cfg


def _error(path: str, overrides: Sequence[str], registry: Registry) -> ConfigError | None:
    """What is wrong with the recipe file with these overrides (one at a time, to find the one to blame)."""
    try:
        validate_recipe(load_config(path, overrides), registry, source=str(path))
    except ConfigError as err:
        return err
    return None
