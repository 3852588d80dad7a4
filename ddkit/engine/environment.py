"""What a run ran on, saved as ``environment.json`` beside its ``config.yaml``.

The same recipe and seed give other digits under another torch build, thread count or CPU instruction set (oneDNN's
AVX-512 kernels round otherwise than its AVX2 ones), and a strategy's result depends on the plugin release that
supplied it. This file records those: the Python and package versions (ddkit's and each plugin distribution's own
version and run-time requirements), which distribution supplied each strategy the recipe names, the devices, the
CPU kernels torch picked, the thread count and the environment variables that change the arithmetic.
"""
from __future__ import annotations

import os
import platform
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import torch

from ddkit.config import STRATEGY_SLOTS
from ddkit.errors import ConfigError
from ddkit.io import atomic_write_json

__all__ = ["describe_environment", "save_environment"]

# variables that change which kernels run or how many threads share the work (hence the rounding)
NUMERIC_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA",
               "MKL_ENABLE_INSTRUCTIONS", "CUBLAS_WORKSPACE_CONFIG", "CUDA_VISIBLE_DEVICES", "DDKIT_DISABLE_PLUGINS")


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _runtime_requirements(distribution: str) -> list[str]:
    """The names of ``distribution``'s requirements that are not extras (``torch``, ``pycocotools``, ...)."""
    try:
        requires = metadata.requires(distribution) or []
    except metadata.PackageNotFoundError:
        return []
    return [re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0] for r in requires if "extra ==" not in r]


def _used(node: Any, kind: str | None = None) -> Iterator[tuple[str, str]]:
    """``(kind, name)`` of every strategy block of the recipe, by the slot that holds it (``model:``, ``dataset:``,
    ``losses:`` ...: :data:`ddkit.config.STRATEGY_SLOTS`), so a model and a dataset of one name stay apart."""
    if isinstance(node, dict):
        if kind is not None and isinstance(node.get("name"), str):
            yield kind, node["name"]
        for key, value in node.items():
            yield from _used(value, STRATEGY_SLOTS.get(key))
    elif isinstance(node, list):
        for value in node:
            yield from _used(value, kind)
    elif kind is not None and isinstance(node, str):  # a bare name (task: detection)
        yield kind, node


def _strategies(recipe: Any, registry: Any) -> dict[str, str]:
    """``{"<kind>.<name>": "<distribution> <version>"}`` for each strategy the recipe names."""
    out = {}
    for kind, name in set(_used(recipe)):
        try:
            provider = registry.get(kind, name).provider
        except ConfigError:  # not registered: the recipe check has refused it already
            continue
        version = _version(provider)
        out[f"{kind}.{name}"] = provider + (f" {version}" if version else "")
    return dict(sorted(out.items()))


def _devices() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "cuda": torch.version.cuda, "cuda_devices": [torch.cuda.get_device_name(i)
                                                         for i in range(torch.cuda.device_count())] if cuda else []}


def describe_environment(recipe: Any, registry: Any) -> dict[str, Any]:
    """The record of :mod:`this module <ddkit.engine.environment>` for a plain ``recipe`` (a dict)."""
    providers = sorted({e.provider for e in registry.entries()} | {"ddkit"})
    distributions = set(providers)
    for provider in providers:
        distributions.update(_runtime_requirements(provider))
    packages = {d: v for d in sorted(distributions, key=str.lower) if (v := _version(d)) is not None}
    return {"command": sys.argv, "cwd": os.getcwd(), "python": platform.python_version(),
            "platform": platform.platform(),
            "packages": packages, "strategies": _strategies(recipe, registry), "torch": _devices(),
            "env": {k: os.environ[k] for k in NUMERIC_ENV if k in os.environ}}


def save_environment(recipe: Any, registry: Any, folder: str | Path) -> Path:
    """Write ``folder/environment.json`` (atomically)."""
    return atomic_write_json(Path(folder) / "environment.json", describe_environment(recipe, registry))
