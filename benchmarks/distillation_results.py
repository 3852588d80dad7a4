"""The README's results: data distillation and knowledge distillation on the real MNIST digits, over seeds.

    python benchmarks/distillation_results.py                 # seeds 0 1 2, both recipes
    python benchmarks/distillation_results.py --seeds 0 --only kd
    python benchmarks/distillation_results.py --only dd --set run.device=cuda    # any recipe override

Each (recipe, seed) is one ``ddkit run`` into ``runs/<recipe>/seed<k>`` (finished stages are skipped on a re-run);
this script only reads their ``results.json`` and prints mean +- standard deviation over the seeds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"dd": "configs/mnist_dd.yaml", "kd": "configs/mnist_kd.yaml"}


def run(recipe: str, seed: int, overrides: list[str]) -> dict:
    out = REPO / "runs" / Path(recipe).stem / f"seed{seed}"
    cmd = [sys.executable, "-m", "ddkit", "run", recipe, f"run.seed={seed}", f"run.out_dir={out}", *overrides,
           "--no-progress"]
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "results.json").read_text())


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"


def table(results: list[dict], extra: str | None) -> str:
    stages = [r["stage"] for r in results[0]["rows"]]
    names = {r["stage"]: r["model"] for r in results[0]["rows"]}
    lines = ["| model | test error % (mean +- sd) | per seed |", "|---|---:|---|"]
    for stage in stages:
        errs = [next(r["error %"] for r in res["rows"] if r["stage"] == stage) for res in results]
        lines.append(f"| {names[stage]} | {mean_sd(errs)} | {', '.join(f'{e:.2f}' for e in errs)} |")
    if extra == "gap_closed":
        gaps = [100 * res["gap_closed"] for res in results]
        lines.append(f"\nShare of the baseline -> fully labeled gap closed: {mean_sd(gaps)} % "
                     f"(per seed: {', '.join(f'{g:.0f}' for g in gaps)})")
    elif extra == "kd":
        for stage in results[0].get("kd_relative_error_reduction", {}):
            reds = [100 * res["kd_relative_error_reduction"][stage] for res in results]
            lines.append(f"\n{stage}: relative error reduction over the student alone {mean_sd(reds)} % "
                         f"(per seed: {', '.join(f'{g:.0f}' for g in reds)})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", choices=sorted(RECIPES))
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="recipe overrides for every run")
    args = parser.parse_args()
    for key, recipe in RECIPES.items():
        if args.only and key != args.only:
            continue
        results = [run(recipe, s, args.set) for s in args.seeds]
        print(f"\n## {recipe} (real MNIST digits, seeds {args.seeds})\n")
        print(table(results, "gap_closed" if key == "dd" else "kd"))


if __name__ == "__main__":
    main()
