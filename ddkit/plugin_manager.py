"""The pluggy plugin manager: builtins and third-party packages both arrive through the entry-point group ``ddkit``.

``DDKIT_DISABLE_PLUGINS=a,b`` blocks plugins by entry-point name before they are loaded.
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
from typing import Any, Iterable

import pluggy

from ddkit import hookspecs
from ddkit.errors import PluginClashError
from ddkit.registry import Entry, Registry
from ddkit.types import SPEC_TYPES

ENTRY_POINT_GROUP = "ddkit"
DISABLE_ENV = "DDKIT_DISABLE_PLUGINS"

_registry: Registry | None = None


def disabled_plugins() -> list[str]:
    return [n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()]


def make_plugin_manager(extra_plugins: Iterable[Any] = (), load_entry_points: bool = True) -> pluggy.PluginManager:
    """A plugin manager with ddkit's hook specs, the installed entry-point plugins and ``extra_plugins``."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    known = sorted({ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)})
    for name in disabled_plugins():
        if load_entry_points and name not in known:  # a typo would silently disable nothing
            logging.getLogger("ddkit").warning("%s: no plugin named %r; installed plugins: %s", DISABLE_ENV, name,
                                               ", ".join(known))
        pm.set_blocked(name)
    if load_entry_points:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for plugin in extra_plugins:
        pm.register(plugin)
    return pm


def registry_from_plugin_manager(pm: pluggy.PluginManager) -> Registry:
    """Call every registration hook of every plugin and put the specs into one table."""
    providers = {id(plugin): dist.project_name for plugin, dist in pm.list_plugin_distinfo()}
    registry = Registry()
    for kind, hook_name in hookspecs.HOOK_OF_KIND.items():
        spec_type = SPEC_TYPES[kind]
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            plugin_name = impl.plugin_name
            provider = providers.get(id(impl.plugin), plugin_name)
            for spec in impl.function() or ():
                if not isinstance(spec, spec_type):
                    raise PluginClashError(f"Plugin {plugin_name!r} ({provider}): {hook_name} must yield "
                                           f"{spec_type.__name__}, got {type(spec).__name__}")
                registry.add(Entry(spec=spec, provider=provider, plugin=plugin_name))
    return registry


def get_registry(refresh: bool = False) -> Registry:
    """The process-wide registry of installed plugins (built once, rebuilt with ``refresh=True``)."""
    global _registry
    if _registry is None or refresh:
        _registry = registry_from_plugin_manager(make_plugin_manager())
    return _registry


def build(kind: str, cfg: Any, where: str = "", **runtime: Any) -> Any:
    """Build the strategy a config block names, from the installed plugins. See :meth:`Registry.build`."""
    return get_registry().build(kind, cfg, where=where, **runtime)
