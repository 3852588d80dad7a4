"""Contract checks and fixtures that plugin authors reuse (ddkit's own tests run them over every builtin).

Generic checks for any strategy live here; kind-specific ones in ``ddkit.testing.<kind>``. In a third-party
package's tests::

    import pytest
    from ddkit.testing import check_spec, registered, build_examples

    @pytest.mark.parametrize("entry", registered("aggregators"), ids=lambda e: e.spec.name)
    def test_contract(entry):
        check_spec(entry)
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

from ddkit.engine.spec_examples import all_defaults as _all_defaults  # noqa: F401 - re-exported
from ddkit.engine.spec_examples import example_blocks
from ddkit.errors import ConfigError
from ddkit.plugin_manager import get_registry
from ddkit.registry import Entry, Registry

NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def registered(kind: str, registry: Registry | None = None) -> list[Entry]:
    """Every registered strategy of ``kind``; use as ``pytest.mark.parametrize`` values."""
    return (registry or get_registry()).entries(kind)


def build_examples(entry: Entry, registry: Registry | None = None, **runtime: Any) -> list[Any]:
    """Build the strategy once per example block."""
    registry = registry or get_registry()
    return [registry.build(entry.spec.kind, {"name": entry.spec.name, **b}, **runtime) for b in example_blocks(entry)]


def check_spec(entry: Entry, registry: Registry | None = None) -> None:
    """The contract every spec of every kind meets: a usable name, a summary, a params dataclass whose keys are
    validated, and at least one example that builds."""
    spec = entry.spec
    registry = registry or get_registry()
    assert NAME_RE.match(spec.name), f"{spec.kind} name {spec.name!r} must be lower_snake_case"
    assert spec.summary and "\n" not in spec.summary, f"{spec.kind} {spec.name!r} needs a one-line summary"
    assert callable(spec.factory), f"{spec.kind} {spec.name!r}: factory is not callable"
    if spec.params is not None:
        assert dataclasses.is_dataclass(spec.params), f"{spec.kind} {spec.name!r}: params must be a dataclass"
    blocks = example_blocks(entry)
    assert blocks, (f"{spec.kind} {spec.name!r}: some params have no default, so the spec must give `examples` "
                    f"for the contract tests")
    for block in blocks:
        registry.params(spec.kind, {"name": spec.name, **block})
    try:
        registry.params(spec.kind, {"name": spec.name, **blocks[0], "no_such_key_xyz": 1})
    except ConfigError as err:
        assert "no_such_key_xyz" in str(err), f"the unknown-key error must name the key: {err}"
    else:  # pragma: no cover - the registry guarantees this
        raise AssertionError(f"{spec.kind} {spec.name!r} accepted an unknown key")
