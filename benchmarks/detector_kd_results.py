"""The README's detector-KD table: box AP of the student alone and with each KD variant over seeds, one teacher.

    python benchmarks/detector_kd_results.py                    # configs/synthetic_det_kd.yaml, seeds 0 1 2
    python benchmarks/detector_kd_results.py --recipe configs/synthetic_det_kd_onestage.yaml
    python benchmarks/detector_kd_results.py --parallel 2       # the seeds after 0 side by side, one thread each
    python benchmarks/detector_kd_results.py --teacher runs/det_kd_hard_teacher/teacher/model.pt \
        --recipe configs/synthetic_det_kd_hard.yaml          # every seed taught by a teacher trained beforehand
    python benchmarks/detector_kd_results.py --set student.train.iterations=300 --out runs/det_kd_300
                                                             # another schedule, in its own run folders

Seed 0 trains the teacher (``ddkit run`` into ``runs/<recipe>/seed0``, or ``<--out>/seed0``) unless ``--teacher``
names one; every other seed is taught by that teacher (``teacher.checkpoint``) on the same split, so the seeds vary
the students' initialisation and batches, not the teacher. Finished stages are skipped on a re-run (``ddkit run``'s
stage markers), so an interrupted table resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from distillation_results import mean_sd  # benchmarks/ is the script's folder, first on the path

REPO = Path(__file__).resolve().parents[1]


def run_root(recipe: str, out: str | None = None) -> Path:
    """The folder holding a table's ``seed<K>`` run folders: ``out``, else ``runs/<recipe's stem>``."""
    return (REPO / out) if out else REPO / "runs" / Path(recipe).stem


def command(recipe: str, seed: int, extra: list[str], teacher_path: str | None = None,
            out_root: str | None = None) -> list[str]:
    """``ddkit run`` of one seed into ``<run_root>/seed<seed>``; taught by ``teacher_path``, else by seed 0's teacher
    (seed 0 trains it)."""
    out = run_root(recipe, out_root) / f"seed{seed}"
    if teacher_path is None and seed != 0:
        teacher_path = str(out.parent / "seed0" / "teacher" / "model.pt")
    teacher = [f"teacher.checkpoint={teacher_path}"] if teacher_path else []
    return [sys.executable, "-m", "ddkit", "run", recipe, f"run.seed={seed}", f"run.out_dir={out}", *teacher,
            *extra, "--no-progress"]


def run_seeds(recipe: str, seeds: list[int], extra: list[str], parallel: int,
              teacher_path: str | None = None, out_root: str | None = None) -> list[dict]:
    """Seed ``seeds[0]`` first (it may train the teacher), then the others, ``parallel`` at a time."""
    def start(seed: int, threads: int | None) -> subprocess.Popen:
        env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        return subprocess.Popen(command(recipe, seed, extra, teacher_path, out_root), cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL)

    def wait(procs: list[subprocess.Popen]) -> None:
        for p in procs:
            if p.wait() != 0:
                raise SystemExit(f"ddkit run failed: {' '.join(p.args)}")

    wait([start(seeds[0], None)])
    rest = seeds[1:]
    for i in range(0, len(rest), parallel):
        wait([start(s, 1 if parallel > 1 else None) for s in rest[i:i + parallel]])
    root = run_root(recipe, out_root)
    return [json.loads((root / f"seed{s}" / "results.json").read_text()) for s in seeds]


def table(seeds: list[int], results: list[dict]) -> str:
    """One row per model: AP per seed, mean +- sd; for the KD variants the gain over the student alone too."""
    aps = [{r["stage"]: r["AP"] for r in res["rows"]} for res in results]
    names = {r["stage"]: r["model"] for r in results[0]["rows"]}
    seed_cols = " | ".join(f"seed {s}" for s in seeds)
    lines = [f"| model | {seed_cols} | AP mean +- sd | gain over alone: per seed | mean +- sd | min |",
             "|---|" + "---:|" * (len(seeds) + 4)]
    for stage in names:
        values = [ap[stage] for ap in aps]
        row = f"| {names[stage]} | " + " | ".join(f"{v:.1f}" for v in values) + f" | {mean_sd(values, 1)} |"
        if stage.startswith("kd_") and stage != "kd_alone" and all("kd_alone" in ap for ap in aps):
            gains = [ap[stage] - ap["kd_alone"] for ap in aps]
            row += f" {', '.join(f'{g:+.1f}' for g in gains)} | {mean_sd(gains, 1)} | {min(gains):+.1f} |"
        else:
            row += " | | |"
        lines.append(row)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="configs/synthetic_det_kd.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--parallel", type=int, default=1, help="seeds after the first run this many at a time")
    ap.add_argument("--set", nargs="*", default=[], help="recipe overrides for every seed, e.g. kd.variants...")
    ap.add_argument("--teacher", help="a trained teacher's model.pt for every seed (seed 0 then trains none)")
    ap.add_argument("--out", help="the folder of the seeds' run folders (default runs/<recipe's name>)")
    args = ap.parse_args()
    teacher = str(Path(args.teacher).resolve()) if args.teacher else None
    results = run_seeds(args.recipe, args.seeds, args.set, max(1, args.parallel), teacher, args.out)
    print(f"{args.recipe}: box AP (COCO AP@[.5:.95], %) on the test part; one teacher ({teacher or 'seed 0'}), the "
          f"students' seeds {args.seeds}\n")
    print(table(args.seeds, results))


if __name__ == "__main__":
    main()
