"""The trainer: one loop for every task, teacher or student, single process or DDP (torchrun).

Python API (the end-to-end runner calls it)::

    result = train_model(task, model, [labeled, pseudo], cfg_train, run_dir, teacher=teacher_ckpt,
                         losses=[{"name": "hard_label"}, {"name": "soft_target", "temperature": 4}],
                         eval_set=test)

What it does:

* iteration-based schedule: SGD or AdamW, linear warmup, LR steps (x ``gamma``) at fractions of the total
  iterations; the total is ``iterations`` (or ``epochs`` over the training data), optionally multiplied by
  ``(labeled + pseudo) / labeled`` (``scale_with_data``, as data distillation lengthens the schedule);
* the :class:`~ddkit.engine.sampler.MixedRatioSampler` mixes labeled and pseudo-labeled samples at ``ratio``;
* a weighted list of loss terms (kind ``losses``), each logged on its own (see :mod:`ddkit.engine.losses`);
* teacher logits can be cached per sample (``teacher_cache: true``, :mod:`ddkit.engine.teacher_cache`);
* determinism: the global RNG is re-seeded from ``(seed, rank, iteration)`` at every iteration and the sampler is
  a pure function of the step, so a fixed seed gives the same run on CPU and ``resume`` continues a stopped run to
  exactly the weights and metrics of an uninterrupted one;
* resume refuses a checkpoint whose recipe (train block, losses, model, seed) or inputs (training data, teacher)
  differ in a way that changes the result, and says which harmless keys (logging, cadence, ``max_iterations``)
  changed;
* checkpoints every ``checkpoint_every`` iterations and at the end, atomically (model, optimizer, scheduler,
  AMP scaler, sampler, RNG, loss terms' adapters, the log window), loadable with ``weights_only=True``; at the end
  also ``model.pt`` (student-only weights, :func:`~ddkit.engine.checkpoint.load_model` rebuilds it);
* ``metrics.jsonl`` (one JSON object per line: training logs, evaluations, the final record), ``metrics.csv`` (the
  training logs as a table with fixed columns) and ``train.log``;
* AMP (float16 autocast + GradScaler) when on CUDA unless ``amp: false``;
* an exponential moving average of the weights (``ema_decay``, Ultralytics' ramp), evaluated and saved as the
  model (:mod:`ddkit.engine.ema`);
* DDP when ``torch.distributed`` is initialised (``torchrun``; gloo on CPU, NCCL on GPU): ``batch_size`` is the
  global batch, split over ranks; rank 0 writes files and evaluates.

The loop itself is :class:`~ddkit.engine.trainer.Trainer` with the hooks of :mod:`ddkit.engine.hooks`; this
module builds its parts.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ddkit.engine.amp import Amp
from ddkit.engine.as_built import check_as_built
from ddkit.engine.augment import Augment, mix_seed, shift_image
from ddkit.engine.classes import check_classes, data_where
from ddkit.engine.checkpoint import LAST, load_checkpoint, load_model, resolve_checkpoint
from ddkit.engine.data import ConcatDataset, TransferOnly, get_info
from ddkit.engine.ddp import DDP
from ddkit.engine.evaluate import check_same_classes
from ddkit.engine.ema import EMAHook
from ddkit.engine.hooks import CheckpointHook, EvalHook, FinalHook, LogHook, RunLog, TrainingDiverged, describe_run
from ddkit.engine.keypoint_meta import check_train_flip
from ddkit.engine.losses import SetupContext
from ddkit.engine.resume import (check_finished, check_resume, clean_stale_temp, recipe_record, refuse_fresh_start,
                                 resume_changes)
from ddkit.engine.run_lock import RunLock
from ddkit.engine.sampler import MixedRatioSampler
from ddkit.engine.task import Task, model_info, unwrap_model
from ddkit.engine.teacher_cache import TeacherCache, TeacherOutputs, _Indexed, dataset_fingerprint
from ddkit.engine.train_config import TrainConfig, lr_factor, parse_train_config, total_iterations
from ddkit.engine.trainer import StepParts, Trainer
from ddkit.errors import ConfigError
from ddkit.io import file_sha256
from ddkit.runtime import dist_info, resolve_device, state_sha256
from ddkit.types import DatasetInfo

__all__ = ["TrainConfig", "TrainingDiverged", "TeacherCache", "lr_factor", "parse_train_config", "resume_changes",
           "run_train", "shift_image", "stage_run_dir", "total_iterations", "train_model", "resolve_device"]

log = logging.getLogger("ddkit.train")


def _samples(batch: list[Any]) -> list[Any]:  # DataLoader collate_fn: keep the list; the task collates later
    return batch


# ------------------------------------------------------------------------------------------------ the parts
@dataclass
class _Data:
    """The training sources mixed by the sampler, and the schedule length they imply."""

    concat: Any
    sizes: list[int]
    total: int
    stop: int
    per_rank: int
    sampler: MixedRatioSampler

    @classmethod
    def build(cls, cfg: TrainConfig, train_sets: Any, seed: int, rank: int, world: int) -> "_Data":
        sets = list(train_sets) if isinstance(train_sets, (list, tuple)) else [train_sets]
        sets = [s for s in sets if s is not None]
        if not sets or len(sets[0]) == 0:
            raise ConfigError("train_model: the labeled training set is empty")
        info = get_info(sets[0])
        for s in sets[1:]:
            if get_info(s).categories != info.categories:
                raise ConfigError("train_model: the pseudo-labeled set's categories differ from the labeled set's")
        sizes = [len(s) for s in sets]
        total = total_iterations(cfg, sizes)
        stop = total if cfg.max_iterations is None else min(total, cfg.max_iterations)
        if cfg.batch_size % world:
            raise ConfigError(f"train.batch_size {cfg.batch_size} is not divisible by the {world} DDP processes")
        per_rank = cfg.batch_size // world
        sampler = MixedRatioSampler(sizes, per_rank, ratio=cfg.ratio if len(sizes) > 1 else None, seed=seed,
                                    rank=rank, world_size=world)
        return cls(ConcatDataset(sets), sizes, total, stop, per_rank, sampler)


def _build_losses(losses: Sequence[Any] | None) -> tuple[list[Any], list[str]]:
    from ddkit.plugin_manager import get_registry
    from ddkit.registry import _to_plain

    specs = _to_plain(losses) if losses is not None else [{"name": "hard_label"}]
    if not isinstance(specs, list) or not specs:
        raise ConfigError("losses must be a non-empty list of loss blocks, e.g. [{name: hard_label}]")
    terms, names = [], []
    registry = get_registry()
    for i, block in enumerate(specs):
        if not isinstance(block, dict):  # an already built term
            term, name = block, type(block).__name__.lower()
        else:
            term = registry.build("losses", block, where=f"losses[{i}]")
            name = block["name"]
        base, k = name, 1
        while name in names:
            name = f"{base}_{k}"
            k += 1
        terms.append(term)
        names.append(name)
    return terms, names


def _load_teacher(teacher: nn.Module | str | Path | None, teacher_sha: str | None,
                  dev: torch.device) -> tuple[nn.Module | None, str | None]:
    """The frozen teacher on ``dev`` and its digest (the checkpoint file's sha256, or ``teacher_sha``)."""
    if isinstance(teacher, (str, Path)):
        path = Path(teacher)
        _, teacher, _ = load_model(path, device=dev)
        teacher_sha = teacher_sha or file_sha256(resolve_checkpoint(path))
    if teacher is not None:
        teacher = teacher.to(dev).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    return teacher, teacher_sha


def _init_from_teacher(student: nn.Module, teacher: nn.Module | None) -> None:
    if teacher is None:
        raise ConfigError("train.init: teacher needs a teacher")
    try:
        unwrap_model(student).load_state_dict(unwrap_model(teacher).state_dict())
    except RuntimeError as err:
        raise ConfigError(f"train.init: teacher: the student's architecture differs from the teacher's: "
                          f"{str(err).splitlines()[0]}") from None


def _setup_extras(task: Task, student: nn.Module, teacher: nn.Module | None, terms: list[Any], data: _Data,
                  dev: torch.device) -> nn.ModuleList:
    """Each term's trainable extras (hint adapters), shaped by a dry batch; ``nn.Identity`` for the others."""
    dry = task.to_device(task.collate([_Indexed(data.concat)[i]
                                       for i in data.sampler.batch(0)[: min(data.per_rank, 4)]]), dev)
    setup_ctx = SetupContext(task, student, teacher, dry, dev, data.total)
    extras = nn.ModuleList()
    for term in terms:
        setup = getattr(term, "setup", None)
        module = setup(setup_ctx) if setup is not None else None
        extras.append(module if module is not None else nn.Identity())
    return extras.to(dev)


def _zero_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter a momentum buffer (zeros) before its first step: torch's fused SGD fails on a step
    where some parameters have buffers and others not yet (a term that joins later, as after a hint stage). Zeros
    give the same update: with no dampening the first step's buffer is ``momentum * 0 + grad = grad`` either way."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))


def _optimizer(cfg: TrainConfig, params: list[torch.Tensor], total: int) -> tuple[torch.optim.Optimizer, Any]:
    if not params:
        raise ConfigError("the model has no trainable parameters")
    # None leaves the choice to torch (its default step); fused kernels exist for float parameters on CPU and CUDA
    fusable = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    fused = True if cfg.fused and fusable else None
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                    weight_decay=cfg.weight_decay, fused=fused)
        if fused and cfg.momentum:
            _zero_momentum(optimizer)
            optimizer.register_load_state_dict_post_hook(_zero_momentum)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                      fused=fused)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, total, cfg))


def _check_teacher_classes(teacher: nn.Module | None, terms: Sequence[Any], names: Sequence[str],
                           info: DatasetInfo, labels_transfer: bool = False) -> None:
    """Terms that read the teacher's predictions, and a transfer set whose unlabeled images take the teacher's
    boxes (``labels_transfer``), need a teacher of the data's classes, ids and names (a 10-class teacher on 5-class
    data crashed mid-training; the same count under other names trained silently mismatched). A hint reads features
    only, so any teacher may serve it."""
    reading = [names[i] for i, t in enumerate(terms) if getattr(t, "teacher_outputs", "none") in ("logits", "model")]
    if teacher is None or not (reading or labels_transfer) or not hasattr(unwrap_model(teacher), "ddkit_info"):
        return  # a plain module (the Python API): its classes are unknown
    what = f"loss terms {reading}" if reading else "the transfer set's boxes"
    check_same_classes(model_info(teacher)[1], info, "the teacher", f"the training data ({what})",
                       fix="give a teacher trained on these classes")


def _transfer_labeller(task: Task, data: "_Data") -> Callable[[nn.Module, Any], Any] | None:
    """The task's ``teacher_targets`` (asked of the task plugin) where the training data holds a transfer set's
    unlabeled items for it to label, else None."""
    label = getattr(task, "teacher_targets", None)
    holds = any(isinstance(d, TransferOnly) for d in data.concat.datasets)
    return label if callable(label) and holds else None


def _needs_teacher(terms: Sequence[Any]) -> list[int]:
    """Indices of the terms that read the teacher (asked of each term, any plugin's)."""
    return [i for i, t in enumerate(terms) if getattr(t, "teacher_outputs", "none") != "none"]


def _teacher_cache(cfg: TrainConfig, task: Task, teacher: nn.Module | None, terms: list[Any], data: _Data,
                   sha: str | None, run_dir: Path, dev: torch.device, progress: bool,
                   rank: int, fingerprint: str) -> TeacherCache | None:
    if not (cfg.teacher_cache and teacher is not None
            and any(getattr(t, "teacher_outputs", "") == "logits" for t in terms)):
        return None
    cache_dir = Path(cfg.teacher_cache_dir) if cfg.teacher_cache_dir else run_dir / "teacher_cache"
    return TeacherCache.build(task, teacher, _Indexed(data.concat), sha or state_sha256(teacher), cache_dir,
                              cfg.evaluation_batch_size, dev, progress, rank, fingerprint=fingerprint)


def check_cache_config(cfg: TrainConfig, teacher: nn.Module | None, terms: list[Any]) -> None:
    """A teacher-output cache with random augmentation would feed the terms outputs of other images."""
    uses_cache = cfg.teacher_cache and teacher is not None and any(getattr(t, "teacher_outputs", "") == "logits"
                                                                   for t in terms)
    if uses_cache and (cfg.hflip > 0 or cfg.translate > 0):
        raise ConfigError("train.teacher_cache is only valid without random augmentation: the cached teacher "
                          "outputs are for the unaugmented images; set hflip: 0, translate: 0 or teacher_cache: false")


# ---------------------------------------------------------------------------------------------------- resume
def _resume_state(resume: bool, last: Path, recipe: dict[str, Any], inputs: dict[str, Any], total: int,
                  dev: torch.device) -> tuple[dict[str, Any] | None, list[str]]:
    """The checkpoint to continue from (checked: it fits this run) and the harmless changes; writes nothing."""
    if not (resume and last.is_file()):
        return None, []
    state = load_checkpoint(last, map_location=dev, fresh_hint="delete it or start fresh with --force")
    return state, check_resume(last, state, recipe, inputs, total)


def _start(trainer: Trainer, state: dict[str, Any] | None, harmless: list[str], last: Path) -> int:
    """Load the checked checkpoint (the iteration to continue from) or start over; align metrics.jsonl."""
    runlog = trainer.runlog
    if state is None:
        runlog.reset()
        return 0
    if harmless:
        runlog(f"resuming with changed {'; '.join(harmless)} (does not change the result)")
    start = trainer.load_state_dict(state)
    runlog.truncate(start)
    runlog(f"resumed from {last} at iteration {start}/{trainer.total}")
    return start


# ------------------------------------------------------------------------------------------------------ trainer
def train_model(task: Task, model: nn.Module, train_sets: Any, cfg_train: Mapping[str, Any] | TrainConfig | None,
                run_dir: str | Path, *, teacher: nn.Module | str | Path | None = None,
                losses: Sequence[Any] | None = None, eval_set: Any = None, resume: bool = False, seed: int = 0,
                device: str | torch.device | None = "auto", progress: bool | None = None,
                teacher_sha: str | None = None, on_start: Callable[[], None] | None = None) -> dict[str, Any]:
    """Train ``model`` (built by ``task.build_model``) and return a summary.

    Args:
        task: the task object.
        model: the student (or teacher being trained); trained in place.
        train_sets: one labeled dataset, or ``[labeled, pseudo_labeled, ...]`` mixed at ``cfg_train.ratio``.
        cfg_train: the ``train:`` block (see :class:`TrainConfig`).
        run_dir: the run folder (checkpoints, metrics.jsonl, train.log, model.pt).
        teacher: a teacher model or checkpoint path, for KD terms and ``init: teacher``.
        losses: loss blocks (``[{name: hard_label}, {name: soft_target, temperature: 4, weight: 1}]``) or built
            terms; default: hard_label only.
        eval_set: evaluated every ``eval_every`` iterations and at the end.
        resume: continue from ``run_dir/checkpoints/last.pt`` if it exists (refused when the recipe or the
            inputs changed in a way that changes the result).
        seed: the run's seed (``cfg_train.seed`` wins when set).
        device: ``auto`` = CUDA when available, else CPU.
        progress: tqdm bars (default: when stderr is a terminal).
        teacher_sha: the teacher-cache key when ``teacher`` is a module (default: a digest of its weights).
        on_start: called once everything is built and the resume check passed, before anything is written.

    Returns:
        ``{"run_dir", "checkpoint", "model_path", "iterations", "total_iterations", "finished", "metrics",
        "train_time_s", "samples_per_s", "losses"}`` (``metrics``: the last evaluation, if any).
    """
    cfg = parse_train_config(cfg_train)
    rank, world = dist_info()
    seed = cfg.seed if cfg.seed is not None else int(seed)
    dev = resolve_device(device)
    run_dir, is_main = Path(run_dir), rank == 0
    progress = (sys.stderr.isatty() if progress is None else progress) and is_main
    data = _Data.build(cfg, train_sets, seed, rank, world)
    augment = Augment(task, get_info(data.concat), cfg.hflip, cfg.translate, seed, rank)
    trainer, recipe, inputs = _build_trainer(task, model, data, cfg, augment, teacher, teacher_sha, losses,
                                             eval_set, seed, rank, world, dev, run_dir, progress, resume)
    last = run_dir / "checkpoints" / LAST
    state, harmless = _resume_state(resume, last, recipe, inputs, data.total, dev)
    if on_start is not None:
        on_start()
    if is_main:  # nothing is written before the data, the models, the terms and the resume check passed
        run_dir.mkdir(parents=True, exist_ok=True)
        clean_stale_temp(run_dir / "checkpoints")
    start = _start(trainer, state, harmless, last)
    if cfg.init == "teacher" and resume and start == 0:  # asked to resume, but nothing to resume from
        _init_from_teacher(trainer.student, trainer.parts.teacher)
    trainer.parts.teacher_outputs.cache = _teacher_cache(cfg, task, trainer.parts.teacher, trainer.parts.terms,
                                                         data, inputs.get("teacher"), run_dir, dev, progress, rank,
                                                         inputs["data"])
    trainer.train(start, data.stop)
    trainer.ddp.barrier()
    trainer.student.eval()
    cp, mp = trainer.checkpoint_path, trainer.model_path
    return {"run_dir": str(run_dir), "checkpoint": str(cp) if cp else None,
            "model_path": str(mp) if mp else None, "iterations": data.stop,
            "total_iterations": data.total, "finished": data.stop >= data.total, "metrics": trainer.metrics,
            "train_time_s": trainer.train_time,
            "samples_per_s": (data.stop - start) * cfg.batch_size / max(trainer.train_time, 1e-9),
            "losses": trainer.parts.names}


def _build_trainer(task: Task, model: nn.Module, data: _Data, cfg: TrainConfig, augment: Augment, teacher: Any,
                   teacher_sha: str | None, losses: Any, eval_set: Any, seed: int, rank: int, world: int,
                   dev: torch.device, run_dir: Path, progress: bool,
                   resume: bool) -> tuple[Trainer, dict[str, Any], dict[str, Any]]:
    """The models, loss terms, optimizer and hooks, built in the order that fixes the RNG calls (the student's
    init seed, the teacher, the terms' adapters)."""
    torch.manual_seed(mix_seed(seed, "init"))
    teacher, teacher_sha = _load_teacher(teacher, teacher_sha, dev)
    terms, names = _build_losses(losses)
    if teacher is None and _needs_teacher(terms):
        needing = [names[i] for i in _needs_teacher(terms)]
        raise ConfigError(f"the loss terms {needing} need a teacher; give a teacher checkpoint")
    if cfg.init == "teacher" and teacher is None:
        raise ConfigError("train.init: teacher needs a teacher")
    labeller = _transfer_labeller(task, data)
    if labeller is not None and teacher is None:
        raise ConfigError("the transfer set's unlabeled images take the teacher's boxes; give a teacher checkpoint")
    _check_teacher_classes(teacher, terms, names, get_info(data.concat), labeller is not None)
    check_cache_config(cfg, teacher, terms)
    student = model.to(dev)
    if cfg.init == "teacher" and not resume:  # a resumed run may also start fresh: init again after the resume
        _init_from_teacher(student, teacher)
    student.train()
    # copied before the loss terms hook the layers they read: the average must not carry a hint's forward hooks
    averaging = [EMAHook(student, cfg.ema_decay, cfg.ema_tau)] if cfg.ema_decay > 0 else []
    extras = _setup_extras(task, student, teacher, terms, data, dev)
    student.train()
    params = [p for p in student.parameters() if p.requires_grad] + list(extras.parameters())
    optimizer, scheduler = _optimizer(cfg, params, data.total)
    parts = StepParts(task, student, terms, names, extras, optimizer, scheduler, data.sampler, Amp(dev, cfg.amp),
                      DDP(world, dev), teacher, TeacherOutputs(teacher, terms), augment, labeller)
    inputs = {"data": dataset_fingerprint(data.concat),
              "teacher": teacher_sha or (state_sha256(teacher) if teacher is not None else None)}
    recipe = recipe_record(cfg, losses, student, seed)
    runlog = RunLog(run_dir, rank == 0, names)
    loader = torch.utils.data.DataLoader(_Indexed(data.concat), batch_sampler=data.sampler,
                                         num_workers=cfg.num_workers, collate_fn=_samples,
                                         pin_memory=dev.type == "cuda", persistent_workers=False)
    trainer = Trainer(parts, cfg, data.total, seed, rank, dev, loader, runlog=runlog,
                      static={"train_cfg": dataclasses.asdict(cfg), "loss_names": list(names), "recipe": recipe,
                              "inputs": inputs})
    evaluator = EvalHook(runlog, eval_set, cfg.eval_every, cfg.evaluation_batch_size)
    ema = f"; an EMA of the weights (decay {cfg.ema_decay}, tau {cfg.ema_tau})" if averaging else ""
    describe = (lambda: describe_run(task, student, data.total, cfg.batch_size, world, dev, data.sizes,
                                     cfg.ratio, names, trainer.start) + ema)
    # the average takes each step before an evaluation or a checkpoint of that step
    trainer.register_hooks([LogHook(runlog, cfg.log_every, progress, describe), *averaging, evaluator,
                            CheckpointHook(runlog, run_dir / "checkpoints", cfg.checkpoint_every),
                            FinalHook(runlog, run_dir / "model.pt", evaluator.evaluate if eval_set is not None
                                      else None)])
    return trainer, recipe, inputs


# ------------------------------------------------------------------------------------------------ recipe level
SECTION_KEYS = {
    "teacher": {"model", "train", "losses", "checkpoint", "ensemble"},
    "student": {"model", "train", "losses", "pseudo_labels", "teacher"},
}


def stage_run_dir(cfg: Any, stage: str) -> Path:
    """``<run.out_dir>/<stage>`` (``run.out_dir`` defaults to ``runs/<run.name>``)."""
    run = cfg.get("run") or {}
    out = run.get("out_dir") or f"runs/{run.get('name') or 'ddkit'}"
    return Path(out) / stage


def _section(cfg: Any, stage: str | None, source: str) -> tuple[str, dict[str, Any]]:
    """The stage to train and its section, checked: a ``model`` block, no unknown key."""
    from ddkit.registry import _to_plain

    if stage is None:
        stage = "teacher" if cfg.get("teacher") and cfg.teacher.get("model") is not None else "student"
    if stage not in SECTION_KEYS:
        raise ConfigError(f"stage must be teacher or student, got {stage!r}")
    section = _to_plain(cfg.get(stage)) or {}
    if "model" not in section:
        raise ConfigError(f"{source}: section {stage!r} needs a 'model' block (e.g. model: {{name: mlp}})")
    unknown = set(section) - SECTION_KEYS[stage]
    if unknown:
        raise ConfigError(f"{source}: {stage}: unknown key {sorted(unknown)[0]!r}. Valid keys: "
                          f"{', '.join(sorted(SECTION_KEYS[stage]))}")
    if cfg.get("task") is None or cfg.get("data") is None:
        raise ConfigError(f"{source}: ddkit train needs the sections 'task' and 'data'")
    return stage, section


def _finished_run(run_dir: Path) -> dict[str, Any] | None:
    """The summary of a finished run in ``run_dir`` (its ``model.pt`` and final record), or None."""
    import json

    model = run_dir / "model.pt"
    if not model.is_file():
        return None
    final: dict[str, Any] = {}
    metrics = run_dir / "metrics.jsonl"
    for line in (metrics.read_text().splitlines() if metrics.is_file() else []):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        final = rec if rec.get("final") else final
    last = run_dir / "checkpoints" / LAST
    return {"run_dir": str(run_dir), "model_path": str(model), "checkpoint": str(last) if last.is_file() else None,
            "iterations": final.get("iteration"), "total_iterations": final.get("iteration"), "finished": True,
            "metrics": final.get("eval") or {}, "skipped": True}


def _pseudo_set(section: Mapping[str, Any], splits: Any, run_dir: Path, data_src: str = "data") -> Any:
    """The pseudo-labeled set; its classes (ids and names) must be the labeled data's: labels pass on by id."""
    from ddkit.engine.pseudo import load_pseudo_dataset

    pseudo = section["pseudo_labels"]
    path = Path(run_dir.parent / "label" / "pseudo_labels.json") if pseudo == "auto" else Path(pseudo)
    pds = load_pseudo_dataset(path, source=splits.unlabeled)
    pds.check_files()
    check_classes(pds.info.categories, splits.info.categories, f"student.pseudo_labels {path}", data_src,
                  "label the images with a teacher trained on this data's classes, or train the student on the data "
                  "the pseudo-labels were made for", our_side="pseudo-labels")
    pds.info = splits.info
    return pds


def _student_teacher(cfg: Any, section: Mapping[str, Any], tcfg: TrainConfig, registry: Any, source: str,
                     run_dir: Path) -> Any:
    """The teacher checkpoint when a loss term reads the teacher (asked of each term: any plugin's, e.g.
    detector_kd or a third-party KD loss) or the student starts from it; else None."""
    from ddkit.registry import _to_plain

    terms = [registry.build("losses", b, where=f"{source}: student.losses[{i}]")
             for i, b in enumerate(section.get("losses") or [])]
    needs = tcfg.init == "teacher" or bool(_needs_teacher(terms))
    for t in terms:
        getattr(t, "close", lambda: None)()
    if not needs:
        return None
    teacher = section.get("teacher") or (_to_plain(cfg.get("teacher")) or {}).get("checkpoint")
    if teacher is None:
        teacher = run_dir.parent / "teacher"
        if not teacher.exists():
            raise ConfigError(f"{source}: the student's losses need a teacher: set student.teacher (or "
                              f"teacher.checkpoint) to a checkpoint, or train the teacher first ({teacher})")
    return teacher


def _seed(cfg: TrainConfig, run_seed: int) -> int:
    """A stage's seed: ``train.seed`` when set, else the run's (what :func:`train_model` trains with)."""
    return cfg.seed if cfg.seed is not None else int(run_seed)


def _inputs_record(train_sets: Sequence[Any], teacher: str | Path | None) -> dict[str, Any]:
    """What :func:`train_model` records of its inputs (the training data's fingerprint, the teacher's sha256),
    computed without training, for comparing with a checkpoint's record."""
    data = dataset_fingerprint(ConcatDataset([s for s in train_sets if s is not None]))
    return {"data": data, "teacher": file_sha256(resolve_checkpoint(teacher)) if teacher is not None else None}


@dataclass
class _Record:
    """What a stage's run would record: its recipe (train block, losses, model, seed) and inputs."""

    stage: str
    recipe: dict[str, Any]
    inputs: dict[str, Any]


def _earlier_run(run_dir: Path, record: _Record) -> dict[str, Any] | None:
    """Without ``--resume`` / ``--force``: a finished run of the same recipe is the result (returned, nothing to
    do); a finished run of another recipe, or an unfinished run's checkpoint, is refused in one line (how to
    retrain or continue): nothing is silently skipped or overwritten. None: no earlier run to keep."""
    done, last = _finished_run(run_dir), run_dir / "checkpoints" / LAST
    if not last.is_file():
        if done is not None:  # a finished run whose checkpoint was removed: its recipe cannot be compared
            log.warning("ddkit train: %s finished earlier (%s; no checkpoint to compare its recipe with); nothing "
                        "to do. Pass --force to train it again from scratch (replaces model.pt)", run_dir,
                        done["model_path"])
        return done
    state = load_checkpoint(last, fresh_hint="delete it or start fresh with --force")
    if done is None:
        refuse_fresh_start(record.stage, last, state)
    harmless = check_finished(record.stage, run_dir / "model.pt", state, record.recipe, record.inputs)
    log.warning("ddkit train: %s finished earlier (%s) with this recipe%s; nothing to do. Pass --force to train it "
                "again from scratch (replaces model.pt)", run_dir, done["model_path"],
                f" (changed only {'; '.join(harmless)}, which do not change the result)" if harmless else "")
    return done


def run_train(cfg: Any, stage: str | None = None, resume: bool = False, source: str = "recipe",
              device: str | None = None, progress: bool | None = None, registry: Any = None,
              force: bool = False, lock: RunLock | None = None) -> dict[str, Any]:
    """Train the recipe's ``teacher`` or ``student`` section (``ddkit train``).

    The section holds ``model``, ``train`` (see :class:`TrainConfig`) and optionally ``losses``. A student section
    may name ``pseudo_labels`` (a file written by ``ddkit label``; ``auto`` = ``<out_dir>/label/pseudo_labels.json``)
    and ``teacher`` (the teacher checkpoint for KD losses or ``init: teacher``; default ``teacher.checkpoint``, then
    ``<out_dir>/teacher``). The run folder is ``<run.out_dir>/<stage>``.

    The whole recipe is validated and the data and models are built before anything is said or written. Without
    ``resume`` or ``force``, a finished run of the same recipe is returned (nothing to do), and a finished run of
    another recipe or an unfinished run's checkpoint is refused (:func:`_earlier_run`); ``force`` starts fresh.
    ``lock`` (the command's): refuses a folder another command holds before its checkpoint is read, and is taken
    when the run folder is first written.
    """
    from ddkit.config import save_config, validate_config
    from ddkit.engine.defaults import with_defaults
    from ddkit.engine.data import build_data
    from ddkit.engine.environment import save_environment
    from ddkit.registry import _to_plain

    if registry is None:
        from ddkit.plugin_manager import get_registry

        registry = get_registry()
    validate_config(cfg, registry, source=source)
    stage, section = _section(cfg, stage, source)
    run = _to_plain(cfg.get("run")) or {}
    seed = int(run.get("seed", 0) or 0)
    rank, _ = dist_info()
    run_dir = stage_run_dir(cfg, stage)
    lock = lock or RunLock(enabled=False)
    lock.check(run_dir)  # before the folder's checkpoint is read: another command's is not an interrupted run
    tcfg = parse_train_config(section.get("train"), where=f"{source}: {stage}.train")
    task = registry.build("tasks", cfg.task, where=f"{source}: task")
    splits = build_data(cfg.data, registry=registry, where=f"{source}: data")
    if not tcfg.as_built:
        try:
            check_train_flip(splits.info, tcfg.hflip, f"{stage}.train")
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
    torch.manual_seed(mix_seed(_seed(tcfg, seed), "model"))
    try:
        model = task.build_model(section["model"], splits.info)
    except ConfigError as err:
        raise ConfigError(f"{source}: {stage}.model: {err}") from None
    if tcfg.as_built:  # used as its weights build it: no random head
        check_as_built(lambda: task.build_model(section["model"], splits.info), f"{source}: {stage}")
    train_sets, teacher = [splits.labeled], None
    if stage == "student":
        if section.get("pseudo_labels"):
            train_sets.append(_pseudo_set(section, splits, run_dir, f"{source}: {data_where(_to_plain(cfg.data))}"))
        teacher = _student_teacher(cfg, section, tcfg, registry, source, run_dir)
    last = run_dir / "checkpoints" / LAST
    if not (resume or force):  # the recipe is known good: now say what became of this stage's earlier run
        record = _Record(stage, recipe_record(tcfg, section.get("losses"), model, _seed(tcfg, seed)),
                         _inputs_record(train_sets, teacher))
        done = _earlier_run(run_dir, record)
        if done is not None:
            return done
    if resume and not force and not last.is_file():
        log.warning("ddkit train --resume: no checkpoint %s; starting fresh", last)

    def on_start() -> None:  # the recipe, the data, the models and the resume check passed
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire(run_dir)  # refused while another command writes the folder
            save_config(with_defaults(cfg, registry), run_dir)  # the full recipe, every default written
            save_environment(_to_plain(cfg), registry, run_dir)
            if force:
                (run_dir / "model.pt").unlink(missing_ok=True)  # the old result goes; the new one replaces it

    return train_model(task, model, train_sets, tcfg, run_dir, teacher=teacher, losses=section.get("losses"),
                       eval_set=splits.test, resume=resume and not force, seed=seed,
                       device=device or run.get("device", "auto"), progress=progress, on_start=on_start)
