"""The pluggy plugin manager: builtins and third-party packages both arrive through the entry-point group ``ddkit``.

``DDKIT_DISABLE_PLUGINS=a,b`` blocks plugins by entry-point name before they are loaded.

A broken plugin (its module fails to import, a hook raises or yields something else than specs, a hook name is
misspelt) raises one :class:`PluginError` line naming the entry point, its distribution and the fix; a caller that
lists plugins passes a ``broken`` dict instead, which collects those lines and skips the plugin.
"""
from __future__ import annotations

import difflib
import importlib.metadata
import logging
import os
from typing import Any, Iterable

import pluggy

from ddkit import hookspecs
from ddkit.errors import PluginClashError, PluginError
from ddkit.registry import Entry, Registry, check_spec_fields
from ddkit.types import SPEC_TYPES, StrategySpec

ENTRY_POINT_GROUP = "ddkit"
DISABLE_ENV = "DDKIT_DISABLE_PLUGINS"

_registry: Registry | None = None


def disabled_plugins() -> list[str]:
    return [n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()]


def _fix(plugin: str) -> str:
    return f"fix or uninstall it, or set {DISABLE_ENV}={plugin}"


def _distribution(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"distribution {dist.name} {dist.version}" if dist is not None else "unknown distribution"


def _report(err: PluginError, plugin: str, broken: dict[str, str] | None) -> None:
    """Raise ``err``, or (when the caller collects broken plugins) record it under the plugin's name."""
    if broken is None:
        raise err
    broken[plugin] = str(err)


def make_plugin_manager(extra_plugins: Iterable[Any] = (), load_entry_points: bool = True,
                        broken: dict[str, str] | None = None) -> pluggy.PluginManager:
    """A plugin manager with ddkit's hook specs, the installed entry-point plugins and ``extra_plugins``.

    An entry point that fails to import raises :class:`PluginError`, or with ``broken`` given is recorded there
    (name -> one-line reason) and blocked, so the other plugins still load."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    known = sorted({ep.name for ep in entry_points})
    for name in disabled_plugins():
        if load_entry_points and name not in known:  # a typo would silently disable nothing
            logging.getLogger("ddkit").warning("%s: no plugin named %r; installed plugins: %s", DISABLE_ENV, name,
                                               ", ".join(known))
        pm.set_blocked(name)
    if load_entry_points:
        _import_entry_points(pm, entry_points, broken)
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)  # registers them with their distribution (providers)
    for plugin in extra_plugins:
        pm.register(plugin)
    return pm


def _import_entry_points(pm: pluggy.PluginManager, entry_points: Iterable[importlib.metadata.EntryPoint],
                         broken: dict[str, str] | None) -> None:
    """Import every entry point that is not blocked, one by one, so that a failure names its plugin (pluggy's
    ``load_setuptools_entrypoints`` then finds the modules already imported)."""
    for ep in entry_points:
        if pm.is_blocked(ep.name):
            continue
        try:
            ep.load()
        except Exception as exc:  # any error of a third-party module's import
            err = PluginError(f"plugin entry point {ep.name!r} ({_distribution(ep)}) failed to import: "
                              f"{type(exc).__name__}: {exc}; {_fix(ep.name)}")
            _report(err, ep.name, broken)
            pm.set_blocked(ep.name)


def registry_from_plugin_manager(pm: pluggy.PluginManager, broken: dict[str, str] | None = None) -> Registry:
    """Call every registration hook of every plugin and put the specs into one table.

    A hook that raises, returns a non-iterable or yields another type than its kind's spec, and a hook whose name
    is not a ddkit hook, raise :class:`PluginError`; with ``broken`` given they are recorded there and skipped."""
    providers = {id(plugin): dist.project_name for plugin, dist in pm.list_plugin_distinfo()}
    _check_hook_names(pm, providers, broken)
    registry = Registry()
    for kind, hook_name in hookspecs.HOOK_OF_KIND.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            provider = providers.get(id(impl.plugin), impl.plugin_name)
            if impl.plugin_name in (broken or {}):
                continue
            try:
                specs = _hook_specs(impl, kind, hook_name, provider)
            except PluginError as err:
                _report(err, impl.plugin_name, broken)
                continue
            for spec in specs:
                registry.add(Entry(spec=spec, provider=provider, plugin=impl.plugin_name))
    return registry


def _hook_specs(impl: Any, kind: str, hook_name: str, provider: str) -> list[StrategySpec]:
    """The specs one plugin's registration hook yields, checked: one :class:`PluginError` line if it raises,
    returns a non-iterable or yields another type than ``kind``'s spec."""
    where = f"plugin {impl.plugin_name!r} ({provider}): {hook_name}"
    spec_type = SPEC_TYPES[kind]
    try:
        result = impl.function()
        specs = list(result) if isinstance(result, Iterable) else result
    except Exception as exc:  # the plugin's own code raised
        raise PluginError(f"{where} raised {type(exc).__name__}: {exc}; {_fix(impl.plugin_name)}") from None
    if specs is None:
        return []
    if not isinstance(specs, list):
        raise PluginError(f"{where} must yield {spec_type.__name__} objects (or return a list of them), got a "
                          f"single {type(specs).__name__}; {_fix(impl.plugin_name)}")
    for spec in specs:
        if not isinstance(spec, spec_type):
            raise PluginClashError(f"Plugin {impl.plugin_name!r} ({provider}): {hook_name} must yield "
                                   f"{spec_type.__name__}, got {type(spec).__name__}")
        check_spec_fields(Entry(spec=spec, provider=provider, plugin=impl.plugin_name))
    return specs


def _check_hook_names(pm: pluggy.PluginManager, providers: dict[int, str], broken: dict[str, str] | None) -> None:
    """pluggy's ``check_pending`` as one line: a ``@hookimpl`` whose name is not a ddkit hook (``ddkit_aggregator``
    for ``ddkit_aggregators``) would otherwise register nothing, silently."""
    valid = sorted(hookspecs.HOOK_OF_KIND.values())
    for name, caller in vars(pm.hook).items():
        if name.startswith("_") or caller.has_spec():
            continue
        for impl in caller.get_hookimpls():
            if impl.optionalhook:
                continue
            hint = difflib.get_close_matches(name, valid, n=1)
            did_you_mean = f" Did you mean {hint[0]!r}?" if hint else ""
            provider = providers.get(id(impl.plugin), impl.plugin_name)
            _report(PluginError(f"plugin {impl.plugin_name!r} ({provider}) implements an unknown hook {name!r}."
                                f"{did_you_mean} Valid hooks: {', '.join(valid)}; {_fix(impl.plugin_name)}"),
                    impl.plugin_name, broken)
    if broken is None:
        pm.check_pending()  # nothing left that pluggy would refuse


def get_registry(refresh: bool = False) -> Registry:
    """The process-wide registry of installed plugins (built once, rebuilt with ``refresh=True``)."""
    global _registry
    if _registry is None or refresh:
        _registry = registry_from_plugin_manager(make_plugin_manager())
    return _registry


def build(kind: str, cfg: Any, where: str = "", **runtime: Any) -> Any:
    """Build the strategy a config block names, from the installed plugins. See :meth:`Registry.build`."""
    return get_registry().build(kind, cfg, where=where, **runtime)
