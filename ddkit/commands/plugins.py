"""``ddkit plugins``: every registered strategy by kind, with its provider and summary. A broken plugin (fails to
import, its hook raises) does not hide the others: it is listed under ``broken`` with its one-line reason, and the
command exits 2, since a recipe would stop on it."""
from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

from ddkit.strategy_kinds import KINDS

HELP = "list every registered strategy by kind, with the package that provides it"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--kind", choices=KINDS, help="only this kind")


def run(args: argparse.Namespace) -> int:
    from ddkit.plugin_manager import make_plugin_manager, registry_from_plugin_manager

    broken: dict[str, str] = {}
    registry = registry_from_plugin_manager(make_plugin_manager(broken=broken), broken=broken)
    kinds = [args.kind] if args.kind else list(KINDS)
    if args.json:
        rows = [{"kind": e.spec.kind, "name": e.spec.name, "provider": e.provider, "plugin": e.plugin,
                 "summary": e.spec.summary,
                 "params": [] if e.spec.params is None else list(e.spec.params.__dataclass_fields__)}
                for kind in kinds for e in registry.entries(kind)]
        print(json.dumps(rows, indent=1))
        _print_broken(broken, sys.stderr)
        return 2 if broken else 0
    for kind in kinds:
        entries = registry.entries(kind)
        print(f"{kind} ({len(entries)})")
        width = max((len(e.spec.name) for e in entries), default=0)
        for e in entries:
            print(f"  {e.spec.name:<{width}}  [{e.provider}]  {e.spec.summary}")
    _print_broken(broken, sys.stdout)
    return 2 if broken else 0


def _print_broken(broken: dict[str, str], stream: TextIO) -> None:
    if broken:
        print(f"broken plugins ({len(broken)})", file=stream)
        for reason in broken.values():
            print(f"  {reason}", file=stream)
