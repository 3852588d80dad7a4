"""The README's results: data distillation and knowledge distillation on the real MNIST digits, over seeds.

    python benchmarks/distillation_results.py                 # seeds 0 1 2, both recipes
    python benchmarks/distillation_results.py --seeds 0 1 2 3 4 --only dd --plain   # beside the plain script
    python benchmarks/distillation_results.py --seeds 0 --only kd
    python benchmarks/distillation_results.py --only dd --set rounds=2    # any recipe override

Each (recipe, seed) is one ``ddkit run`` into ``runs/<recipe>/seed<k>`` (finished stages are skipped on a re-run,
and their time is the one the stage took when it ran; the plain script's output is kept in
``runs/plain_mnist_*/seed<k>.json`` and re-used the same way); this script reads their ``results.json`` and prints mean
+- standard deviation over the seeds. ``--plain`` also runs the plain-PyTorch script a user would write instead
(``benchmarks/plain_mnist_dd.py`` / ``plain_mnist_kd.py``) on the same split and seeds, and prints both side by side
with the time per seed. For data distillation it also says how much of a seed's "gap closed" is test-set noise: its
spread over 1,000 bootstrap resamples of the 1,000 test digits (the models fixed; see ``bootstrap_gap_sd``), and how many of the student's and the fully labeled model's
test mistakes the teacher makes too (``overlap``).
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # plain_mnist_dd's split, for the test digits of a seed
RECIPES = {"dd": "configs/mnist_dd.yaml", "kd": "configs/mnist_kd.yaml"}
PLAIN = {"dd": "benchmarks/plain_mnist_dd.py", "kd": "benchmarks/plain_mnist_kd.py"}


def run(recipe: str, seed: int, overrides: list[str]) -> dict:
    out = REPO / "runs" / Path(recipe).stem / f"seed{seed}"
    cmd = [sys.executable, "-m", "ddkit", "run", recipe, f"run.seed={seed}", f"run.out_dir={out}", *overrides,
           "--no-progress"]
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    result = json.loads((out / "results.json").read_text())
    rows = {r["stage"] for r in result["rows"]}  # the stages of this recipe (not those of a run with other rounds)
    planned = rows | {f"{p}{r[len('student'):]}" for r in rows if r.startswith("student") for p in ("label", "select")}
    stages = [json.loads(p.read_text()) for p in sorted(out.glob("*/stage.json"))]
    stages = [s for s in stages if s["stage"] in planned]
    result["stage_seconds"] = {s["stage"]: s["result"].get("seconds", 0.0) for s in stages}
    result["seconds"] = sum(result["stage_seconds"].values())
    result["models"] = {s["stage"]: s["result"]["model"] for s in stages if "model" in s["result"]}
    return result


@functools.cache
def recipe_split(key: str) -> list[float]:
    """The recipe's ``data.split`` fractions ``[labeled, unlabeled, test]`` (read once)."""
    from ddkit.config import load_config

    split = load_config(REPO / RECIPES[key]).data.split
    return [float(split.get(k, 0.0)) for k in ("labeled", "unlabeled", "test")]


def run_plain(key: str, seed: int) -> dict:
    """The plain script's JSON line for ``seed``, kept in ``runs/plain_<script>/seed<k>.json`` (re-used if there, on
    the recipe's split, with the per-digit mistakes, which older versions of the scripts did not record)."""
    saved = REPO / "runs" / f"{Path(PLAIN[key]).stem}" / f"seed{seed}.json"
    old = json.loads(saved.read_text()) if saved.is_file() else {}
    if "wrong" not in old or old.get("split") != recipe_split(key):
        out = subprocess.run([sys.executable, PLAIN[key], "--seed", str(seed)], cwd=REPO, check=True,
                             capture_output=True, text=True).stdout
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(out.strip().splitlines()[-1])
    return json.loads(saved.read_text())


def mean_sd(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} +- {statistics.stdev(values):.{digits}f}"


def table(results: list[dict], extra: str | None) -> str:
    stages = [r["stage"] for r in results[0]["rows"]]
    names = {r["stage"]: r["model"] for r in results[0]["rows"]}
    lines = ["| model | test error % (mean +- sd) | per seed |", "|---|---:|---|"]
    for stage in stages:
        errs = [next(r["error %"] for r in res["rows"] if r["stage"] == stage) for res in results]
        lines.append(f"| {names[stage]} | {mean_sd(errs)} | {', '.join(f'{e:.2f}' for e in errs)} |")
    if extra == "gap_closed":
        gaps = [100 * res.get("gap_closed", float("nan")) for res in results]
        lines.append(f"\nShare of the baseline -> fully labeled gap closed: {mean_sd(gaps)} % "
                     f"(per seed: {', '.join(f'{g:.0f}' for g in gaps)}; min {min(gaps):.0f})")
    elif extra == "kd":
        for stage in results[0].get("kd_relative_error_reduction", {}):
            reds = [100 * res["kd_relative_error_reduction"][stage] for res in results]
            lines.append(f"\n{stage}: relative error reduction over the student alone {mean_sd(reds)} % "
                         f"(per seed: {', '.join(f'{g:.0f}' for g in reds)})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ --plain
def error_of(res: dict, stage: str) -> float:
    return next(r["error %"] for r in res["rows"] if r["stage"] == stage)


def final_student(res: dict) -> str:
    """The stage of the run's last-round student (the one its gap closed is about)."""
    return [r["stage"] for r in res["rows"] if r["stage"].startswith("student")][-1]


def bootstrap_gap_sd(wrong: dict[str, torch.Tensor], resamples: int = 1000) -> float:
    """The spread (points of %) of ``(base - student) / (base - full)`` over bootstrap resamples of the test images,
    from each model's ``[N]`` bool mistakes (``teacher``, ``student``, ``full``), the models fixed: half the width
    of the central 68 % (the sd of a normal; robust to the resamples where ``base - full`` nears 0)."""
    g = torch.Generator().manual_seed(0)
    n = len(wrong["teacher"])
    idx = torch.randint(n, (resamples, n), generator=g)
    b, s, f = (wrong[k].float()[idx].mean(1) for k in ("teacher", "student", "full"))
    gap = (b - s) / (b - f)
    lo, hi = torch.quantile(gap[torch.isfinite(gap)].double(), torch.tensor([0.16, 0.84], dtype=torch.float64))
    return 100 * float(hi - lo) / 2


def model_mistakes(res: dict, stages: dict[str, str], fractions: list[float], seed: int) -> dict[str, torch.Tensor]:
    """``{key: [N] bool}``: the mistakes of the run's model of each stage on the test digits (the last part) of
    ``seed``'s split into ``fractions`` (the recipe's); each must give the error the run recorded."""
    from plain_mnist_dd import load_digits

    from ddkit.engine.checkpoint import load_model

    x, y, parts = load_digits(fractions, seed)
    out = {}
    for key, stage in stages.items():
        _, model, _ = load_model(res["models"][stage])
        with torch.no_grad():
            out[key] = model(x[parts[-1]]).argmax(1) != y[parts[-1]]
        if abs(100 * out[key].float().mean().item() - error_of(res, stage)) > 0.05:
            raise RuntimeError(f"{stage} of seed {seed}: its error on these test digits differs from the run's; "
                               f"the split {fractions} is not the recipe's")
    return out


def ddkit_mistakes(res: dict, seed: int) -> dict[str, torch.Tensor]:
    """Each ddkit model's mistakes on the test digits of ``seed``'s split."""
    stages = {"teacher": "teacher", "student": final_student(res), "full": "baseline_full"}
    return model_mistakes(res, stages, recipe_split("dd"), seed)


def cut_noise(alone: torch.Tensor, kd: torch.Tensor) -> float:
    """The test noise (points) of the relative cut ``(alone - kd) / alone``: the share of the gap to zero error."""
    return bootstrap_gap_sd({"teacher": alone, "student": kd, "full": torch.zeros_like(alone)})


def shared_with_teacher(wrong: dict[str, torch.Tensor], model: str) -> str:
    """``"a/b"``: how many of ``model``'s ``b`` test mistakes the teacher makes too. For the student this measures
    self-training's confirmation bias (it fixes some of the teacher's mistakes but learns little the teacher does
    not know); the fully labeled model is the reference."""
    mistakes = wrong[model].bool()
    return f"{int((mistakes & wrong['teacher'].bool()).sum())}/{int(mistakes.sum())}"


def overlap(wrong: dict[str, torch.Tensor]) -> str:
    return f"{shared_with_teacher(wrong, 'student')} ({shared_with_teacher(wrong, 'full')})"


def dd_side_by_side(seeds: list[int], ours: list[dict], plain: list[dict]) -> str:
    lines = ["| seed | teacher % | student % | fully labeled % | gap closed % (test noise +-) | student's "
             "(fully labeled's) mistakes the teacher's too | pseudo-labels kept (right %) | time s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    gaps: dict[str, list[float]] = {"ddkit": [], "plain": []}
    for seed, res, p in zip(seeds, ours, plain):
        final = final_student(res)
        q = ((res.get("pseudo_label_quality") or {}).get("ensemble") or {})
        wrong = ddkit_mistakes(res, seed)
        noise = bootstrap_gap_sd(wrong)
        gaps["ddkit"].append(100 * res.get("gap_closed", float("nan")))  # absent: no gap (ddkit warns)
        gaps["plain"].append(100 * p["gap_closed"])
        lines.append(f"| {seed} ddkit | {error_of(res, 'teacher'):.1f} | {error_of(res, final):.1f} | "
                     f"{error_of(res, 'baseline_full'):.1f} | {gaps['ddkit'][-1]:.0f} ({noise:.0f}) | "
                     f"{overlap(wrong)} | "
                     f"{q.get('selected', '?')} ({100 * q.get('selected_accuracy', float('nan')):.1f}) | "
                     f"{res['seconds']:.0f} |")
        pwrong = {k: torch.tensor(p["wrong"][k]) for k in ("teacher", "student", "full")}
        pnoise = bootstrap_gap_sd(pwrong)
        lines.append(f"| {seed} plain | {p['teacher']:.1f} | {p['student']:.1f} | {p['full']:.1f} | "
                     f"{100 * p['gap_closed']:.0f} ({pnoise:.0f}) | {overlap(pwrong)} | "
                     f"{p['kept']} ({p['pseudo_accuracy']:.1f}) | "
                     f"{p['seconds_with_upper_bound']:.0f} |")
    for name, g in gaps.items():
        lines.append(f"\n{name}: gap closed {mean_sd(g, 0)} %, min {min(g):.0f} %")
    ratio = statistics.mean(r["seconds"] for r in ours) / statistics.mean(p["seconds_with_upper_bound"]
                                                                           for p in plain)
    lines.append(f"\nddkit time / plain script time (same iterations, upper bound included): {ratio:.2f}x")
    return "\n".join(lines)


def kd_side_by_side(seeds: list[int], ours: list[dict], plain: list[dict]) -> str:
    lines = ["| seed | teacher % | student alone % | + soft targets % | relative cut % (test noise +-) | KD time s |",
             "|---|---:|---:|---:|---:|---:|"]
    for seed, res, p in zip(seeds, ours, plain):
        kd = error_of(res, "kd_soft_target")
        alone = error_of(res, "kd_alone")
        wrong = model_mistakes(res, {"alone": "kd_alone", "kd": "kd_soft_target"}, recipe_split("kd"), seed)
        lines.append(f"| {seed} ddkit | {error_of(res, 'teacher'):.1f} | {alone:.1f} | {kd:.1f} | "
                     f"{100 * (alone - kd) / alone:.0f} ({cut_noise(wrong['alone'], wrong['kd']):.0f}) | "
                     f"{res['stage_seconds']['kd_soft_target']:.0f} |")
        pnoise = cut_noise(*(torch.tensor(p["wrong"][k]) for k in ("alone", "kd")))
        lines.append(f"| {seed} plain | {p['teacher']:.1f} | {p['alone']:.1f} | {p['kd']:.1f} | "
                     f"{100 * p['relative_error_reduction']:.0f} ({pnoise:.0f}) | {p['seconds_kd']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", choices=sorted(RECIPES))
    parser.add_argument("--plain", action="store_true", help="also run the plain-PyTorch script on the same seeds")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="recipe overrides for every run")
    args = parser.parse_args()
    for key, recipe in RECIPES.items():
        if args.only and key != args.only:
            continue
        results = [run(recipe, s, args.set) for s in args.seeds]
        print(f"\n## {recipe} (real MNIST digits, seeds {args.seeds})\n")
        print(table(results, "gap_closed" if key == "dd" else "kd"))
        if args.plain:
            plain = [run_plain(key, s) for s in args.seeds]
            print(f"\n## ddkit vs the plain script ({PLAIN[key]}), same split and seeds\n")
            print((dd_side_by_side if key == "dd" else kd_side_by_side)(args.seeds, results, plain))


if __name__ == "__main__":
    main()
