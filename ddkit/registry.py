"""One name -> strategy table for every kind, built from the plugins' registration hooks.

``build(kind, cfg)`` turns a config block such as ``{name: wbf, iou_thr: 0.55}`` into a strategy, validating the
other keys against the spec's params dataclass, with errors that say what exists and what to type instead.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, TypeVar

from ddkit.errors import ConfigError, PluginClashError, UnknownStrategyError
from ddkit.types import AGGREGATOR_INPUTS, KINDS, StrategySpec

T = TypeVar("T")
_SINGULAR = {kind: kind[:-2] if kind.endswith("sses") else kind[:-1] for kind in KINDS}  # losses -> loss


def normalize_kind(kind: str) -> str:
    """Accept ``aggregator`` or ``aggregators``; return the plural kind name."""
    if kind in KINDS:
        return kind
    if kind + "s" in KINDS:
        return kind + "s"
    raise ConfigError(f"Unknown strategy kind {kind!r}. Kinds: {', '.join(KINDS)}")


@dataclass(frozen=True)
class Entry:
    """A registered strategy and where it came from."""

    spec: StrategySpec
    provider: str  # the distribution (pip package) that registered it, or the plugin's name
    plugin: str  # the plugin (entry point) name, usable in DDKIT_DISABLE_PLUGINS


class Registry:
    """All registered strategies of all kinds, in one table keyed by ``(kind, name)``."""

    def __init__(self, entries: Iterable[Entry] = ()):
        self._table: dict[tuple[str, str], Entry] = {}
        for entry in entries:
            self.add(entry)

    def add(self, entry: Entry) -> None:
        spec = entry.spec
        if spec.kind not in KINDS:
            raise PluginClashError(f"Plugin {entry.plugin!r} ({entry.provider}) yielded a spec of unknown kind "
                                   f"{type(spec).__name__}")
        if not spec.name or spec.name != spec.name.strip():
            raise PluginClashError(f"Plugin {entry.plugin!r} ({entry.provider}) registered a {_SINGULAR[spec.kind]} "
                                   f"with an invalid name {spec.name!r}")
        check_spec_fields(entry)
        key = (spec.kind, spec.name)
        if key in self._table:
            other = self._table[key]
            raise PluginClashError(
                f"Two plugins register the {_SINGULAR[spec.kind]} {spec.name!r}: {other.plugin!r} (from "
                f"{other.provider}) and {entry.plugin!r} (from {entry.provider}). Disable one with "
                f"DDKIT_DISABLE_PLUGINS={entry.plugin}"
            )
        self._table[key] = entry

    # ----------------------------------------------------------------------------------------------- lookup
    def names(self, kind: str) -> list[str]:
        kind = normalize_kind(kind)
        return sorted(name for k, name in self._table if k == kind)

    def entries(self, kind: str | None = None) -> list[Entry]:
        kinds = KINDS if kind is None else (normalize_kind(kind),)
        return [self._table[(k, n)] for k in kinds for n in self.names(k)]

    def specs(self, kind: str) -> list[StrategySpec]:
        return [e.spec for e in self.entries(kind)]

    def get(self, kind: str, name: str) -> Entry:
        kind = normalize_kind(kind)
        try:
            return self._table[(kind, name)]
        except (KeyError, TypeError):
            pass
        available = self.names(kind)
        noun = _SINGULAR[kind]
        hint = difflib.get_close_matches(str(name), available, n=1, cutoff=0.5)
        did_you_mean = f" Did you mean {hint[0]!r}?" if hint else ""
        listed = ", ".join(available) if available else "none (is ddkit installed? see `ddkit plugins`)"
        raise UnknownStrategyError(f"Unknown {noun} {name!r}.{did_you_mean} Available: {listed}")

    def __contains__(self, key: tuple[str, str]) -> bool:
        return (normalize_kind(key[0]), key[1]) in self._table

    # ----------------------------------------------------------------------------------------------- build
    def params(self, kind: str, cfg: Mapping[str, Any] | str, where: str = "") -> tuple[Entry, dict[str, Any]]:
        """Validate a config block; return the entry and the full keyword arguments (defaults filled in)."""
        block = _to_plain(cfg)
        if isinstance(block, str):
            block = {"name": block}
        prefix = f"{where}: " if where else ""
        kind = normalize_kind(kind)
        if not isinstance(block, dict) or "name" not in block:
            raise ConfigError(f"{prefix}a {_SINGULAR[kind]} block needs a 'name' key, e.g. "
                              f"{{name: {(self.names(kind) or ['...'])[0]}}}; got {block!r}")
        block = dict(block)
        name = block.pop("name")
        try:
            entry = self.get(kind, name)
        except UnknownStrategyError as err:
            raise UnknownStrategyError(prefix + str(err)) from None
        return entry, validate_params(entry.spec, block, where=f"{prefix}{_SINGULAR[kind]} {name!r}")

    def build(self, kind: str, cfg: Mapping[str, Any] | str, where: str = "", **runtime: Any) -> Any:
        """Build the strategy a config block names. ``runtime`` kwargs (not user-facing) go to the factory."""
        entry, kwargs = self.params(kind, cfg, where)
        return entry.spec.factory(**kwargs, **runtime)


def check_spec_fields(entry: Entry) -> None:
    """A spec's fields, checked when it registers (not when a recipe first uses it): ``params`` a dataclass whose
    type hints resolve at run time, an aggregator's ``input`` one of :data:`~ddkit.types.AGGREGATOR_INPUTS`."""
    spec = entry.spec
    who = f"Plugin {entry.plugin!r} ({entry.provider}): {_SINGULAR[spec.kind]} {spec.name!r}"
    fix = f"; fix the plugin or disable it with DDKIT_DISABLE_PLUGINS={entry.plugin}"
    if spec.params is not None:
        if not (isinstance(spec.params, type) and dataclasses.is_dataclass(spec.params)):
            raise PluginClashError(f"{who}: params must be a dataclass type, got {spec.params!r}{fix}")
        try:
            typing.get_type_hints(spec.params)
        except Exception as err:  # NameError of a name imported under TYPE_CHECKING only, and the like
            raise PluginClashError(f"{who}: the type hints of params {spec.params.__name__} do not resolve at run "
                                   f"time ({type(err).__name__}: {err}){fix}") from None
    inputs = getattr(spec, "input", None)
    if inputs is not None and inputs not in AGGREGATOR_INPUTS:
        raise PluginClashError(f"{who}: input must be one of {', '.join(AGGREGATOR_INPUTS)}, got {inputs!r}{fix}")


def unknown_key_error(where: str, key: Any, valid: Iterable[str]) -> ConfigError:
    """The one error for a misspelt key: names it, suggests the closest valid key and lists them all."""
    valid = list(valid)
    hint = difflib.get_close_matches(str(key), valid, n=1)
    did_you_mean = f" Did you mean {hint[0]!r}?" if hint else ""
    return ConfigError(f"{where}: unknown key {key!r}.{did_you_mean} Valid keys: {', '.join(valid)}")


def check_keys(block: Mapping[str, Any], valid: Iterable[str], where: str) -> None:
    """Raise :func:`unknown_key_error` for the first key of ``block`` that is not in ``valid``."""
    valid = list(valid)
    for key in block:
        if key not in valid:
            raise unknown_key_error(where, key, valid)


def parse_section(cls: type[T], block: Any, where: str) -> T:
    """Validate a recipe section (or a strategy's parameters) against the dataclass ``cls`` and build it.

    Every section parser goes through here, so an unknown key, a value of the wrong type and a value the dataclass
    refuses (``__post_init__`` raising ``ValueError``) give the same one-line :class:`ConfigError` everywhere.
    """
    if isinstance(block, cls):
        return block
    block = _to_plain(block)
    if block is None:
        block = {}
    if not isinstance(block, dict):
        raise ConfigError(f"{where} must be a mapping of settings, got {block!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    check_keys(block, fields, where)
    hints = typing.get_type_hints(cls)
    for key, value in block.items():
        if not _matches(value, hints.get(key, Any)):
            hint = " (a YAML list, e.g. [6, 4])" if _type_name(hints[key]).startswith("list") else ""
            raise ConfigError(f"{where}: key {key!r} = {value!r} is not of type {_type_name(hints[key])}{hint}")
    try:
        return cls(**block)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None


def validate_params(spec: StrategySpec, block: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check ``block``'s keys and value types against ``spec.params``; return all parameters with defaults."""
    if spec.params is None:
        if block:
            raise ConfigError(f"{where} takes no parameters; remove {', '.join(sorted(block))}")
        return {}
    params = parse_section(spec.params, dict(block), where)
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(spec.params) if f.init}


def _to_plain(cfg: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return cfg
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def _matches(value: Any, tp: Any) -> bool:
    """A small structural type check for config values (ints are accepted where floats are expected)."""
    if tp is Any or tp is object:
        return True
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        item = args[0] if args else Any
        return all(_matches(v, item) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")
