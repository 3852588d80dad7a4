"""Labelling as a whole: the Python API :func:`label_dataset` (label stage then select stage, what ``ddkit label``
and the TTA evaluation run), the two stages alone (:func:`label_stage`, :func:`select_stage`, what ``ddkit run``
plans), and :func:`run_label` for a loaded recipe."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import torch
from torch import nn

from ddkit.engine.checkpoint import resolve_checkpoint
from ddkit.engine.classes import check_classes, data_where
from ddkit.engine.label.config import (LabelConfig, Strategies, build_selector, build_strategies,
                                           check_output_format, parse_label_config, selector_factory, strategy_block)
from ddkit.engine.label.labeller import Labeller, Timer
from ddkit.engine.label.selecting import LabelResult, SelectInputs, select_pseudo_labels
from ddkit.engine.label.sharded import ShardedLabels, label_shards, plan_shards
from ddkit.engine.label.sources import Source, check_not_empty, make_source
from ddkit.engine.coco_file import PSEUDO_DESCRIPTION
from ddkit.engine.coco_results import CocoGroundTruthBuilder
from ddkit.engine.data import get_target, item_file
from ddkit.engine.prediction_kinds import prediction_kind
from ddkit.engine.run_lock import RunLock
from ddkit.engine.yolo_export import write_yolo_dataset
from ddkit.errors import ConfigError, DataError
from ddkit.io import atomic_write_json, file_sha256
from ddkit.runtime import join_process_group, resolve_device, state_sha256
from ddkit.types import DatasetInfo


def _version() -> str:
    import ddkit

    return ddkit.__version__


Teachers = Union[nn.Module, Sequence[nn.Module]]
log = logging.getLogger("ddkit.label")
Checkpoints = Union[str, Path, Sequence[Union[str, Path]], None]


def _as_list(x: Any) -> list[Any]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _teacher_sha(teachers: list[nn.Module], checkpoints: list[Any]) -> str:
    """One teacher's sha256 (of its file, else its weights); several teachers' hashed together in order."""
    shas = [file_sha256(c) for c in checkpoints] if checkpoints and None not in checkpoints else \
        [state_sha256(t) for t in teachers]
    return shas[0] if len(shas) == 1 else hashlib.sha256("\0".join(shas).encode()).hexdigest()


def _provenance(task: Any, info: DatasetInfo, strategies: Strategies, source: Source,
                teacher_checkpoint: Checkpoints, teacher_sha: str) -> dict[str, Any]:
    checkpoints = [None if c is None else str(c) for c in _as_list(teacher_checkpoint)]
    return {
        "description": PSEUDO_DESCRIPTION, "ddkit_version": _version(),
        "teacher_checkpoint": checkpoints[0] if len(checkpoints) == 1 else checkpoints,
        "teacher_sha256": teacher_sha, "task": getattr(task, "name", None),
        "transforms": strategies.transform_blocks,
        "views": [strategies.view_names[v] for v in strategies.ensemble_views],
        "aggregator": strategies.aggregator_block, "keypoint_aggregator": strategies.keypoint_block,
        "source": source.describe(), "image_root": source.image_root,
        "dataset_info": {"num_keypoints": info.num_keypoints, "flip_indices": info.flip_indices,
                         "keypoint_sigmas": info.keypoint_sigmas, **_image_shape(info)},
    }


def _image_shape(info: DatasetInfo) -> dict[str, Any]:
    """``{"extra": {"image_shape": [C, H, W]}}`` for a fixed-size dataset (the pseudo-labels' images are read back in
    that shape), else nothing."""
    shape = (info.extra or {}).get("image_shape")
    return {"extra": {"image_shape": [int(v) for v in shape]}} if shape else {}


def _finish_workers(distributed: bool, rank: int, started: bool) -> None:
    if distributed:
        import torch.distributed as dist

        dist.barrier()  # every part is labelled; rank 0 selects
        if rank != 0 and started:
            dist.destroy_process_group()


def label_stage(task: Any, teacher: Teachers, info: DatasetInfo, unlabeled: Any,
                label_cfg: Mapping[str, Any] | LabelConfig, out_dir: str | Path, *,
                teacher_checkpoint: Checkpoints = None, device: str | torch.device = "cpu",
                worker: tuple[int, int] | None = None, max_shards: int | None = None, progress: bool = False,
                registry: Any = None, strategies: Strategies | None = None, timer: Timer | None = None,
                seed: int = 0) -> ShardedLabels:
    """Label ``unlabeled`` into ``out_dir/shards`` (see :func:`label_dataset` for the arguments). ``complete`` is
    False for a worker that labelled only its part or stopped after ``max_shards``; every shard is there when it
    is True (rank 0 only, under ``torchrun``). Several teachers (with their checkpoints, in the same order) ensemble
    their predictions of every view."""
    torch.manual_seed(seed)
    cfg = parse_label_config(label_cfg)
    out_dir, timer = Path(out_dir), timer or Timer()
    source = make_source(cfg, unlabeled, info)
    if strategies is None:
        need_single = cfg.quality is not False and source.has_ground_truth
        strategies = build_strategies(cfg, task, info, registry, need_single=need_single)
    rank, world, started = join_process_group() if worker is None else (worker[0], worker[1], False)
    teachers = [t.to(torch.device(device)).eval() for t in _as_list(teacher)]
    teacher_sha = _teacher_sha(teachers, _as_list(teacher_checkpoint) if teacher_checkpoint else [])
    shards, n_total = plan_shards(cfg, source, strategies, out_dir, teacher_sha, getattr(task, "name", None))
    labeller = Labeller(task, teachers, info, strategies, device, cfg.keep_raw, timer)
    done_now, mine_done = label_shards(labeller, source, cfg, shards, n_total, rank, world, max_shards, progress)
    result = ShardedLabels(shards, _provenance(task, info, strategies, source, teacher_checkpoint, teacher_sha),
                           complete=False, shards_done=done_now, timing=timer.to_dict())
    if not mine_done:
        return result
    _finish_workers(worker is None and world > 1, rank, started)
    if rank != 0 or (worker is not None and world > 1):
        return result
    missing = shards.missing()
    if missing:
        raise DataError(f"{len(missing)} shard(s) of {shards.num_shards} are not labelled yet ({missing[:10]}); run "
                        f"the workers of the missing parts, or the same command without --shard")
    result.complete = True
    if started:
        import torch.distributed as dist

        dist.destroy_process_group()
    return result


def select_stage(sharded: ShardedLabels, task: Any, info: DatasetInfo, labeled: Any,
                 label_cfg: Mapping[str, Any] | LabelConfig, out_dir: str | Path, *, registry: Any = None,
                 timer: Timer | None = None) -> LabelResult:
    """Select pseudo-labels from the complete shards of :func:`label_stage` and write every output file."""
    cfg = parse_label_config(label_cfg)
    if registry is None:
        from ddkit.plugin_manager import get_registry

        registry = get_registry()
    block = strategy_block(cfg.selector)
    inputs = SelectInputs(prediction_kind(task), info, selector_factory(block, registry, "label.selector"), block,
                          labeled=labeled, keep_raw=cfg.keep_raw, quality=cfg.quality)
    check_output_format(cfg, inputs.kind)
    result = select_pseudo_labels(sharded, inputs, out_dir, timer)
    if cfg.writes_yolo:
        result.yolo_path = write_pseudo_yolo(result.pseudo_path, Path(out_dir) / "yolo", info, cfg, labeled)
    return result


def labeled_ground_truth(labeled: Any, info: DatasetInfo) -> tuple[dict[str, Any], dict[int, str]]:
    """The labeled dataset's ground truth as a COCO dict whose image records name their files, and
    ``{image id: file}``: the ``labeled`` part of a YOLO dataset (``label.yolo_labeled``)."""
    files = [item_file(labeled, i) for i in range(len(labeled))]
    if any(f is None for f in files):
        raise ConfigError("label.yolo_labeled: the labeled dataset's items have no image files to link; "
                          "set label.yolo_labeled=false")
    builder = CocoGroundTruthBuilder(info.categories)
    for i, f in enumerate(files):
        t = get_target(labeled, i)
        builder.add(i, *t["size"], t, file_name=f)
    return builder.to_dict(), dict(enumerate(files))


def write_pseudo_yolo(pseudo_path: Path, out: Path, info: DatasetInfo, cfg: LabelConfig, labeled: Any) -> Path:
    """``label.format: yolo | both``: the pseudo-labels (and with ``yolo_labeled`` the labeled set) as a YOLO
    dataset in ``out``; returns its ``data.yaml``."""
    pseudo = json.loads(pseudo_path.read_text())
    merged: dict[str, Any] = {}
    if cfg.yolo_labeled:
        merged["labeled"], merged["labeled_paths"] = labeled_ground_truth(labeled, info)
    return write_yolo_dataset(pseudo, None, out, info=info, images=cfg.yolo_images, **merged)


def label_dataset(task: Any, teacher: Teachers, info: DatasetInfo, unlabeled: Any, labeled: Any,
                  label_cfg: Mapping[str, Any] | LabelConfig, out_dir: str | Path, *,
                  teacher_checkpoint: Checkpoints = None, device: str | torch.device = "cpu",
                  worker: tuple[int, int] | None = None, max_shards: int | None = None,
                  progress: bool = False, registry: Any = None, strategies: Strategies | None = None,
                  seed: int = 0) -> LabelResult:
    """Pseudo-label ``unlabeled`` with ``teacher`` and write everything into ``out_dir`` (the stage folder).

    Args:
        task: the teacher's task (``ddkit.engine.task.Task``).
        teacher: the teacher model (put in eval mode here), or a list of teachers whose predictions of every view
            are ensembled together.
        info: the labeled set's dataset info (categories, keypoints).
        unlabeled: a dataset (e.g. ``Splits.unlabeled``, a :class:`HiddenLabels` view whose hidden labels give the
            quality report), a :class:`Source`, or ``None`` with ``label.images`` / ``label.coco`` set.
        labeled: the labeled dataset whose statistics count matching matches.
        label_cfg: the ``label`` section (see :class:`LabelConfig`).
        out_dir: where ``shards/``, ``pseudo_labels.json``, ``summary.json``, ... go.
        teacher_checkpoint: its path (their paths), for the provenance (sha256).
        worker: ``(i, n)``: label only the shards ``s % n == i`` and return without selecting (``--shard i/n``).
            Under ``torchrun`` (``WORLD_SIZE > 1``) the rank is the worker and rank 0 selects.
        max_shards: stop after labelling this many shards (returns ``complete=False``; re-run to resume).
    """
    cfg = parse_label_config(label_cfg)
    timer = Timer()
    sharded = label_stage(task, teacher, info, unlabeled, cfg, out_dir, teacher_checkpoint=teacher_checkpoint,
                          device=device, worker=worker, max_shards=max_shards, progress=progress,
                          registry=registry, strategies=strategies, timer=timer, seed=seed)
    if not sharded.complete:
        return LabelResult(out_dir=Path(out_dir), complete=False, shards_done=sharded.shards_done,
                           timing=timer.to_dict())
    t1 = time.perf_counter()
    result = select_stage(sharded, task, info, labeled, cfg, out_dir, registry=registry, timer=timer)
    timer.seconds["merge_total"] += time.perf_counter() - t1
    result.shards_done = sharded.shards_done
    result.timing = timer.to_dict()
    atomic_write_json(Path(out_dir) / "timing.json", result.timing)
    return result


def _label_device(run: Mapping[str, Any]) -> torch.device:
    """The recipe's device; under torchrun a CUDA device is this process's GPU (``LOCAL_RANK``)."""
    device = resolve_device(run.get("device", "cpu"))
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def _recipe_label_config(cfg: Any, keep_raw: bool | None, source: str) -> LabelConfig:
    from omegaconf import OmegaConf

    section = OmegaConf.to_container(cfg.get("label"), resolve=True) if cfg.get("label") is not None else {}
    if keep_raw is not None:
        section["keep_raw"] = bool(keep_raw)
    return parse_label_config(section, where=f"{source}: label")


def _quality_possible(cfg: Any, lcfg: LabelConfig) -> bool:
    """Whether the images to label can have hidden ground truth (a COCO file, or the data's unlabeled split)."""
    from omegaconf import OmegaConf

    data_cfg = OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") is not None else {}
    has_unlabeled = bool(data_cfg.get("unlabeled")) or bool((data_cfg.get("split") or {}).get("unlabeled"))
    return lcfg.coco is not None or (lcfg.images is None and has_unlabeled)


def _filled(block: Mapping[str, Any], registry: Any) -> dict[str, Any]:
    entry, params = registry.params("models", block)
    return {"name": entry.spec.name, **params}


def _ignored_model_keys(cfg: Any, model: nn.Module, registry: Any, checkpoint: Any, source: str) -> Any:
    """``teacher.model`` with ``teacher.checkpoint``: the teacher is rebuilt from the checkpoint's own ``model_cfg``,
    so keys set otherwise are not used. Warn in one line naming them; returns the recipe to save, whose
    ``teacher.model`` holds the values used (the checkpoint's) for those keys."""
    from omegaconf import OmegaConf

    from ddkit.engine.task import model_info
    from ddkit.registry import _to_plain

    block = _to_plain((cfg.get("teacher") or {}).get("model"))
    if not isinstance(block, dict) or "name" not in block:
        return cfg
    ours, used = _filled(block, registry), _filled(model_info(model)[0], registry)
    keys = [k for k in block if not str(k).startswith("pretrained") and ours.get(k) != used.get(k)]
    if not keys:
        return cfg
    log.warning("%s: teacher.model %s ignored: the teacher is rebuilt from teacher.checkpoint %s as it was "
                "trained (%s); label/config.yaml records the values used", source,
                ", ".join(f"{k}={ours.get(k)!r}" for k in keys), checkpoint,
                ", ".join(f"{k}={used.get(k)!r}" for k in keys))
    saved = OmegaConf.to_container(cfg, resolve=True)
    saved["teacher"]["model"] = {**block, **{k: used.get(k) for k in keys}}
    return OmegaConf.create(saved)


def _checked_source(lcfg: LabelConfig, unlabeled: Any, info: DatasetInfo, source: str) -> Source:
    """The images to label (``label.images``, ``label.coco`` or the data's unlabeled part), checked to exist and to
    hold images before anything is written."""
    try:
        src = make_source(lcfg, unlabeled, info)
        check_not_empty(src, lcfg)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return src


def weights_route(source: str, weights: str = "FILE") -> str:
    """How to label with weights that are not a ddkit checkpoint (a plain state dict): make them a teacher first."""
    return (f"make it a teacher first: ddkit train {source} --stage teacher teacher.model.pretrained={weights} "
            f"teacher.train.iterations=0, then ddkit label with the same run.out_dir (its teacher/ is used) or "
            f"teacher.checkpoint=OUT_DIR/teacher; ddkit label ignores teacher.model.pretrained")


def run_label(cfg: Any, run_dir: str | Path | None = None, keep_raw: bool | None = None,
              worker: tuple[int, int] | None = None, max_shards: int | None = None, progress: bool = False,
              registry: Any = None, source: str = "recipe", lock: RunLock | None = None) -> LabelResult:
    """Run the labelling stage of a loaded recipe (what ``ddkit label`` does): validate everything, load the
    teacher and the data, build every strategy, then label (nothing is read before the recipe is known good).
    ``lock``: the command's (:mod:`ddkit.engine.run_lock`), taken on the label folder before its first write."""
    from ddkit.config import save_config, validate_config
    from ddkit.engine.defaults import with_defaults
    from ddkit.engine.checkpoint import load_model
    from ddkit.engine.data import build_data
    from ddkit.engine.environment import save_environment
    from ddkit.registry import _to_plain

    if registry is None:
        from ddkit.plugin_manager import get_registry

        registry = get_registry()
    validate_config(cfg, registry, source=source)
    lcfg = _recipe_label_config(cfg, keep_raw, source)
    run = cfg.get("run") or {}
    out_root = Path(run_dir if run_dir is not None else run.get("out_dir") or "runs/label")
    teacher_path = (cfg.get("teacher") or {}).get("checkpoint")
    if not teacher_path and (out_root / "teacher" / "model.pt").is_file():  # `ddkit train --stage teacher` wrote it
        teacher_path = str(out_root / "teacher")
    if not teacher_path:
        weights = ((cfg.get("teacher") or {}).get("model") or {}).get("pretrained")
        route = f"; to label with weights in a plain state dict, {weights_route(source, weights)}" \
            if isinstance(weights, str) else ""
        raise ConfigError(f"{source}: teacher.checkpoint is required (a model.pt or a run folder); without it the "
                          f"teacher `ddkit train --stage teacher` wrote is used, but {out_root / 'teacher'} holds "
                          f"none{route}")
    device = _label_device(run)
    rank = int(os.environ.get("RANK", "0")) if worker is None else 0
    sel_block, selector = build_selector(lcfg, registry, where=f"{source}: label")
    if cfg.get("data") is None and getattr(selector, "needs_labeled_stats", False):
        raise ConfigError(f"{source}: selector {sel_block['name']!r} matches the labeled set's counts; "
                          f"the recipe needs a data section with the labeled set")
    task, model, info = load_model(teacher_path, device="cpu", registry=registry,
                                   plain_hint=weights_route(source, str(teacher_path)))
    if cfg.get("task") is not None:
        want = strategy_block(cfg.task)["name"]
        if want != task.name:
            raise ConfigError(f"{source}: task {want!r} does not match the teacher checkpoint's task {task.name!r}")
    # every strategy is built before the data: a dataset may read (verify) its images when it is built
    strategies = build_strategies(lcfg, task, info, registry, where=f"{source}: label",
                                  need_single=lcfg.quality is not False and _quality_possible(cfg, lcfg))
    splits = build_data(cfg.data, registry=registry, where=f"{source}: data") if cfg.get("data") is not None \
        else None
    checkpoint = resolve_checkpoint(teacher_path)
    if splits is not None:  # the pseudo-labels carry the teacher's ids; the student reads them as the data's
        check_classes(info.categories, splits.info.categories, f"teacher.checkpoint {checkpoint}",
                      f"{source}: {data_where(_to_plain(cfg.data))}",
                      "label with a teacher trained on this data's classes (same ids and names)", our_side="teacher")
    recorded = _ignored_model_keys(cfg, model, registry, checkpoint, source)
    unlabeled = _checked_source(lcfg, None if splits is None else splits.unlabeled, info, source)
    if rank == 0:
        if lock is not None:
            lock.acquire(out_root / "label")
        save_config(with_defaults(recorded, registry), out_root / "label")  # the full recipe, every default
        save_environment(_to_plain(cfg), registry, out_root / "label")
    return label_dataset(task, model, info, unlabeled,
                         None if splits is None else splits.labeled, lcfg, out_root / "label",
                         teacher_checkpoint=checkpoint, device=device, worker=worker,
                         max_shards=max_shards, progress=progress, registry=registry, strategies=strategies,
                         seed=int(run.get("seed", 0) or 0))
