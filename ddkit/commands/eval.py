"""``ddkit eval RECIPE|RUN|CHECKPOINT [key=value ...] [--checkpoint PATH] [--tta] [--data DATASET] [--split S]``.

Evaluates a trained model (teacher, student, exported) and prints the task's metrics, one view and, with
``--tta``, the multi-transform ensemble (the views and aggregator of ``--transforms`` / ``--aggregator``, else the
recipe's ``evaluate`` or ``label`` section, else the image and its mirror); writes them to ``-o``, else into the
run folder (its final student) or the model's stage (or file's) folder: ``eval.json`` on the recipe's test split,
``eval_<split>.json`` on another of its splits, ``eval_<stem>[_<split>].json`` on ``--data`` (``--data
coco8-pose.yaml`` -> ``eval_coco8-pose_val.json``), so an evaluation on other data keeps the earlier ones.

* the model: ``--checkpoint`` (a file, a stage folder or a run folder), else a run folder's final student (the
  folder given, or the recipe's ``run.out_dir``), else the stage folder given (then the data and views are its
  run's), else the file given; with ``--trust-checkpoint`` also another library's pickled checkpoint that a model
  plugin opens (``ddkit eval best.pt --trust-checkpoint --data data.yaml``: an Ultralytics ``best.pt``), as it is;
* the data: ``--data`` (a COCO ``.json``, a YOLO data ``.yaml`` or folder, a folder of class folders, or a dataset block
  ``'{name: yolo, root: ..., split: val}'``), else the recipe's ``--split`` (default ``test``). A detector's
  classes must be the dataset's; when only the ids differ (a model trained on YOLO files, ids 1-80, scored on a COCO
  file, ids 1-90) they are matched by name and the model's classes the dataset lacks are not scored.
* the batch size: ``--batch-size``, else the one the run evaluated that stage with (its ``train.eval_batch_size``,
  else its ``train.batch_size``; a detector's AP depends on it), else 8; the ``--tta`` row's: the recipe's
  ``label.batch_size``, as the run's TTA stages batch it; eval.json records both.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from ddkit.errors import ConfigError

DEFAULT_BATCH_SIZE = 8
TRUST_HELP = ("take another library's pickled checkpoint (e.g. an Ultralytics best.pt) through the model plugin that "
              "knows it; this runs code from the file: only for files you trust")
# said in the refusal of such a file without --trust-checkpoint (ddkit.engine.checkpoint.load_model's trust_hint)
TRUST_HINT = ("pass --trust-checkpoint to evaluate/predict it as it is (this runs code from the file: only for files "
              "you trust)")
HELP = ("evaluate a trained model (plain and multi-transform) on a recipe's split or a dataset; writes eval.json "
        "(eval_<data>.json with --data)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", help="a recipe (.yaml), a `ddkit run` folder, or a checkpoint (with --data; "
                                           "another library's with --trust-checkpoint)")
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    parser.add_argument("--checkpoint", help="the model to evaluate (default: the run's final student)")
    parser.add_argument("--data", help="evaluate on this dataset instead of the recipe's split: a COCO .json, a "
                                       "YOLO data .yaml or folder, a folder of class folders, or a YAML dataset block")
    parser.add_argument("--split", help="the recipe's split (test, labeled, unlabeled; default test), or a YOLO "
                                        "folder's split with --data (default val)")
    parser.add_argument("--tta", action="store_true", help="also evaluate the multi-transform ensemble")
    parser.add_argument("--transforms", help="TTA views as YAML, e.g. '[{name: identity}, {name: hflip}]'")
    parser.add_argument("--aggregator", help="TTA aggregator as YAML, e.g. '{name: wbf, iou_thr: 0.55}'")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="evaluation batch size (default: the one the run evaluated the model's stage with, "
                             f"else {DEFAULT_BATCH_SIZE}); a detector's AP depends on it")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 (default: auto)")
    parser.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    parser.add_argument("-o", "--output", help="the JSON file to write (default: in the run folder, or the model's "
                                               "stage folder: eval.json on the recipe's test split, "
                                               "eval_<split>.json on another, eval_<stem>[_<split>].json on --data)")


def saved_recipe(folder: str | Path, overrides: Sequence[str] = ()) -> tuple[Any, str | None]:
    """``(recipe, its file)`` that a `ddkit run` folder saved (``config.yaml``), for the run folder or one of its
    stage folders (``ddkit predict`` takes either), or that a `ddkit train` folder saved; ``(None, None)`` for
    anything else."""
    from ddkit.config import load_config
    from ddkit.engine.run_folder import is_run_folder

    folder = Path(folder)
    run_dir = next((d for d in (folder, folder.parent) if folder.is_dir() and is_run_folder(d)), None)
    saved = run_dir / "config.yaml" if run_dir is not None else folder / "config.yaml" if folder.is_dir() else None
    if saved is None or not saved.is_file():
        return None, None
    return load_config(saved, overrides), str(saved)


def _recipe_and_default_model(args: argparse.Namespace) -> tuple[Any, str | None, Path | None, str]:
    """``(recipe or None, its source, the run folder whose final student is the default model, what it is)``."""
    from ddkit.config import load_config
    from ddkit.engine.run_folder import is_run_folder

    target = Path(args.target)
    if target.is_file() and target.suffix.lower() in (".yaml", ".yml"):
        cfg = load_config(target, args.overrides)
        out = Path((cfg.get("run") or {}).get("out_dir") or f"runs/{(cfg.get('run') or {}).get('name') or 'ddkit'}")
        return cfg, str(target), out, "recipe"
    if is_run_folder(target):
        return *saved_recipe(target, args.overrides), target, "run"
    # a stage of a run, or a `ddkit train` folder: the data of the recipe it saved
    if target.is_dir() and (is_run_folder(target.parent) or (target / "config.yaml").is_file()) \
            and not args.checkpoint:
        cfg, saved = saved_recipe(target, args.overrides)
        if cfg is not None:
            return cfg, saved, None, "checkpoint"
    if args.checkpoint:
        raise ConfigError(f"{target}: neither a recipe (.yaml) nor a `ddkit run` folder; with --checkpoint, "
                           "pass the recipe or run folder whose data to use")
    return None, None, None, "checkpoint"


def _stage_folder(source: Path) -> Path | None:
    """The folder that trained the model ``source`` (a stage or ``ddkit train`` folder, or a file in one)."""
    folder = source if source.is_dir() else source.parent
    return folder.parent if folder.name == "checkpoints" else folder


def _model_path(args: argparse.Namespace, run_dir: Path | None, kind: str) -> tuple[Path, str, Path | None]:
    """``(model file, what it is, the folder that trained it)``: a stage folder of a run gives its stage's model
    (also a ``teacher.checkpoint`` teacher's file outside the run)."""
    from ddkit.engine.checkpoint import resolve_checkpoint
    from ddkit.engine.run_folder import describe_stage, final_student, is_run_folder, stage_model

    source = args.checkpoint or (args.target if kind == "checkpoint" else None)
    if source is None:
        if run_dir is None or not is_run_folder(run_dir):
            raise ConfigError(f"{run_dir}: no `ddkit run` folder with a finished student; pass --checkpoint")
        source = str(run_dir)
    if is_run_folder(source):
        path, stage, note = final_student(source)
        return path, f"{describe_stage(stage)} of {source}" + (f" ({note})" if note else ""), Path(source) / stage
    folder = _stage_folder(Path(source))
    if Path(source).is_dir() and (folder / "stage.json").is_file():
        path = stage_model(folder.parent, folder.name)
        return path, str(path), folder
    path = resolve_checkpoint(source)
    return path, str(path), folder


def _batch_size(args: argparse.Namespace, folder: Path | None) -> int:
    """``--batch-size``, else the one the stage (or ``ddkit train``) folder evaluated its model with: its
    ``stage.json``'s, else its checkpoint's train config (runs that predate that record), else the default."""
    from ddkit.engine.checkpoint import LAST, load_checkpoint
    from ddkit.engine.train_config import parse_train_config

    if args.batch_size is not None:
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size {args.batch_size}: must be >= 1")
        return args.batch_size
    if folder is None:
        return DEFAULT_BATCH_SIZE
    marker = folder / "stage.json"
    recorded = (json.loads(marker.read_text()).get("result") or {}).get("eval_batch_size") \
        if marker.is_file() else None
    if recorded:
        return int(recorded)
    last = folder / "checkpoints" / LAST
    train_cfg = load_checkpoint(last).get("train_cfg") if last.is_file() else None
    return parse_train_config(train_cfg).evaluation_batch_size if train_cfg else DEFAULT_BATCH_SIZE


def _data_stem(block: Mapping[str, Any]) -> str:
    """A ``--data`` dataset's short name: its COCO file's, data yaml's or folder's, else the block's ``name``."""
    for key in ("annotations", "data_yaml", "root"):
        value = block.get(key)
        if isinstance(value, str) and value.strip():
            path = Path(value.strip()).expanduser()
            return path.stem if path.suffix.lower() in (".json", ".yaml", ".yml") else path.resolve().name
    return str(block.get("name") or "data")


def _safe_name(text: str) -> str:
    """``text`` as a file-name part: runs of other characters than letters, digits and ``._-`` become ``-``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("._-") or "data"


def output_name(args: argparse.Namespace) -> str:
    """The default file name of an evaluation: ``eval.json`` on the recipe's test split, ``eval_<split>.json`` on
    another of its splits, ``eval_<stem>[_<split>].json`` on ``--data`` (the stem of its file or folder, the split
    a YOLO one's), so that an evaluation replaces only an earlier one on the same data."""
    from ddkit.engine.evaluate import dataset_block

    if not args.data:
        split = args.split or "test"
        return "eval.json" if split == "test" else f"eval_{_safe_name(split)}.json"
    block = dataset_block(args.data, args.split)
    parts = [_data_stem(block)] + ([str(block["split"])] if block.get("split") else [])
    return f"eval_{'_'.join(_safe_name(part) for part in parts)}.json"


def _default_output(args: argparse.Namespace, run_dir: Path | None, kind: str, folder: Path, data: str) -> Path:
    """:func:`output_name` in ``RUN`` for a run's final student, else in the evaluated model's stage folder (or the
    checkpoint's folder); with or without ``--tta`` (the file then also holds the ensemble's metrics). Where that
    file holds an evaluation of other ``data`` (two datasets of one stem: ``a/val.json``, ``b/val.json``), the
    name gains a digest of this data's description, so neither evaluation replaces the other."""
    named = run_dir if run_dir is not None and kind != "checkpoint" and not args.checkpoint else folder
    out = named / output_name(args)
    try:
        recorded = json.loads(out.read_text()).get("data") if out.is_file() else data
    except (OSError, ValueError, AttributeError):
        recorded = None  # unreadable: kept, as an evaluation of unknown data
    if recorded == data:
        return out
    digest = hashlib.sha256(data.encode()).hexdigest()[:8]
    return out.with_name(f"{out.stem}-{digest}{out.suffix}")


def _no_items(spec: str, block: dict[str, Any]) -> str:
    """The one-line refusal of a ``--data`` dataset with 0 items: what was given and where images were looked for."""
    where = f"--data {spec}: 0 items to evaluate (no image could be read)"
    ann = block.get("annotations")
    if ann and not block.get("images"):  # a COCO file (its block's keys, not its name)
        return (f"{where}; a COCO file's images are looked for under the JSON's folder ({Path(ann).parent}) "
                f"unless an images root is given: "
                f"--data \"{{name: {block['name']}, annotations: {ann}, images: DIR}}\"")
    return f"{where}; check the path (and a COCO block's 'images' root)"


def _dataset(args: argparse.Namespace, cfg: Any, source: str | None, shape: Any = None) -> tuple[Any, str]:
    """The items to evaluate: ``--data``, else the recipe's split; a fixed-size model's images read at its input
    ``shape`` ``[C, H, W]``, once (an image folder is not first resized to its first image's size)."""
    from ddkit.engine.data import build_at_shape, build_data, check_labeled, fit_shape
    from ddkit.engine.evaluate import dataset_block
    from ddkit.plugin_manager import get_registry

    if args.data:
        block = dataset_block(args.data, args.split)
        dataset, _ = build_at_shape(get_registry(), block, shape, "--data", whose="the model's")
        if len(dataset) == 0:  # a table of zeros would read as a measured result
            raise ConfigError(_no_items(args.data, block))
        check_labeled(dataset, f"--data {args.data}")
        return dataset, json.dumps(block)
    if cfg is None:
        raise ConfigError(f"{args.target}: a checkpoint alone has no data; pass --data (a COCO .json, a YOLO "
                           "folder, ...) or evaluate a recipe or run folder")
    split = args.split or "test"
    splits = build_data(cfg.get("data") or {}, where=f"{source}: data")
    part = {"test": splits.test, "labeled": splits.labeled,
            "unlabeled": getattr(splits.unlabeled, "ground_truth", None)}
    if split not in part:
        raise ConfigError(f"--split {split!r}: the recipe's splits are test, labeled, unlabeled")
    if part[split] is None:
        raise ConfigError(f"{source}: the recipe has no {split} split; pass --split or --data")
    if len(part[split]) == 0:
        raise ConfigError(f"{source}: data, split {split}: 0 items to evaluate; pass --split or --data")
    return fit_shape(part[split], shape), f"{source}: data, split {split}"


def tta_from_args(args: argparse.Namespace, task: Any, info: Any, cfg: Any) -> tuple[Any, dict[str, Any] | None]:
    """``(strategies, block)`` of ``--tta`` (``None, None`` without it): ``--transforms`` / ``--aggregator``, else
    the recipe ``cfg``'s (see :func:`ddkit.engine.evaluate.tta_block`); shared with ``ddkit predict``."""
    if not args.tta:
        return None, None
    import yaml

    from ddkit.engine.evaluate import tta_block, tta_strategies
    from ddkit.registry import _to_plain

    transforms = yaml.safe_load(args.transforms) if args.transforms else None
    aggregator = yaml.safe_load(args.aggregator) if args.aggregator else None
    block = tta_block(transforms, aggregator, _to_plain(cfg) if cfg is not None else None)
    return tta_strategies(task, info, block), block


def tta_origin(args: argparse.Namespace, cfg: Any, recipe: str | None) -> str:
    """Where ``--tta``'s views and aggregator came from, said after the views (a default can be a poor fit: mirrored
    digits): ``" (views and aggregator as the recipe R sets)"``, ddkit's default views, or ``""`` when both were
    given."""
    from ddkit.registry import _to_plain

    plain = _to_plain(cfg) if cfg is not None else {}
    sections = [plain.get("evaluate") or {}, plain.get("label") or {}]
    origin = {what: "given" if flag else "recipe" if any(s.get(key) for s in sections) else "default"
              for what, key, flag in (("views", "transforms", args.transforms),
                                      ("aggregator", "aggregator", args.aggregator))}
    notes = []
    from_recipe = [what for what, where in origin.items() if where == "recipe"]
    if from_recipe:
        notes.append(f"{' and '.join(from_recipe)} as the recipe {recipe} sets")
    if origin["views"] == "default":
        why = "the recipe sets none" if recipe else "no recipe beside the model"
        notes.append(f"ddkit's default views ({why}); choose them with --transforms")
    if origin["aggregator"] == "default":
        notes.append("the task's default aggregator")
    return f" ({'; '.join(notes)})" if notes else ""


def _match_classes(plain: Any, dataset: Any, info: Any, model: str, data_what: str) -> tuple[Any, Any]:
    """``(dataset, categories)``: a classifier's dataset with its class ids matched to the model's by name (as a
    recipe's test part; a subset is fine), or for instance predictions :func:`category_map`'s id map (None: the
    same ids); anything else is a one-line error naming the class."""
    from ddkit.engine.data import get_info, is_classification, match_classes
    from ddkit.engine.evaluate import category_map, check_same_classes

    if not (plain.gives_probs and is_classification(dataset)):
        return dataset, category_map(info, get_info(dataset), model, data_what, by_name=not plain.gives_probs)
    matched = match_classes(dataset, info, data_what, whose=f"the model's ({model})")
    if matched is not dataset:
        print(f"classes matched by name: the dataset's {len(get_info(dataset).categories)} of the model's "
              f"{len(info.categories)} classes")
    check_same_classes(info, get_info(matched), model, data_what)
    return matched, None


def _scores(predictor: Any, dataset: Any, batch_size: int,
            categories: Mapping[int, int] | None) -> tuple[dict[str, float], list[dict[str, Any]] | None]:
    """The task's metrics and, where the task gives them (``evaluate_per_class``, asked of any task plugin), one row
    of metrics per class, from one prediction pass and one evaluation."""
    from ddkit.engine.evaluate import predict_dataset

    preds = predict_dataset(predictor, dataset, batch_size, categories)
    per_class = getattr(predictor.task, "evaluate_per_class", None)
    if per_class is None:
        return predictor.task.evaluate_predictions(preds, dataset), None
    return per_class(preds, dataset)


def _json_safe(rows: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """``nan`` (a class without ground truth) as null: strict JSON readers refuse NaN."""
    return None if rows is None else [{k: None if isinstance(v, float) and math.isnan(v) else v
                                       for k, v in row.items()} for row in rows]


def run(args: argparse.Namespace) -> int:
    from ddkit.engine.checkpoint import load_model
    from ddkit.engine.evaluate import Predictor
    from ddkit.engine.label import format_quality_table
    from ddkit.io import atomic_write_json
    from ddkit.runtime import resolve_device

    cfg, source, run_dir, kind = _recipe_and_default_model(args)
    path, what, folder = _model_path(args, run_dir, kind)
    batch_size = _batch_size(args, folder)
    device = resolve_device(args.device)
    task, model, info = load_model(path, device=device, trust_foreign=args.trust_checkpoint, trust_hint=TRUST_HINT)
    dataset, data_what = _dataset(args, cfg, source, (info.extra or {}).get("image_shape"))
    plain = Predictor(task, model, info, device=device)
    dataset, categories = _match_classes(plain, dataset, info, str(path), data_what)
    strategies, block = tta_from_args(args, task, info, cfg)
    print(f"evaluating {what} on {data_what} ({len(dataset)} items, batch size {batch_size})")
    if categories is not None:
        print(f"categories matched by name: the dataset's {len(categories)} of the model's {len(info.categories)} "
              f"classes (ids differ); the model's other classes are not scored")
    rows, per_class = {}, {}
    rows["1 view"], per_class["1 view"] = _scores(plain, dataset, batch_size, categories)
    if strategies is not None:
        name = f"TTA ({len(strategies.views)} views: {', '.join(strategies.view_names)})"
        print(f"--tta: {len(strategies.views)} views ({', '.join(strategies.view_names)})"
              f"{tta_origin(args, cfg, source)}")
        tta_batch = args.batch_size or block.get("batch_size") or batch_size  # as the run's TTA stage batches
        rows[name], per_class[name] = _scores(Predictor(task, model, info, strategies, device), dataset, tta_batch,
                                              categories)
    print(format_quality_table(rows))
    for row_name, classes in per_class.items():
        shown = [c for c in classes or [] if c.get("instances")]  # a class absent from the data has no score
        if shown:
            print(f"\nper class, {row_name} ({len(shown)} of the {len(classes)} classes are in the data):\n"
                  + format_quality_table({str(c["name"]): {k: v for k, v in c.items() if k not in ("id", "name")}
                                          for c in shown}, "class"))
    record = {"model": str(path), "what": what, "data": data_what, "items": len(dataset), "task": task.name,
              "batch_size": batch_size,
              "metrics": rows["1 view"], "per_class": _json_safe(per_class["1 view"]), "tta": None,
              "categories_by_name": None if categories is None else {str(k): v for k, v in categories.items()}}
    if strategies is not None:
        record["tta"] = {"views": strategies.view_blocks, "aggregator": strategies.aggregator_block,
                         "batch_size": tta_batch, "metrics": rows[name], "per_class": _json_safe(per_class[name])}
    out = (Path(args.output) if args.output
           else _default_output(args, run_dir, kind, folder or _stage_folder(path), data_what))
    atomic_write_json(out, record)
    print(f"wrote {out}")
    return 0
