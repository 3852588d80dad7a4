"""Write a ddkit YOLO model as a file that ``ultralytics.YOLO(path)`` loads, so a user continues in their usual tool.

    ddkit-yolo-export runs/yolo_det_dd/student/model.pt student_yolo.pt
    python -c "from ultralytics import YOLO; YOLO('student_yolo.pt').predict('image.jpg')"

The output is an Ultralytics checkpoint: a pickle of the network (as Ultralytics writes it), not a ddkit
weights-only file. ddkit's own checkpoints are unchanged.
"""
from __future__ import annotations

import argparse
import copy
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from torch import nn

from ddkit.errors import ConfigError, DataError


def _net_of(model: nn.Module) -> nn.Module:
    inner = model
    while isinstance(getattr(inner, "module", None), nn.Module):  # DDP / DataParallel
        inner = inner.module
    net = getattr(inner, "net", None)
    if net is None or not hasattr(net, "yaml"):
        raise ConfigError(f"the model is a {type(inner).__name__} model; only ddkit yolo models (model: {{name: yolo, "
                          "...}) export to Ultralytics")
    return net


def model_file(source: str | Path) -> tuple[Path, str]:
    """``(file, what it is in words)``: a ``ddkit run`` folder gives its final student (as ``ddkit export`` takes
    it), a stage folder or a checkpoint file itself."""
    from ddkit.engine.run_folder import describe_stage, final_student, is_run_folder

    if is_run_folder(source):
        path, stage, note = final_student(source)
        return path, f"{describe_stage(stage)} (stage {stage}, {path})" + (f"; {note}" if note else "")
    return Path(source), str(source)


def _load_yolo(source: Path, what: str) -> nn.Module:
    """The ddkit model in checkpoint ``source``; a one-line refusal naming the model when it is not a yolo one."""
    from ddkit.engine.checkpoint import load_checkpoint, load_model

    name = load_checkpoint(source)["model_cfg"].get("name")
    if name != "yolo":
        raise ConfigError(f"{what} holds a {name} model; only yolo models export to Ultralytics (ddkit export "
                          "writes ddkit's own file of it)")
    return load_model(source)[1]


def _data_yaml(model: nn.Module) -> str | None:
    """The data yaml ``model`` was trained on, for the file's ``train_args.data`` (``YOLO(file).val()`` then
    validates on it, as on an Ultralytics best.pt, not on its coco8 default): the yolo dataset's yaml, or the one
    yaml in its folder; ``None`` for other data (a COCO file)."""
    from ddkit.engine.task import model_info

    try:
        source = (model_info(model)[1].extra or {}).get("source")
    except ValueError:  # not built by a ddkit task: its data is unknown
        return None
    path = Path(str(source)) if source else None
    if path is not None and path.is_dir():
        found = sorted(path.glob("*.yaml")) + sorted(path.glob("*.yml"))
        path = found[0] if len(found) == 1 else None
    return str(path) if path is not None and path.suffix in (".yaml", ".yml") and path.is_file() else None


def export_ultralytics(model: nn.Module | str | Path, path: str | Path, arg: str = "output") -> Path:
    """Save ``model`` (a ddkit ``yolo`` model, or a ddkit checkpoint / model file of one) for ``ultralytics.YOLO``.

    Returns the written path. The class names are the dataset's category names. ``path`` is refused (``arg``: how
    the caller names it) as ``ddkit export`` refuses its ``-o``: a folder, the input file or a stage's model.pt /
    checkpoints/*.pt (ddkit could no longer read that stage).
    """
    from ultralytics import __version__

    from ddkit.commands.export import check_output
    from ddkit.engine.checkpoint import resolve_checkpoint
    from ddkit.io import atomic_torch_save

    if isinstance(model, (str, Path)):
        file, what = model_file(model)
        source = resolve_checkpoint(file)
        check_output(Path(path), source, arg)
        model = _load_yolo(source, what)
    else:
        check_output(Path(path), None, arg)
    net = copy.deepcopy(_net_of(model)).cpu().float().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    args = dict(vars(net.args)) if hasattr(net.args, "__dict__") else dict(net.args or {})
    args["imgsz"] = int(getattr(model, "imgsz", args.get("imgsz", 640)))
    args["data"] = _data_yaml(model) or args.get("data")
    ckpt: dict[str, Any] = {"date": datetime.now(timezone.utc).isoformat(), "version": __version__,
                            "epoch": -1, "best_fitness": None, "model": net, "ema": None, "updates": None,
                            "optimizer": None, "train_args": args, "train_metrics": {}, "train_results": {}}
    return atomic_torch_save(ckpt, Path(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddkit-yolo-export", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a ddkit checkpoint, model.pt, stage folder or `ddkit run` folder (its final "
                                      "student) of a 'yolo' model")
    parser.add_argument("output", help="the Ultralytics .pt to write; never a folder, the input file nor a stage's "
                                       "model.pt or checkpoints/*.pt (as ddkit export -o)")
    args = parser.parse_args(argv)
    try:
        what = model_file(args.model)[1]
        out = export_ultralytics(args.model, args.output, "OUT")
    except (ConfigError, DataError) as err:
        parser.exit(2, f"ddkit-yolo-export: {err}\n")
    print(f"exported {what}")
    print(f"wrote {out} (load it with ultralytics.YOLO({str(out)!r}))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
