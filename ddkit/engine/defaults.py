"""A recipe with every default written out: what ``ddkit config show --defaults`` prints and what every run saves
as ``config.yaml`` (strategy parameters, the ``run`` section, each ``train`` block, the ``label`` section)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from ddkit.config import STRATEGY_SLOTS
from ddkit.engine.label.config import parse_label_config
from ddkit.engine.train_config import parse_train_config
from ddkit.registry import Registry, _to_plain, parse_section

__all__ = ["RunConfig", "with_defaults"]


@dataclass
class RunConfig:
    """The ``run:`` section.

    Attributes:
        name: the run's name (``runs/<name>`` when ``out_dir`` is not given).
        out_dir: the run folder.
        seed: the seed of splits, initialisation and batches.
        device: ``auto`` (a GPU when there is one), ``cpu``, ``cuda``, ``cuda:1``.
    """

    name: str | None = None
    out_dir: str | None = None
    seed: int = 0
    device: str = "auto"


def _filled_block(block: Any, kind: str, registry: Registry) -> Any:
    entry, params = registry.params(kind, block)
    return {"name": entry.spec.name, **params}


def _fill(node: Any, registry: Registry) -> Any:
    if isinstance(node, Mapping):
        out = {}
        for key, value in node.items():
            kind = STRATEGY_SLOTS.get(str(key))
            if kind is not None and value is not None:
                out[key] = ([_filled_block(b, kind, registry) for b in value] if isinstance(value, list)
                            else _filled_block(value, kind, registry))
            else:
                out[key] = _fill(value, registry)
        return out
    if isinstance(node, list):
        return [_fill(v, registry) for v in node]
    return node


def with_defaults(cfg: DictConfig, registry: Registry) -> DictConfig:
    """The recipe with every default written out: strategy parameters, ``run``, each ``train`` block and
    ``label``."""
    plain = _fill(_to_plain(cfg), registry)
    if "run" in plain or "teacher" in plain or "student" in plain:
        plain["run"] = dataclasses.asdict(parse_section(RunConfig, plain.get("run"), "run"))
    for section in ("teacher", "student"):
        if isinstance(plain.get(section), dict):
            plain[section]["train"] = dataclasses.asdict(parse_train_config(plain[section].get("train")))
    if isinstance(plain.get("label"), dict):  # its strategy blocks filled above; its own keys' defaults here
        parsed = parse_label_config(plain["label"])
        plain["label"] = {**{f.name: getattr(parsed, f.name) for f in dataclasses.fields(parsed)}, **plain["label"]}
    return OmegaConf.create(plain)
