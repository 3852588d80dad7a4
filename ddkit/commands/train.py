"""``ddkit train RECIPE [key=value ...]``: train the recipe's teacher (or ``--stage student``) for any task.

The run folder is ``<run.out_dir>/<stage>``: ``config.yaml`` (the resolved recipe), ``metrics.jsonl``,
``train.log``, ``checkpoints/last.pt`` (every ``train.checkpoint_every`` iterations and at the end) and
``model.pt`` (student-only weights). ``--resume`` continues a stopped or killed run from its last checkpoint and
ends with the same weights and metrics as an uninterrupted run. Under ``torchrun --nproc-per-node N -m ddkit train``
every process trains on its share of each batch (gloo on CPU, NCCL on GPU).

A finished run of the same recipe is not trained again (the command names it and exits 0) unless ``--force``; a
finished run of another recipe is refused in one line that names the keys and both values, as ``--resume`` refuses
a checkpoint whose recipe differs in a way that changes the result (and notes the harmless changes: logging,
cadence, ``max_iterations``). An unfinished run (Ctrl-C, SIGTERM, killed, ``max_iterations``) is never started
over without ``--force``: the command refuses and names ``--resume``. Another command writing the same folder
refuses this one (:mod:`ddkit.engine.run_lock`).
"""
from __future__ import annotations

import argparse
import json
import logging
import os

HELP = "train a teacher or a student (KD losses, pseudo-labels) from a recipe; resumable, DDP with torchrun"


def ON_INTERRUPT(args: argparse.Namespace) -> str:
    """How to resume: ``--resume``, and without ``--force`` (which starts from scratch, whatever ``--resume``)."""
    if args.force:
        return "re-run it with --resume instead of --force to continue from its last checkpoint (--force starts over)"
    return "re-run the same command with --resume to continue from its last checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a YAML recipe, e.g. configs/train_mnist_teacher.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. teacher.train.iterations=100")
    parser.add_argument("--stage", choices=("teacher", "student"),
                        help="which section to train (default: teacher if the recipe has one, else student)")
    parser.add_argument("--resume", action="store_true", help="continue from <run dir>/checkpoints/last.pt")
    parser.add_argument("--force", action="store_true",
                        help="train again from scratch although the run finished (replaces model.pt), stopped "
                             "early (replaces its checkpoint) or is for another recipe")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: run.device, else auto)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ddkit.engine.recipe import load_recipe
    from ddkit.engine.run_lock import run_lock
    from ddkit.engine.train import run_train
    from ddkit.runtime import torchrun_group

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    cfg = load_recipe(args.recipe, args.overrides)
    with torchrun_group(args.device or (cfg.get("run") or {}).get("device")), \
            run_lock(command=getattr(args, "command_line", None)) as lock:  # the stage folder, once validated
        result = run_train(cfg, stage=args.stage, resume=args.resume, source=args.recipe, device=args.device,
                           progress=False if args.no_progress else None, force=args.force, lock=lock)
    if rank == 0:
        print(json.dumps({k: result[k] for k in ("run_dir", "model_path", "checkpoint", "iterations",
                                                 "total_iterations", "finished", "metrics")}))
    return 0
