"""The ``train:`` block of a teacher or student section and the schedule it implies (pure functions)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

from ddkit.registry import parse_section

# Keys that change how a run is observed or cut in pieces, never its result: a resumed run may change them.
HARMLESS_KEYS = ("max_iterations", "log_every", "eval_every", "checkpoint_every", "num_workers", "teacher_cache_dir")


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
        fused: torch's fused optimizer step (one kernel over all parameters, on CPU and CUDA; elsewhere torch's
            default step). The same update up to float rounding; the step alone takes 0.2-0.7 times the default
            step's time on this CPU (``benchmarks/optimizer_step.py``).
            ``false`` gives torch's default step, bit for bit that of runs before this option.
        warmup, warmup_factor: linear warmup from ``lr * warmup_factor`` over ``warmup`` iterations.
        steps, gamma: multiply the LR by ``gamma`` at each of these fractions of the total iterations.
        clip_grad_norm: clip the global gradient norm (``null``: off).
        ema_decay, ema_tau: an exponential moving average of the weights, evaluated during training and saved as
            the model at the end (:mod:`ddkit.engine.ema`; Ultralytics trains with 0.9999 and 2000): the ``n``-th
            update keeps ``ema_decay * (1 - exp(-n / ema_tau))`` of the average. ``ema_decay: 0``: off.
        amp: mixed precision; ``null`` = on when training on CUDA.
        ratio: labeled : pseudo-labeled samples per minibatch (expected), e.g. ``[6, 4]``.
        hflip: probability of a random horizontal flip of a training sample (boxes and keypoints too).
        translate: shift each training image by a random whole number of pixels in ``[-translate, translate]``
            on each axis, zero fill (tasks that declare ``supports_translate``: small images such as digits).
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
    fused: bool = True
    warmup: int = 0
    warmup_factor: float = 0.001
    steps: list[float] = field(default_factory=list)
    gamma: float = 0.1
    clip_grad_norm: float | None = None
    ema_decay: float = 0.0
    ema_tau: float = 2000.0
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
            (self.iterations >= 0, f"iterations must be >= 0 (0: the model as built, e.g. its pretrained weights), "
                                    f"got {self.iterations}"),
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
            (0 <= self.ema_decay < 1 and self.ema_tau > 0,
             f"need 0 <= ema_decay < 1 (0: off; e.g. 0.9999) and ema_tau > 0, got {self.ema_decay} and {self.ema_tau}"),
            (len(self.ratio) >= 1 and all(r >= 0 for r in self.ratio) and sum(self.ratio) > 0,
             f"ratio must be non-negative weights with a positive sum, e.g. [6, 4], got {self.ratio}"),
            (0 <= self.hflip <= 1, f"hflip must be a probability, got {self.hflip}"),
            (self.translate >= 0, f"translate must be >= 0 pixels, got {self.translate}"),
            (min(self.checkpoint_every, self.eval_every, self.log_every, self.eval_batch_size,
                 self.num_workers) >= 0, "checkpoint_every, eval_every, log_every, eval_batch_size, num_workers "
                                         "must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def as_built(self) -> bool:
        """``iterations: 0`` (and no ``epochs``): the model is used as its weights build it, untrained."""
        return self.epochs is None and self.iterations == 0

    @property
    def evaluation_batch_size(self) -> int:
        """The batch size every evaluation of this stage uses (``eval_batch_size``, 0: ``batch_size``): a
        detector's AP depends on it (a batch of images of different sizes is padded to one size)."""
        return self.eval_batch_size or self.batch_size


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
    if cfg.as_built:  # the model as built: pretrained weights used as they are
        return 0
    total = cfg.iterations
    if cfg.scale_with_data and sizes[0] > 0:
        total = round(total * n_all / sizes[0])
    return max(1, total)
