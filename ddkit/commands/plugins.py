"""``ddkit plugins``: every registered strategy by kind, with its provider and summary."""
from __future__ import annotations

import argparse
import json

from ddkit.plugin_manager import get_registry
from ddkit.types import KINDS

HELP = "list every registered strategy by kind, with the package that provides it"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--kind", choices=KINDS, help="only this kind")


def run(args: argparse.Namespace) -> int:
    registry = get_registry()
    kinds = [args.kind] if args.kind else list(KINDS)
    if args.json:
        rows = [{"kind": e.spec.kind, "name": e.spec.name, "provider": e.provider, "plugin": e.plugin,
                 "summary": e.spec.summary,
                 "params": [] if e.spec.params is None else list(e.spec.params.__dataclass_fields__)}
                for kind in kinds for e in registry.entries(kind)]
        print(json.dumps(rows, indent=1))
        return 0
    for kind in kinds:
        entries = registry.entries(kind)
        print(f"{kind} ({len(entries)})")
        width = max((len(e.spec.name) for e in entries), default=0)
        for e in entries:
            print(f"  {e.spec.name:<{width}}  [{e.provider}]  {e.spec.summary}")
    return 0
