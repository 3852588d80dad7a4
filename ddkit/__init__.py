"""ddkit: plugin-based data distillation and knowledge distillation for PyTorch.

The names that need torch (``Instances``, ``build``, ``hookimpl`` ...) load on first use, so that ``ddkit --help``
and ``ddkit --version`` answer without importing torch."""
from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from ddkit.errors import ConfigError, DataError, DDKitError, PluginClashError, PluginError, UnknownStrategyError

if TYPE_CHECKING:
    from ddkit.hookspecs import hookimpl
    from ddkit.plugin_manager import build, get_registry
    from ddkit.types import DatasetInfo, Instances

try:
    __version__ = version("ddkit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

_LAZY = {"hookimpl": "ddkit.hookspecs", "build": "ddkit.plugin_manager", "get_registry": "ddkit.plugin_manager",
         "Instances": "ddkit.types", "DatasetInfo": "ddkit.types"}

__all__ = ["hookimpl", "build", "get_registry", "Instances", "DatasetInfo", "DDKitError", "ConfigError",
           "DataError", "PluginClashError", "PluginError", "UnknownStrategyError", "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'ddkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # looked up once
    return value
