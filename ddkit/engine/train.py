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
* teacher logits can be cached per sample (``teacher_cache: true``): computed once in a pass over the training
  data, stored under a name holding the teacher checkpoint's sha256 (recomputed when it changes). The cache is
  only valid without random augmentation (``hflip: 0``) and serves soft targets, not hint features;
* determinism: the global RNG is re-seeded from ``(seed, rank, iteration)`` at every iteration and the sampler is
  a pure function of the step, so a fixed seed gives the same run on CPU and ``resume`` continues a stopped run to
  exactly the weights and metrics of an uninterrupted one;
* checkpoints every ``checkpoint_every`` iterations and at the end, atomically (model, optimizer, scheduler,
  AMP scaler, sampler, RNG, loss terms' adapters, the log window), loadable with ``weights_only=True``; at the end
  also ``model.pt`` (student-only weights, :func:`~ddkit.engine.checkpoint.load_model` rebuilds it);
* ``metrics.jsonl`` (one JSON object per line: training logs, evaluations, the final record) and ``train.log``;
* AMP (float16 autocast + GradScaler) when on CUDA unless ``amp: false``;
* DDP when ``torch.distributed`` is initialised (``torchrun``; gloo on CPU, NCCL on GPU): ``batch_size`` is the
  global batch, split over ranks; rank 0 writes files and evaluates.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import nn

from ddkit.engine.checkpoint import LAST, load_checkpoint, load_model, resolve_checkpoint, save_checkpoint, save_model
from ddkit.engine.data import ConcatDataset, get_info, get_target
from ddkit.engine.losses import LossContext, SetupContext
from ddkit.engine.sampler import MixedRatioSampler
from ddkit.engine.task import Task, TrainOutputs, model_info, unwrap_model
from ddkit.errors import ConfigError, DDKitError
from ddkit.io import atomic_torch_save, file_sha256
from ddkit.registry import parse_section
from ddkit.runtime import dist_info, resolve_device, state_sha256

log = logging.getLogger("ddkit.train")


class TrainingDiverged(DDKitError):
    """The loss became NaN or infinite."""


# ------------------------------------------------------------------------------------------------ the train block
@dataclass
class TrainConfig:
    """The ``train:`` block of a teacher or student section.

    Attributes:
        iterations: total optimizer steps (before ``scale_with_data``).
        epochs: alternative to ``iterations``: passes over the training data (labeled + pseudo).
        scale_with_data: multiply ``iterations`` by ``(labeled + pseudo) / labeled``.
        max_iterations: stop (with a checkpoint) after this many steps although the schedule is for the full
            length: to split a run in pieces or to test resuming.
        batch_size: global batch (split over DDP ranks).
        optimizer, lr, momentum, nesterov, weight_decay, betas: the optimizer (``sgd`` or ``adamw``).
        warmup, warmup_factor: linear warmup from ``lr * warmup_factor`` over ``warmup`` iterations.
        steps, gamma: multiply the LR by ``gamma`` at each of these fractions of the total iterations.
        clip_grad_norm: clip the global gradient norm (``null``: off).
        amp: mixed precision; ``null`` = on when training on CUDA.
        ratio: labeled : pseudo-labeled samples per minibatch (expected), e.g. ``[6, 4]``.
        hflip: probability of a random horizontal flip of a training sample (boxes and keypoints too).
        translate: shift each training image by a random whole number of pixels in ``[-translate, translate]``
            on each axis, zero fill (classification only: small images such as digits).
        init: the student's initial weights: ``scratch`` or ``teacher`` (copy the teacher's weights).
        teacher_cache: cache teacher logits per sample (see the module docstring); ``teacher_cache_dir`` where.
        checkpoint_every, eval_every, log_every: in iterations (0 = only at the end).
        eval_batch_size: batch size of evaluation and of the teacher-cache pass (0 = ``batch_size``).
        num_workers: DataLoader worker processes.
        seed: overrides ``run.seed`` for this training.
    """

    iterations: int = 1000
    epochs: float | None = None
    scale_with_data: bool = False
    max_iterations: int | None = None
    batch_size: int = 32
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup: int = 0
    warmup_factor: float = 0.001
    steps: list[float] = field(default_factory=list)
    gamma: float = 0.1
    clip_grad_norm: float | None = None
    amp: bool | None = None
    ratio: list[float] = field(default_factory=lambda: [6.0, 4.0])
    hflip: float = 0.0
    translate: int = 0
    init: Literal["scratch", "teacher"] = "scratch"
    teacher_cache: bool = False
    teacher_cache_dir: str | None = None
    checkpoint_every: int = 0
    eval_every: int = 0
    log_every: int = 50
    eval_batch_size: int = 0
    num_workers: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.iterations >= 1, f"iterations must be >= 1, got {self.iterations}"),
            (self.epochs is None or self.epochs > 0, f"epochs must be > 0, got {self.epochs}"),
            (self.max_iterations is None or self.max_iterations >= 0, "max_iterations must be >= 0"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (len(self.betas) == 2, f"betas must be two numbers, got {self.betas}"),
            (self.warmup >= 0 and 0 < self.warmup_factor <= 1, "need warmup >= 0 and 0 < warmup_factor <= 1"),
            (all(0 < s < 1 for s in self.steps) and list(self.steps) == sorted(self.steps),
             f"steps must be increasing fractions in (0, 1) of the iterations, got {self.steps}"),
            (0 < self.gamma <= 1, f"gamma must be in (0, 1], got {self.gamma}"),
            (self.clip_grad_norm is None or self.clip_grad_norm > 0, "clip_grad_norm must be > 0 or null"),
            (len(self.ratio) >= 1 and all(r >= 0 for r in self.ratio) and sum(self.ratio) > 0,
             f"ratio must be non-negative weights, got {self.ratio}"),
            (0 <= self.hflip <= 1, f"hflip must be a probability, got {self.hflip}"),
            (self.translate >= 0, f"translate must be >= 0 pixels, got {self.translate}"),
            (min(self.checkpoint_every, self.eval_every, self.log_every, self.eval_batch_size,
                 self.num_workers) >= 0, "checkpoint_every, eval_every, log_every, eval_batch_size, num_workers "
                                         "must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def parse_train_config(block: Mapping[str, Any] | TrainConfig | None, where: str = "train") -> TrainConfig:
    """Validate a ``train:`` block: an unknown key names the valid keys, a bad value names its key."""
    return parse_section(TrainConfig, block, where)


def lr_factor(iteration: int, total: int, cfg: TrainConfig) -> float:
    """The LR multiplier at ``iteration`` (0-based): linear warmup, then ``gamma`` per passed step fraction."""
    factor = 1.0
    if iteration < cfg.warmup:
        alpha = iteration / cfg.warmup
        factor = cfg.warmup_factor * (1 - alpha) + alpha
    passed = sum(1 for s in cfg.steps if iteration >= round(s * total))
    return factor * cfg.gamma ** passed


def total_iterations(cfg: TrainConfig, sizes: Sequence[int]) -> int:
    """The schedule length for training sources of ``sizes`` (labeled first)."""
    n_all = sum(sizes)
    if cfg.epochs is not None:
        return max(1, math.ceil(cfg.epochs * n_all / cfg.batch_size))
    total = cfg.iterations
    if cfg.scale_with_data and sizes[0] > 0:
        total = round(total * n_all / sizes[0])
    return max(1, total)


# ---------------------------------------------------------------------------------------------------- helpers
def _mix(*values: int) -> int:
    h = hashlib.blake2b(repr(values).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") % (2 ** 63)


def _reseed(value: int, dev: torch.device) -> None:
    """Seed the generators that dropout and friends use, cheaply: ``torch.manual_seed`` also visits every lazy
    accelerator backend (capturing a stack trace each), which costs a millisecond per call."""
    torch.default_generator.manual_seed(value)
    if dev.type == "cuda":
        torch.cuda.manual_seed(value)


def shift_image(image: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """``[C, H, W]`` moved ``dx`` pixels right and ``dy`` down; uncovered pixels are 0."""
    out = torch.zeros_like(image)
    h, w = image.shape[-2:]
    if abs(dx) >= w or abs(dy) >= h:
        return out
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        image[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def _samples(batch: list[Any]) -> list[Any]:  # DataLoader collate_fn: keep the list; the task collates later
    return batch


class _Indexed(torch.utils.data.Dataset):
    """Adds ``target["_index"]`` (the sample's index in the training set) for the teacher cache."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, target = self.dataset[i]
        return image, {**target, "_index": i}


def _dataset_fingerprint(dataset: Any) -> str:
    h = hashlib.sha256(str(len(dataset)).encode())
    for i in range(len(dataset)):
        h.update(str(get_target(dataset, i).get("image_id", i)).encode() + b",")
    return h.hexdigest()[:16]


class TeacherCache:
    """Teacher logits of every training sample, computed once and stored as ``teacher_logits-<sha16>.pt``."""

    def __init__(self, logits: torch.Tensor, sha: str):
        self.logits, self.sha = logits, sha

    @classmethod
    def build(cls, task: Task, teacher: nn.Module, dataset: Any, sha: str, cache_dir: Path, batch_size: int,
              device: torch.device, progress: bool, rank: int = 0) -> "TeacherCache":
        fingerprint = _dataset_fingerprint(dataset)
        path = Path(cache_dir) / f"teacher_logits-{sha[:16]}-{fingerprint}.pt"
        if path.is_file():
            rec = torch.load(path, map_location="cpu", weights_only=True)
            if rec.get("sha256") == sha and rec.get("fingerprint") == fingerprint:
                log.info("teacher cache: loaded %s", path)
                return cls(rec["logits"], sha)
        teacher.eval()
        chunks = []
        starts = range(0, len(dataset), batch_size)
        it = starts
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(starts, desc="teacher cache", unit="batch", leave=False)
        with torch.no_grad():
            for s in it:
                samples = [dataset[i] for i in range(s, min(len(dataset), s + batch_size))]
                batch = task.to_device(task.collate(samples), device)
                out = task.feature_forward(teacher, batch)
                if out is None:
                    raise ConfigError(f"teacher_cache: the task {task.name!r} has no teacher logits to cache")
                chunks.append(out.float().cpu())
        logits = torch.cat(chunks)
        if rank == 0:
            atomic_torch_save({"sha256": sha, "fingerprint": fingerprint, "logits": logits}, path)
            log.info("teacher cache: wrote %s (%d samples)", path, len(logits))
        return cls(logits, sha)

    def get(self, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        if bool((index < 0).any()):
            raise RuntimeError("teacher cache: a batch without sample indices")
        return self.logits[index.cpu()].to(device, non_blocking=True)


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
            name = block["name"] if isinstance(block, dict) else str(block)
        base, k = name, 1
        while name in names:
            name = f"{base}_{k}"
            k += 1
        terms.append(term)
        names.append(name)
    return terms, names


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()


def _truncate_jsonl(path: Path, iteration: int) -> None:
    """Drop records written after ``iteration`` (by the run that is being resumed)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a killed run
        if rec.get("iteration", 0) <= iteration and not rec.get("final"):
            keep.append(line)
    from ddkit.io import atomic_write_text

    atomic_write_text(path, "".join(k + "\n" for k in keep))


def _float(x: Any) -> float:
    return float(x.detach().float().item()) if isinstance(x, torch.Tensor) else float(x)


# ------------------------------------------------------------------------------------------------------ trainer
def train_model(task: Task, model: nn.Module, train_sets: Any, cfg_train: Mapping[str, Any] | TrainConfig | None,
                run_dir: str | Path, *, teacher: nn.Module | str | Path | None = None,
                losses: Sequence[Any] | None = None, eval_set: Any = None, resume: bool = False, seed: int = 0,
                device: str | torch.device | None = "auto", progress: bool | None = None,
                teacher_sha: str | None = None) -> dict[str, Any]:
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
        resume: continue from ``run_dir/checkpoints/last.pt`` if it exists.
        seed: the run's seed (``cfg_train.seed`` wins when set).
        device: ``auto`` = CUDA when available, else CPU.
        progress: tqdm bars (default: when stderr is a terminal).
        teacher_sha: the teacher-cache key when ``teacher`` is a module (default: a digest of its weights).

    Returns:
        ``{"run_dir", "checkpoint", "model_path", "iterations", "total_iterations", "finished", "metrics",
        "train_time_s", "samples_per_s", "losses"}`` (``metrics``: the last evaluation, if any).
    """
    cfg = parse_train_config(cfg_train)
    rank, world = dist_info()
    seed = cfg.seed if cfg.seed is not None else int(seed)
    dev = resolve_device(device)
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    metrics_path = run_dir / "metrics.jsonl"
    is_main = rank == 0
    if progress is None:
        import sys

        progress = sys.stderr.isatty()
    progress = progress and is_main
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    file_log = _FileLog(run_dir / "train.log" if is_main else None)

    # ---- data
    sets = list(train_sets) if isinstance(train_sets, (list, tuple)) else [train_sets]
    sets = [s for s in sets if s is not None]
    if not sets or len(sets[0]) == 0:
        raise ConfigError("train_model: the labeled training set is empty")
    info = get_info(sets[0])
    for s in sets[1:]:
        if get_info(s).categories != info.categories:
            raise ConfigError("train_model: the pseudo-labeled set's categories differ from the labeled set's")
    concat = ConcatDataset(sets)
    sizes = [len(s) for s in sets]
    total = total_iterations(cfg, sizes)
    stop = total if cfg.max_iterations is None else min(total, cfg.max_iterations)
    if cfg.batch_size % world:
        raise ConfigError(f"train.batch_size {cfg.batch_size} is not divisible by the {world} DDP processes")
    per_rank = cfg.batch_size // world
    sampler = MixedRatioSampler(sizes, per_rank, ratio=cfg.ratio if len(sizes) > 1 else None, seed=seed,
                                rank=rank, world_size=world)
    eval_bs = cfg.eval_batch_size or cfg.batch_size

    # ---- models
    torch.manual_seed(_mix(seed, "init"))
    teacher_path = None
    if isinstance(teacher, (str, Path)):
        teacher_path = Path(teacher)
        _, teacher, _ = load_model(teacher_path, device=dev)
        teacher_sha = teacher_sha or file_sha256(resolve_checkpoint(teacher_path))
    if teacher is not None:
        teacher = teacher.to(dev).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    terms, names = _build_losses(losses)
    if teacher is None and any(getattr(t, "teacher_outputs", "none") != "none" for t in terms):
        needing = [n for n, t in zip(names, terms) if getattr(t, "teacher_outputs", "none") != "none"]
        raise ConfigError(f"the loss terms {needing} need a teacher; give a teacher checkpoint")
    student = model.to(dev)
    if cfg.init == "teacher" and not resume:
        if teacher is None:
            raise ConfigError("train.init: teacher needs a teacher")
        try:
            unwrap_model(student).load_state_dict(unwrap_model(teacher).state_dict())
        except RuntimeError as err:
            raise ConfigError(f"train.init: teacher: the student's architecture differs from the teacher's: "
                              f"{str(err).splitlines()[0]}") from None
    student.train()

    # ---- loss terms' set-up (hint adapters need a dry batch)
    dry = task.to_device(task.collate([_Indexed(concat)[i] for i in sampler.batch(0)[: min(per_rank, 4)]]), dev)
    setup_ctx = SetupContext(task, student, teacher, dry, dev, total)
    extras = nn.ModuleList()
    for term in terms:
        setup = getattr(term, "setup", None)
        module = setup(setup_ctx) if setup is not None else None
        extras.append(module if module is not None else nn.Identity())
    extras.to(dev)
    student.train()

    # ---- optimizer, schedule, AMP
    params = [p for p in student.parameters() if p.requires_grad] + [p for p in extras.parameters()]
    if not params:
        raise ConfigError("the model has no trainable parameters")
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                    weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, total, cfg))
    use_amp = dev.type == "cuda" if cfg.amp is None else (cfg.amp and dev.type == "cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    # ---- resume
    start = 0
    window: dict[str, torch.Tensor] = {}  # float64 sums on the device: no host sync per iteration
    window_n = 0
    last = ckpt_dir / LAST
    if resume and last.is_file():
        state = load_checkpoint(last, map_location=dev)
        unwrap_model(student).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if use_amp and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        sampler.load_state_dict(state["sampler"])
        for module, sd in zip(extras, state.get("losses", [])):
            if sd:
                module.load_state_dict(sd)
        if state.get("total_iterations") != total:
            raise ConfigError(f"cannot resume {last}: it was for {state.get('total_iterations')} iterations, this "
                              f"run has {total} (the schedule or the data changed)")
        start = int(state["iteration"])
        window = {k: torch.tensor(v, dtype=torch.float64, device=dev)
                  for k, v in state.get("log_window", {}).get("sums", {}).items()}
        window_n = int(state.get("log_window", {}).get("n", 0))
        if is_main:
            _truncate_jsonl(metrics_path, start)
            file_log(f"resumed from {last} at iteration {start}/{total}")
    elif is_main and metrics_path.exists():
        metrics_path.unlink()
    sampler.set_step(start)

    # ---- teacher cache
    cache = None
    if cfg.translate > 0 and task.name != "classification":
        raise ConfigError(f"train.translate shifts images without moving boxes or keypoints: classification only, "
                          f"not {task.name!r}; set translate: 0")
    if cfg.teacher_cache and teacher is not None and any(getattr(t, "teacher_outputs", "") == "logits"
                                                          for t in terms):
        if cfg.hflip > 0 or cfg.translate > 0:
            raise ConfigError("train.teacher_cache is only valid without random augmentation: the cached teacher "
                              "outputs are for the unaugmented images; set hflip: 0, translate: 0 or teacher_cache: false")
        sha = teacher_sha or state_sha256(teacher)
        cache_dir = Path(cfg.teacher_cache_dir) if cfg.teacher_cache_dir else run_dir / "teacher_cache"
        cache = TeacherCache.build(task, teacher, _Indexed(concat), sha, cache_dir, eval_bs, dev, progress, rank)

    # ---- DDP
    train_model_ = student
    if world > 1:
        find_unused = any(getattr(t, "stage_fraction", 0) > 0 for t in terms)
        train_model_ = nn.parallel.DistributedDataParallel(
            student, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=find_unused)

    loader = torch.utils.data.DataLoader(_Indexed(concat), batch_sampler=sampler, num_workers=cfg.num_workers,
                                         collate_fn=_samples, pin_memory=dev.type == "cuda",
                                         persistent_workers=False)
    stage_iters = {i: round(getattr(t, "stage_fraction", 0.0) * total) for i, t in enumerate(terms)}
    first_stage = [i for i, n in stage_iters.items() if n > 0]

    def active_terms(it: int) -> list[int]:
        if not first_stage:
            return list(range(len(terms)))
        in_stage = [i for i in first_stage if it < stage_iters[i]]
        if in_stage:
            return in_stage
        return [i for i in range(len(terms)) if i not in first_stage]

    def checkpoint(it: int) -> Path:
        path = ckpt_dir / LAST
        save_checkpoint(
            path, student, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict() if use_amp else {}, sampler={**sampler.state_dict(), "step": it},
            rng={"torch": torch.get_rng_state(), "seed": seed}, iteration=it, total_iterations=total,
            losses=[m.state_dict() for m in extras], log_window={"sums": {k: float(v) for k, v in window.items()}, "n": window_n},
            train_cfg=dataclasses.asdict(cfg), loss_names=list(names),
        )
        return path

    def evaluate(it: int) -> dict[str, float]:
        metrics = task.evaluate(unwrap_model(student), eval_set, eval_bs) if is_main else {}
        student.train()
        if is_main:
            _append_jsonl(metrics_path, {"iteration": it, "eval": metrics})
            file_log(f"eval @ {it}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if world > 1:
            torch.distributed.barrier()
        return metrics

    if is_main:
        file_log(f"training {task.name} model {model_info(student)[0].get('name')!r} for {total} iterations "
                 f"(batch {cfg.batch_size}, {world} process(es), {dev}); sources {sizes}"
                 + (f" at ratio {cfg.ratio[:len(sizes)]}" if len(sizes) > 1 else "")
                 + f"; losses {names}" + (f"; resuming at {start}" if start else ""))

    bar = None
    if progress and stop > start:
        from tqdm.auto import tqdm

        bar = tqdm(total=stop, initial=start, desc=f"train {task.name}", unit="it", dynamic_ncols=True)
    metrics: dict[str, float] = {}
    check_every_step = dev.type != "cuda"  # on GPU the check waits for the log step (no host sync per iteration)
    t0 = time.perf_counter()
    t_window = t0
    samples_seen = 0
    it = start
    loader_iter = iter(loader)
    try:
        for it in range(start, stop):
            _reseed(_mix(seed, rank, it), dev)
            samples = next(loader_iter)
            if cfg.hflip > 0:
                g = torch.Generator().manual_seed(_mix(seed, rank, it, "hflip"))
                flips = (torch.rand(len(samples), generator=g) < cfg.hflip).tolist()
                samples = [task.hflip(im, t, info) if f else (im, t) for (im, t), f in zip(samples, flips)]
            if cfg.translate > 0:
                g = torch.Generator().manual_seed(_mix(seed, rank, it, "translate"))
                shifts = torch.randint(-cfg.translate, cfg.translate + 1, (len(samples), 2), generator=g).tolist()
                samples = [(shift_image(im, dx, dy), t) for (im, t), (dx, dy) in zip(samples, shifts)]
            batch = task.to_device(task.collate(samples), dev)
            active = active_terms(it)
            need_features = teacher is not None and any(terms[i].teacher_outputs == "features" for i in active)
            need_logits = teacher is not None and any(terms[i].teacher_outputs == "logits" for i in active)
            with torch.autocast(dev.type, dtype=torch.float16, enabled=use_amp):
                out: TrainOutputs = task.training_forward(train_model_, batch)
                teacher_logits = None
                if need_features or (need_logits and cache is None):
                    with torch.no_grad():
                        teacher_logits = task.feature_forward(teacher, batch)
                if need_logits and cache is not None:
                    teacher_logits = cache.get(batch["index"], dev)
                ctx = LossContext(task, train_model_, teacher, batch, out, it, total,
                                  (lambda tl=teacher_logits: tl))
                values = {}
                loss = None
                for i in active:
                    value = terms[i].compute(ctx)
                    values[names[i]] = value
                    weighted = terms[i].weight * value
                    loss = weighted if loss is None else loss + weighted
            if check_every_step and not bool(torch.isfinite(loss.detach())):
                detail = ", ".join(f"{k} {_float(v):.4g}" for k, v in values.items())
                raise TrainingDiverged(f"the loss became {_float(loss)} at iteration {it} ({detail}); lower "
                                       f"train.lr (now {cfg.lr}), raise train.warmup or set train.clip_grad_norm")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if world > 1:
                for p in extras.parameters():
                    if p.grad is not None:
                        torch.distributed.all_reduce(p.grad)
                        p.grad /= world
            if cfg.clip_grad_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            with warnings.catch_warnings():
                if use_amp:  # the scaler skips the steps whose gradients overflowed: expected, not worth a warning
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                scheduler.step()
            samples_seen += len(samples) * world

            # ---- logging (window means; the window is checkpointed so that resumed logs are identical)
            for k, v in {"loss": loss, **values, **ctx.logs}.items():
                v = v.detach().double()
                window[k] = window[k] + v if k in window else v
            window_n += 1
            done = it + 1
            if bar is not None:
                bar.update(1)
            if cfg.log_every and done % cfg.log_every == 0 or done == total:
                now = time.perf_counter()
                means = {k: float(v) / max(window_n, 1) for k, v in window.items()}
                if not math.isfinite(means["loss"]):
                    raise TrainingDiverged(f"the loss became {means['loss']} between iterations {done - window_n} "
                                           f"and {done}; lower train.lr (now {cfg.lr}), raise train.warmup or set "
                                           "train.clip_grad_norm")
                rec = {"iteration": done, "lr": optimizer.param_groups[0]["lr"], "loss": means.pop("loss"),
                       "losses": means, "samples_per_s": round(samples_seen / max(now - t_window, 1e-9), 2)}
                if is_main:
                    _append_jsonl(metrics_path, rec)
                    if bar is not None:
                        bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.3g}")
                    file_log(f"it {done}/{total}  lr {rec['lr']:.4g}  loss {rec['loss']:.4f}  ("
                             + ", ".join(f"{k} {v:.4f}" for k, v in means.items())
                             + f")  {rec['samples_per_s']:.0f} samples/s", echo=bar is None)
                window, window_n, t_window, samples_seen = {}, 0, now, 0
            if cfg.eval_every and done % cfg.eval_every == 0 and done < total and eval_set is not None:
                metrics = evaluate(done)  # before the checkpoint: a resumed run never misses this record
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < stop and is_main:
                checkpoint(done)
        it = stop
    except KeyboardInterrupt:
        if is_main and it > start:
            checkpoint(it)
            file_log(f"interrupted at iteration {it}; checkpoint written, resume with --resume")
        raise
    finally:
        if bar is not None:
            bar.close()
        for term in terms:
            close = getattr(term, "close", None)
            if close is not None:
                close()
    train_time = time.perf_counter() - t0
    if world > 1:
        _check_ranks_in_sync(student, extras, dev, world, file_log if is_main else None)

    finished = stop >= total
    ckpt_path = None
    if is_main and stop > start or (is_main and not last.exists()):
        ckpt_path = checkpoint(stop)
    elif last.exists():
        ckpt_path = last
    model_path = None
    if finished:
        if eval_set is not None:
            metrics = evaluate(total)
        if is_main:
            model_path = save_model(student, run_dir / "model.pt")
            _append_jsonl(metrics_path, {"iteration": total, "final": True, "eval": metrics,
                                         "train_time_s": round(train_time, 3)})
            file_log(f"done: {total} iterations in {train_time:.1f}s; model {model_path}")
    else:
        file_log(f"stopped at iteration {stop} of {total} (max_iterations); continue with resume")
    if world > 1:
        torch.distributed.barrier()
    student.eval()
    return {"run_dir": str(run_dir), "checkpoint": str(ckpt_path) if ckpt_path else None,
            "model_path": str(model_path) if model_path else None, "iterations": stop,
            "total_iterations": total, "finished": finished, "metrics": metrics,
            "train_time_s": train_time, "samples_per_s": (stop - start) * cfg.batch_size / max(train_time, 1e-9),
            "losses": names}


def _check_ranks_in_sync(student: nn.Module, extras: nn.Module, dev: torch.device, world: int, note) -> None:
    """After DDP training every rank must hold the same weights; compare a float64 checksum across ranks."""
    params = list(unwrap_model(student).parameters()) + list(extras.parameters())
    value = torch.stack([p.detach().double().sum() + (p.detach().double() ** 2).sum() for p in params]).sum()
    gathered = [torch.zeros((), dtype=torch.float64, device=dev) for _ in range(world)]
    torch.distributed.all_gather(gathered, value.to(dev))
    values = [float(v) for v in gathered]
    if any(v != values[0] for v in values):
        raise RuntimeError(f"DDP ranks ended with different weights (checksums {values})")
    if note is not None:
        note(f"DDP: the {world} ranks hold identical weights (checksum {values[0]:.6g})")


class _FileLog:
    """Readable log lines: to ``train.log`` in the run folder and to the ``ddkit.train`` logger."""

    def __init__(self, path: Path | None):
        self.path = path

    def __call__(self, message: str, echo: bool = True) -> None:
        if self.path is None:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.path, "a") as fh:
            fh.write(f"{stamp} {message}\n")
        if echo:
            log.info(message)
        else:
            from tqdm.auto import tqdm

            tqdm.write(message)


# ------------------------------------------------------------------------------------------------ recipe level
SECTION_KEYS = {
    "teacher": {"model", "train", "losses", "checkpoint"},
    "student": {"model", "train", "losses", "pseudo_labels", "teacher"},
}


def stage_run_dir(cfg: Any, stage: str) -> Path:
    """``<run.out_dir>/<stage>`` (``run.out_dir`` defaults to ``runs/<run.name>``)."""
    run = cfg.get("run") or {}
    out = run.get("out_dir") or f"runs/{run.get('name') or 'ddkit'}"
    return Path(out) / stage


def run_train(cfg: Any, stage: str | None = None, resume: bool = False, source: str = "recipe",
              device: str | None = None, progress: bool | None = None, registry: Any = None) -> dict[str, Any]:
    """Train the recipe's ``teacher`` or ``student`` section (``ddkit train``).

    The section holds ``model``, ``train`` (see :class:`TrainConfig`) and optionally ``losses``. A student section
    may name ``pseudo_labels`` (a file written by ``ddkit label``; ``auto`` = ``<out_dir>/label/pseudo_labels.json``)
    and ``teacher`` (the teacher checkpoint for KD losses or ``init: teacher``; default ``teacher.checkpoint``, then
    ``<out_dir>/teacher``). The run folder is ``<run.out_dir>/<stage>``.
    """
    from ddkit.config import save_config, validate_config
    from ddkit.engine.data import build_data
    from ddkit.registry import _to_plain

    if registry is None:
        from ddkit.plugin_manager import get_registry

        registry = get_registry()
    validate_config(cfg, registry, source=source)
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
    run = _to_plain(cfg.get("run")) or {}
    seed = int(run.get("seed", 0) or 0)
    rank, _ = dist_info()
    run_dir = stage_run_dir(cfg, stage)
    tcfg = parse_train_config(section.get("train"), where=f"{source}: {stage}.train")
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir)
    task = registry.build("tasks", cfg.task, where=f"{source}: task")
    splits = build_data(cfg.data, registry=registry, where=f"{source}: data")
    torch.manual_seed(_mix(tcfg.seed if tcfg.seed is not None else seed, "model"))
    model = task.build_model(section["model"], splits.info)
    train_sets = [splits.labeled]
    teacher = None
    if stage == "student":
        pseudo = section.get("pseudo_labels")
        if pseudo:
            from ddkit.engine.pseudo import load_pseudo_dataset

            path = Path(run_dir.parent / "label" / "pseudo_labels.json") if pseudo == "auto" else Path(pseudo)
            pds = load_pseudo_dataset(path, source=splits.unlabeled)
            if [int(c["id"]) for c in pds.info.categories] != [int(c["id"]) for c in splits.info.categories]:
                raise ConfigError(f"{path}: the pseudo-labels' categories differ from the labeled data's")
            pds.info = splits.info
            train_sets.append(pds)
        teacher = section.get("teacher") or (_to_plain(cfg.get("teacher")) or {}).get("checkpoint")
        needs = tcfg.init == "teacher" or any(
            (b if isinstance(b, str) else b.get("name")) in ("soft_target", "hint")
            for b in (section.get("losses") or []))
        if teacher is None and needs:
            default = run_dir.parent / "teacher"
            if not default.exists():
                raise ConfigError(f"{source}: the student's losses need a teacher: set student.teacher (or "
                                  f"teacher.checkpoint) to a checkpoint, or train the teacher first ({default})")
            teacher = default
        if not needs:
            teacher = None
    return train_model(task, model, train_sets, tcfg, run_dir, teacher=teacher, losses=section.get("losses"),
                       eval_set=splits.test, resume=resume, seed=seed,
                       device=device or run.get("device", "auto"), progress=progress)
