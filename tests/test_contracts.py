"""The generic contract, run over every registered strategy of every kind (builtin or installed)."""
from __future__ import annotations

import pytest

from ddkit.testing import check_spec, registered
from ddkit.types import KINDS

ALL = [entry for kind in KINDS for entry in registered(kind)]


@pytest.mark.parametrize("entry", ALL, ids=lambda e: f"{e.spec.kind}-{e.spec.name}")
def test_spec_contract(entry):
    check_spec(entry)


def test_every_hook_is_documented_and_used_by_a_builtin():
    """As datasette does: each hookspec has a docstring and at least one builtin implementation."""
    from ddkit import hookspecs

    for kind, hook in hookspecs.HOOK_OF_KIND.items():
        assert getattr(hookspecs, hook).__doc__, f"{hook} has no docstring"
        assert registered(kind), f"no builtin implements {hook}"
