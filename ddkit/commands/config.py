"""``ddkit config show RECIPE [key=value ...] [--defaults]``: print the resolved, validated recipe."""
from __future__ import annotations

import argparse

HELP = "show a recipe resolved with its defaults and overrides, after validation"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = actions.add_parser("show", help=HELP)
    show.add_argument("recipe", help="a YAML recipe, e.g. configs/mnist_dd.yaml")
    show.add_argument("overrides", nargs="*", help="key=value overrides (OmegaConf dotlist), e.g. run.seed=1")
    show.add_argument("--defaults", action="store_true",
                      help="write out every default (strategy parameters, run and train blocks)")


def run(args: argparse.Namespace) -> int:
    from ddkit import plugin_manager
    from ddkit.config import to_yaml
    from ddkit.engine.recipe import load_recipe, with_defaults

    registry = plugin_manager.get_registry()  # looked up per call: a test may swap the registry
    cfg = load_recipe(args.recipe, args.overrides, registry)
    print(to_yaml(with_defaults(cfg, registry) if args.defaults else cfg), end="")
    return 0
