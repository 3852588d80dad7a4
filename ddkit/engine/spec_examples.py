"""Config blocks a registered strategy can be built with, without the user's input (its spec's examples or its
defaults): ``ddkit bench`` grids and the contract tests of ``ddkit.testing`` use the same rule."""
from __future__ import annotations

import dataclasses
from typing import Any


def all_defaults(params: type | None) -> bool:
    """Whether every init field of the params dataclass has a default (``None``: no parameters)."""
    if params is None:
        return True
    return all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
               for f in dataclasses.fields(params) if f.init)


def example_blocks(entry: Any) -> list[dict[str, Any]]:
    """Config blocks to build the strategy with: its spec's examples, or ``{}`` when every param has a default."""
    blocks = [dict(b) for b in entry.spec.examples]
    if not blocks and all_defaults(entry.spec.params):
        blocks = [{}]
    return blocks
