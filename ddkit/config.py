"""Recipes: OmegaConf YAML with ``defaults`` includes, ``key=value`` overrides and validation.

A recipe's strategy blocks (``aggregator: {name: wbf, iou_thr: 0.55}``) are validated against the registry, at any
depth, by their key: see :data:`STRATEGY_SLOTS`. Errors name the file, the field and the fix.
"""
from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ddkit.errors import ConfigError
from ddkit.io import atomic_write_text
from ddkit.registry import Registry

# A key of this name anywhere in a recipe holds a strategy block (or a list of them for the plural keys).
STRATEGY_SLOTS: dict[str, str] = {
    "task": "tasks",
    "dataset": "datasets",
    "model": "models",
    "transforms": "transforms",
    "aggregator": "aggregators",
    "selector": "selectors",
    "losses": "losses",
}
# The plural slots hold a list of blocks (a bare name would be walked letter by letter); True: at least one.
LIST_SLOTS: dict[str, bool] = {"transforms": False, "losses": True}
# The sections a recipe may have; a stage adds its own here when it is written.
TOP_LEVEL_KEYS: set[str] = {"defaults", "run", "task", "data", "teacher", "student", "label", "evaluate",
                            "bench", "kd", "baselines", "rounds"}


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Load a YAML recipe, merge its ``defaults`` (paths relative to it, merged first) and the dotlist overrides."""
    path = Path(path)
    cfg = _load_with_defaults(path, seen=())
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not of the form key=value (e.g. run.seed=1)")
        for override in overrides:
            key, value = override.split("=", 1)
            try:  # update (not merge a dotlist) so that list items can be overridden: label.transforms.0.name=x
                value = _parse_override_value(value)
                _detach_interpolations(cfg, key.strip())
                _drop_replaced_block(cfg, key.strip(), value)
                OmegaConf.update(cfg, key.strip(), value, merge=True, force_add=True)
            except (OmegaConfBaseException, TypeError, ValueError, yaml.YAMLError) as err:
                raise ConfigError(f"override {override!r}: {_first_line(err)}") from None
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: cannot resolve interpolation: {_first_line(err)}") from None
    return cfg


def _load_with_defaults(path: Path, seen: tuple[Path, ...]) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'defaults' include cycle: {' -> '.join(map(str, seen + (path,)))}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # yaml errors carry the line and column
        raise ConfigError(f"{path}: not valid YAML: {_first_line(err)}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got a list")
    includes = cfg.pop("defaults", None)
    if includes is None:
        return cfg
    if not isinstance(includes, ListConfig) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"{path}: 'defaults' must be a list of recipe paths relative to this file")
    base = OmegaConf.create()
    for include in includes:
        inc_path = (path.parent / include)
        if inc_path.suffix == "":
            inc_path = inc_path.with_suffix(".yaml")
        base = _merge(base, _load_with_defaults(inc_path, seen + (path.resolve(),)))
    return _merge(base, cfg)


def _block_name(node: Any) -> Any:
    if isinstance(node, DictConfig):
        return dict(node.items_ex(resolve=False)).get("name")
    return node if isinstance(node, str) and not node.startswith("${") else None


def _merge(base: DictConfig, over: DictConfig) -> DictConfig:
    """``OmegaConf.merge``, except that a strategy block whose ``name`` changes replaces the old block instead of
    inheriting its strategy-specific keys (``model: {name: timm}`` over ``{name: mlp, hidden: [...]}``)."""
    base = base.copy()
    _drop_renamed(base, over)
    return OmegaConf.merge(base, over)


def _drop_renamed(base: Any, over: Any) -> None:
    if not isinstance(base, DictConfig) or not isinstance(over, DictConfig):
        return
    olds = dict(base.items_ex(resolve=False))
    for key, new in over.items_ex(resolve=False):  # unresolved: interpolations resolve once, at the end
        if key not in olds:
            continue
        old = olds[key]
        if str(key) in STRATEGY_SLOTS and _block_name(new) is not None and _block_name(new) != _block_name(old):
            del base[key]
        else:
            _drop_renamed(old, new)


def _detach_interpolations(cfg: DictConfig, key: str) -> None:
    """Replace every interpolation on the way to ``key`` with a copy of the node it points at, so that an override
    ``student.model.width=0.25`` under ``student.model: ${teacher.model}`` changes the student, not the teacher
    (``OmegaConf.update`` would write through the interpolation). Interpolations inside the copy stay as they are."""
    node: Any = cfg
    for part in key.split(".")[:-1]:
        if isinstance(node, ListConfig) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
            index: Any = int(part)
        elif isinstance(node, DictConfig) and part in node:
            index = part
        else:
            return
        if node._get_node(index)._is_interpolation():
            target = node[index]  # resolved: the node it points at
            if not isinstance(target, (DictConfig, ListConfig)):
                return
            node[index] = copy.deepcopy(target)
        node = node._get_node(index)


# YAML 1.1 (PyYAML) reads 1e-3 as a string; OmegaConf's recipe loader reads it as a float: overrides must agree
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _parse_override_value(text: str) -> Any:
    value = yaml.safe_load(text) if text else None
    unquoted = isinstance(value, str) and value == text.strip()
    return float(value) if unquoted and _EXPONENT_FLOAT.fullmatch(value) else value


def _is_strategy_block(path: str) -> bool:
    """``student.model``, ``label.transforms.0``: a block whose ``name`` picks a plugin (not ``run``)."""
    parent, _, last = path.rpartition(".")
    return last in STRATEGY_SLOTS or (last.isdigit() and parent.rpartition(".")[2] in STRATEGY_SLOTS)


def _drop_replaced_block(cfg: DictConfig, key: str, value: Any) -> None:
    """Before an override ``X.name=new`` (or ``X={name: new, ...}``) of a strategy block ``X`` named otherwise,
    empty ``X`` so that the old strategy's keys do not merge into the new one."""
    path, _, last = key.rpartition(".")
    if last == "name" and _is_strategy_block(path):
        block_path, new_name = path, value
    elif last in STRATEGY_SLOTS or path.rpartition(".")[2] in STRATEGY_SLOTS:  # X={...} or X.0={...}
        block_path, new_name = key, _block_name(OmegaConf.create(value)) if isinstance(value, dict) else value
    else:
        _drop_renamed_below(cfg, key, value)
        return
    old = OmegaConf.select(cfg, block_path, default=None) if block_path else None
    if isinstance(old, DictConfig) and new_name is not None and old.get("name") != new_name:
        OmegaConf.update(cfg, block_path, {"name": new_name}, merge=False, force_add=True)


def _drop_renamed_below(cfg: DictConfig, key: str, value: Any) -> None:
    """An override ``X={...}`` of a section that holds strategy blocks (``data.train={dataset: {name: coco, ...}}``):
    a block under it whose ``name`` changes drops the old strategy's keys, as a ``defaults:`` merge does. The path to
    ``X`` holds no interpolation here (:func:`_detach_interpolations`); none under it is followed."""
    if not isinstance(value, dict):
        return
    parent_path, _, last = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_path, default=None) if parent_path else cfg
    if isinstance(parent, DictConfig):
        _drop_renamed(parent, OmegaConf.create({last: value}))


def validate_config(cfg: DictConfig, registry: Registry, source: str = "recipe") -> None:
    """Check the top-level sections and every strategy block; raise :class:`ConfigError` on the first problem."""
    for key in cfg.keys():
        if key not in TOP_LEVEL_KEYS:
            hint = difflib.get_close_matches(str(key), sorted(TOP_LEVEL_KEYS), n=1)
            did_you_mean = f" Did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(f"{source}: unknown section {key!r}.{did_you_mean} "
                              f"Valid sections: {', '.join(sorted(TOP_LEVEL_KEYS))}")
    _validate_node(cfg, registry, source, "")


def _validate_node(node: Any, registry: Registry, source: str, path: str) -> None:
    if isinstance(node, DictConfig):
        for key, value in node.items_ex(resolve=False) if hasattr(node, "items_ex") else node.items():
            sub = f"{path}.{key}" if path else str(key)
            kind = STRATEGY_SLOTS.get(str(key))
            if kind is not None and value is not None:
                _check_list_slot(str(key), value, kind, f"{source}: {sub}")
                blocks = value if isinstance(value, ListConfig) else [value]
                for i, block in enumerate(blocks):
                    where = f"{source}: {sub}[{i}]" if isinstance(value, ListConfig) else f"{source}: {sub}"
                    registry.params(kind, block, where=where)
            else:
                _validate_node(value, registry, source, sub)
    elif isinstance(node, ListConfig):
        for i, value in enumerate(node):
            _validate_node(value, registry, source, f"{path}[{i}]")


def with_strategy_defaults(section: Any, registry: Registry) -> Any:
    """A plain recipe value (dicts, lists, scalars) with every strategy block written out in full: its name and all
    of its parameters, the plugin's defaults included. A run stage's marker hashes this beside the recipe's own
    text, so a default that changed in a new version of a plugin redoes the stages it decides."""
    if isinstance(section, list):
        return [with_strategy_defaults(v, registry) for v in section]
    if not isinstance(section, dict):
        return section
    out = {}
    for key, value in section.items():
        kind = STRATEGY_SLOTS.get(str(key))
        if kind is None or value is None:
            out[key] = with_strategy_defaults(value, registry)
        else:
            blocks = [_in_full(kind, b, registry) for b in (value if isinstance(value, list) else [value])]
            out[key] = blocks if isinstance(value, list) else blocks[0]
    return out


def _in_full(kind: str, block: Any, registry: Registry) -> dict[str, Any]:
    entry, params = registry.params(kind, block)
    return {"name": entry.spec.name, **params}


def _check_list_slot(key: str, value: Any, kind: str, where: str) -> None:
    """A plural slot (``losses``, ``transforms``) holds a list of blocks, and ``losses`` at least one."""
    if key not in LIST_SLOTS:
        return
    noun = kind[:-2] if kind.endswith("sses") else kind[:-1]
    example = f"e.g. [{{name: {value}}}]" if isinstance(value, str) else "e.g. [{name: ...}]"
    if not isinstance(value, ListConfig):
        raise ConfigError(f"{where} must be a list of {noun} blocks, {example}; got {_to_text(value)}")
    if LIST_SLOTS[key] and len(value) == 0:
        raise ConfigError(f"{where} is empty: give at least one {noun} block, e.g. [{{name: hard_label}}], or "
                          f"remove the key for the default")


def _to_text(value: Any) -> str:
    return repr(OmegaConf.to_container(value) if isinstance(value, DictConfig) else value)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_config(cfg: DictConfig, run_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved recipe into the run folder (atomically), relative paths of existing files and folders
    made absolute (see :func:`absolute_paths`), so that ``ddkit eval RUN`` works from any directory."""
    return atomic_write_text(Path(run_dir) / name, to_yaml(OmegaConf.create(absolute_paths(cfg))))


def absolute_paths(cfg: DictConfig) -> dict[str, Any]:
    """``cfg`` resolved into plain types, each string value that names an existing file or folder by a relative
    path (one with a ``/`` or a suffix: ``root: ../data/coco8``, ``annotations: train.json``) made absolute.
    Strategy names (``name`` keys) and strings that name nothing on disk stay as they are."""
    def absolute(node: Any, key: Any = None) -> Any:
        if isinstance(node, dict):
            return {k: absolute(v, k) for k, v in node.items()}
        if isinstance(node, list):
            return [absolute(v, key) for v in node]
        if isinstance(node, str) and key != "name" and ("/" in node or Path(node).suffix) \
                and not Path(node).is_absolute() and Path(node).exists():
            return str(Path(node).resolve())
        return node

    return absolute(OmegaConf.to_container(cfg, resolve=True))


def _first_line(err: Exception) -> str:
    return " ".join(str(err).strip().splitlines()[:3])
