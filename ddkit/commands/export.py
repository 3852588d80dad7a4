"""``ddkit export CHECKPOINT|RUN [-o OUT]``: write student-only weights (no optimizer, adapters or teacher).

``RUN``, the folder ``ddkit run`` wrote, exports its final student (the last round's; a KD run's only variant) to
``RUN/model.pt`` and names which one. A stage folder or a checkpoint file exports that model.

The output (``ddkit-model-v1``) rebuilds its model from the file alone with
``ddkit.engine.checkpoint.load_model`` and loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ddkit.errors import ConfigError

HELP = "write student-only weights from a training checkpoint, a stage folder or a `ddkit run` folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint (.pt), a stage folder, or a `ddkit run` folder (its final "
                                           "student)")
    parser.add_argument("-o", "--output", help="output file (default: RUN/model.pt for a run folder, else model.pt "
                                               "beside the checkpoints, or model_export.pt where model.pt is the "
                                               "file exported or a stage's model); a dict whose 'model' is the "
                                               "plain state dict; never a folder, the file exported, nor a stage's "
                                               "model.pt or checkpoints/*.pt")
    parser.add_argument("--no-verify", action="store_true", help="do not rebuild the model to check the file")


def _stage_file(path: Path) -> str | None:
    """What ``path`` is when it is an existing model or checkpoint of a training folder (a ``ddkit run`` stage, whose
    ``stage.json`` records it, or a ``ddkit train`` folder): ``"stage teacher's model.pt"``; else None."""
    if not path.is_file():
        return None
    in_checkpoints = path.parent.name == "checkpoints" and path.suffix == ".pt"
    folder = path.parent.parent if in_checkpoints else path.parent
    trained = (folder / "stage.json").is_file() or (folder / "checkpoints").is_dir()
    if in_checkpoints or (path.name == "model.pt" and trained):
        return f"stage {folder.name}'s {path.relative_to(folder)}"
    return None


def check_output(dest: Path, src: Path | None, arg: str = "-o") -> None:
    """Refuse an output (``arg``: how the command names it) that is a folder, the file being exported, or a stage's
    model or checkpoint (which ``ddkit eval`` / ``ddkit run`` read as that stage's); before anything is written.
    Plugins' exporters call it too."""
    from ddkit.io import same_file

    if dest.is_dir():
        raise ConfigError(f"{arg} {dest} is a folder; give a file name, e.g. {arg} {dest / 'model.pt'}")
    if src is not None and same_file(dest, src):
        raise ConfigError(f"{arg} {dest} is the checkpoint being exported; choose another file")
    stage = _stage_file(dest)
    if stage:
        raise ConfigError(f"{arg} {dest} is {stage}; writing over it would change what ddkit eval and ddkit run read "
                          f"as that stage; choose a file outside the stage folders")


def _source(arg: str) -> tuple[Path, Path, str]:
    """(checkpoint, default output, what it is in words)."""
    from ddkit.engine.checkpoint import resolve_checkpoint
    from ddkit.engine.run_folder import describe_stage, final_student, is_run_folder

    if is_run_folder(arg):
        src, stage, note = final_student(arg)
        what = f"{describe_stage(stage)} (stage {stage}, {src})" + (f"; {note}" if note else "")
        return src, Path(arg) / "model.pt", what
    src = resolve_checkpoint(arg)
    run_dir = src.parent.parent if src.parent.name == "checkpoints" else src.parent
    dest = run_dir / "model.pt"
    if dest.resolve() == src.resolve() or _stage_file(dest):  # never over the file exported nor a stage's model
        dest = run_dir / "model_export.pt"
    return src, dest, str(src)


def run(args: argparse.Namespace) -> int:
    from ddkit.engine.checkpoint import MODEL_FORMAT, load_checkpoint, load_model, unfinished, warn_unfinished
    from ddkit.io import atomic_torch_save

    src, dest, what = _source(args.checkpoint)
    if args.output:
        dest = Path(args.output)
        check_output(dest, src)
    record = load_checkpoint(src)
    out = {k: record[k] for k in ("task", "model_cfg", "info", "model")}
    out["format"] = MODEL_FORMAT
    if unfinished(record):  # kept, so that eval / predict of the exported file still say so
        warn_unfinished(src, record)
        out.update({k: record[k] for k in ("iteration", "total_iterations")})
    atomic_torch_save(out, dest)
    if not args.no_verify:
        load_model(dest, warn=False)  # warned above, naming the checkpoint
    n = sum(v.numel() for v in out["model"].values())
    print(f"exported {what}")
    print(f"wrote {dest} ({out['task']['name']} / {out['model_cfg'].get('name')}, {n:,} values)")
    hint = _export_hint(str(out["model_cfg"].get("name")), args.checkpoint)
    if hint:
        print(hint)
    return 0


def _export_hint(model: str, source: str) -> str | None:
    """The model plugin's line for an exported file of ``model`` (its ``ModelSpec.export_hint``), if it has one."""
    from ddkit.plugin_manager import get_registry

    registry = get_registry()
    if ("models", model) not in registry:
        return None
    hint = getattr(registry.get("models", model).spec, "export_hint", None)
    return hint(source) if hint is not None else None
