"""``ddkit bench RECIPE [key=value ...]``: benchmark every aggregator x selector on a split with known ground truth."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

HELP = "benchmark aggregators x selectors (AP, pseudo-label precision/recall, time) on a split with ground truth"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a YAML recipe with a 'bench' section, e.g. configs/bench_synthetic.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. bench.synthetic.num_images=20")


def run_dir_of(cfg, recipe: str) -> Path:
    run = cfg.get("run") or {}
    d = run.get("out_dir") if hasattr(run, "get") else None
    return Path(d) if d else Path("runs") / Path(recipe).stem


def run(args: argparse.Namespace) -> int:
    from ddkit.config import save_config
    from ddkit.engine.bench import bench_from_config, markdown_table
    from ddkit.engine.environment import save_environment
    from ddkit.engine.recipe import load_recipe
    from ddkit.plugin_manager import get_registry
    from ddkit.registry import _to_plain

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    registry = get_registry()
    cfg = load_recipe(args.recipe, args.overrides, registry)
    run_dir = run_dir_of(cfg, args.recipe)
    result, paths = bench_from_config(cfg, run_dir, source=args.recipe, registry=registry)
    save_config(cfg, run_dir / "bench", "config.yaml")  # after the inputs proved usable: a failed bench writes none
    save_environment(_to_plain(cfg), registry, run_dir / "bench")
    title = "bench" + (" (SYNTHETIC data)" if cfg.get("bench", {}).get("synthetic") is not None else "")
    print(f"## {title}: {result.num_images} images x {result.num_views} views, sorted by {result.sort_by}")
    print(markdown_table(result))
    for note in result.notes:
        print(f"note: {note}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
