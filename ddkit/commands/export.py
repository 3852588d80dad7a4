"""``ddkit export CHECKPOINT [-o OUT]``: write student-only weights (no optimizer, adapters or teacher).

The output (``ddkit-model-v1``) rebuilds its model from the file alone with
``ddkit.engine.checkpoint.load_model`` and loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

HELP = "write student-only weights from a training checkpoint or run folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint (.pt) or a run folder")
    parser.add_argument("-o", "--output", help="output file (default: model.pt beside the run folder's checkpoints)")
    parser.add_argument("--no-verify", action="store_true", help="do not rebuild the model to check the file")


def run(args: argparse.Namespace) -> int:
    from ddkit.engine.checkpoint import MODEL_FORMAT, load_checkpoint, load_model, resolve_checkpoint
    from ddkit.io import atomic_torch_save

    src = resolve_checkpoint(args.checkpoint)
    record = load_checkpoint(src)
    out = {k: record[k] for k in ("task", "model_cfg", "info", "model")}
    out["format"] = MODEL_FORMAT
    if args.output:
        dest = Path(args.output)
    else:
        run_dir = src.parent.parent if src.parent.name == "checkpoints" else src.parent
        dest = run_dir / "model.pt"
        if dest.resolve() == src.resolve():
            dest = run_dir / "model_export.pt"
    atomic_torch_save(out, dest)
    if not args.no_verify:
        load_model(dest)
    n = sum(v.numel() for v in out["model"].values())
    print(f"wrote {dest} ({out['task']['name']} / {out['model_cfg'].get('name')}, {n:,} values)")
    return 0
