"""ddkit: plugin-based data distillation and knowledge distillation for PyTorch."""
from importlib.metadata import PackageNotFoundError, version

from ddkit.errors import ConfigError, DataError, DDKitError, PluginClashError, PluginError, UnknownStrategyError
from ddkit.hookspecs import hookimpl
from ddkit.plugin_manager import build, get_registry
from ddkit.types import DatasetInfo, Instances

try:
    __version__ = version("ddkit")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["hookimpl", "build", "get_registry", "Instances", "DatasetInfo", "DDKitError", "ConfigError",
           "DataError", "PluginClashError", "PluginError", "UnknownStrategyError", "__version__"]
