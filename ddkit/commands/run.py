"""``ddkit run RECIPE [overrides]``: teacher -> label -> student -> evaluate, resumable, with a report.

Under ``torchrun --nproc-per-node N -m ddkit run`` every training stage is data-parallel over the N processes (gloo
on CPU, NCCL on GPU) as in ``ddkit train``, every labelling stage labels one part of the shards per process, and
rank 0 alone writes the run folder's files and prints the results."""
from __future__ import annotations

import argparse
import os
import sys


HELP = "run a distillation recipe end to end (teacher, labelling, student, baselines, report)"
RESUMES = "finished stages are skipped, the interrupted one continues from its checkpoint or shards"


def ON_INTERRUPT(args: argparse.Namespace) -> str:
    """How to resume: the same command, but without ``--force`` (which would redo the forced stages from scratch,
    throwing away the shards and checkpoints written before the interruption)."""
    if not args.force:
        return f"re-run the same command to resume: {RESUMES}"
    forced = " ".join(f"--force {stage}" for stage in args.force)
    return f"re-run it without {forced} to resume ({forced} would start the stage over): {RESUMES}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a YAML recipe, e.g. configs/mnist_dd.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run.seed=1")
    parser.add_argument("--force", action="append", default=[], metavar="STAGE",
                        help="redo this stage (and every later one) even if it is complete; repeatable")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from ddkit.engine.recipe import load_recipe
    from ddkit.engine.run import results_markdown, run_recipe
    from ddkit.engine.run_lock import run_lock
    from ddkit.runtime import torchrun_group

    cfg = load_recipe(args.recipe, args.overrides)
    with torchrun_group((cfg.get("run") or {}).get("device")), \
            run_lock(command=getattr(args, "command_line", None)) as lock:  # run.out_dir, once validated
        summary = run_recipe(cfg, source=args.recipe, force=args.force, lock=lock,
                             progress=False if args.no_progress else sys.stderr.isatty() or None)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print()
    print(results_markdown(summary))
    print(f"\nrun folder: {summary['run_dir']}  (report: {summary['run_dir']}/report.html)")
    return 0
