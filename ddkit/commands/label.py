"""``ddkit label RECIPE [key=value ...]``: pseudo-label unlabeled images with a teacher (multi-transform inference,
aggregation, count-matched selection), written as COCO JSON (or image labels) into ``<run.out_dir>/label``.

Two stages: the label stage writes shards (``label/shards``), the select stage reads them and writes the
pseudo-labels, ``summary.json`` (and ``quality.json``). Re-running the same command resumes: finished shards are
skipped. ``--shard I/N`` labels only part ``I`` of ``N`` (run the command once more without ``--shard`` to select);
under ``torchrun --nproc-per-node N`` every rank labels its part and rank 0 selects.
"""
from __future__ import annotations

import argparse
import json
import logging
import os

HELP = "pseudo-label unlabeled images with a teacher: multi-transform inference, aggregation, selection"
ON_INTERRUPT = "re-run the same command to resume: the shards written are kept"


def positive_int(text: str) -> int:
    """An argparse type: an int of 1 or more (``--max-shards 0`` would label nothing, ``-1`` all but the last)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1: give how many shards to label, 1 or more")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a YAML recipe with run, data, teacher {checkpoint} and label sections")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (OmegaConf dotlist), e.g. label.shards=8")
    parser.add_argument("--shard", metavar="I/N", help="label only part I of N (0-based) and do not select")
    parser.add_argument("--max-shards", type=positive_int, metavar="K",
                        help="stop after labelling K shards (resume later)")
    parser.add_argument("--keep-raw", action="store_true", default=None,
                        help="also keep every view's predictions (raw_predictions.pt, for ddkit bench)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ddkit.engine.label import quality_table, run_label
    from ddkit.engine.recipe import load_recipe
    from ddkit.engine.run_lock import run_lock
    from ddkit.engine.shards import parse_shard_arg

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_recipe(args.recipe, args.overrides)
    worker = parse_shard_arg(args.shard) if args.shard else None
    # the label folder, once validated; --shard workers share it (they label side by side), others hold it alone
    with run_lock(shared=worker is not None, command=getattr(args, "command_line", None)) as lock:
        result = run_label(cfg, keep_raw=args.keep_raw, worker=worker, max_shards=args.max_shards,
                           progress=not args.no_progress, source=args.recipe, lock=lock)
    if not result.complete:
        rank = int(os.environ.get("RANK", "0")) if worker is None and args.max_shards is None else 0
        then = "rank 0 selects the pseudo-labels" if rank else \
            "run without --shard/--max-shards to finish and select the pseudo-labels"  # a torchrun rank's part
        print(f"labelled {len(result.shards_done)} shard(s) into {result.out_dir / 'shards'}; {then}")
        return 0
    s = result.summary or {}
    images = s.get("images", {})
    print(f"pseudo-labels: {result.pseudo_path}")
    if result.yolo_path is not None:
        print(f"YOLO dataset: {result.yolo_path} (yolo train data={result.yolo_path})")
    print(f"images: {images.get('labelled')} labelled, {images.get('skipped')} skipped"
          + (f" (see {result.skipped_path})" if images.get("skipped") else ""))
    per_image = s.get("instances_per_image", {})
    print(f"instances per image: labeled {per_image.get('labeled', 0):.3f}, pseudo {per_image.get('pseudo', 0):.3f} "
          f"(aggregated {per_image.get('aggregated', 0):.3f})")
    print("thresholds: " + json.dumps(s.get("thresholds", {})))
    if result.quality:
        print("pseudo-label quality (single untransformed view vs multi-transform ensemble):")
        print(quality_table(result.quality))
    return 0
