"""The training loop: :meth:`Trainer.run_step` plus hooks (see :mod:`ddkit.engine.hooks`).

The trainer holds what a step needs (model, loss terms and their extras, optimizer, LR scheduler, AMP and DDP
wrappers, the data iterator, the teacher's outputs, augmentation); everything else (logging, evaluation,
checkpoints, the final export) is a hook. :meth:`Trainer.state_dict` / :meth:`Trainer.load_state_dict` are the one
place where the checkpoint is written and read: each part stores itself under its own key.

Determinism: the global RNG is re-seeded from ``(seed, rank, iteration)`` before every step and the sampler is a
pure function of the step, so a resumed run repeats the very RNG calls of an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ddkit.engine.amp import Amp
from ddkit.engine.augment import Augment, mix_seed
from ddkit.engine.ddp import DDP
from ddkit.engine.hooks import HookBase, _float, diverged
from ddkit.engine.losses import LossContext, check_loss_value
from ddkit.engine.task import Task, TrainOutputs, unwrap_model
from ddkit.engine.teacher_cache import TeacherOutputs
from ddkit.engine.train_config import TrainConfig
from ddkit.errors import Interrupted, signal_name


def _reseed(value: int, dev: torch.device) -> None:
    """Seed the generators that dropout and friends use, cheaply: ``torch.manual_seed`` also visits every lazy
    accelerator backend (capturing a stack trace each), which costs a millisecond per call."""
    torch.default_generator.manual_seed(value)
    if dev.type == "cuda":
        torch.cuda.manual_seed(value)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; Slurm, Kubernetes and `docker stop` before a SIGKILL


# Under DDP one stop request can reach a worker twice within milliseconds, and must not then stop it at once: the
# torchrun agent forwards the signal it got to every worker (torch.distributed.elastic ``SimpleElasticAgent.run``:
# ``self._shutdown(e.sigval, ...)``, SIGINT for a Ctrl-C, then SIGKILL after ``--shutdown_timeout``, 30 s by default:
# ``SubprocessContext._close``), and the worker may get it directly too (torch releases whose workers share the
# terminal's process group; Slurm's scancel, which signals the tasks and the launcher alike). So a repeat within
# DDP_REPEAT_S is the same request. A user's second Ctrl-C comes later, and reaches torch 2.x workers (sessions of
# their own) as the SIGTERM of the agent's final shutdown: any later signal, whatever its kind, stops at once.
DDP_REPEAT_S = 2.0


def _same_request(first_at: float) -> bool:
    """Under DDP: whether a signal now repeats the first stop request (see :data:`DDP_REPEAT_S`)."""
    return time.monotonic() - first_at < DDP_REPEAT_S


@contextlib.contextmanager
def deferred_interrupt(ddp: bool = False, announce: bool = True) -> Iterator[Callable[[], int | None]]:
    """Ctrl-C or SIGTERM finishes the current step before it stops the loop, so the checkpoint holds whole steps
    only (a step cut between its optimizer update and its end would be applied twice on resume); a second one
    stops at once (:class:`~ddkit.errors.Interrupted`). Yields "which signal asked to stop?" (None: none).

    ``ddp`` (a torchrun worker): every rank keeps its signal and the ranks agree on the step to stop after
    (:class:`StopAgreement`); a repeat of the request (:func:`_same_request`: the launcher's forwarded signal) does
    not stop at once, and the request is named by the largest of its signals (SIGTERM over SIGINT), as the ranks'
    agreement names it: two signals sent at once can run their handlers in either order (one nested in the other's),
    so the first one handled is not the first one sent. Only ``announce`` (rank 0) prints the message. Off outside
    the main thread, where no signal handler can be set. The previous handlers are restored on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    received: list[int] = []
    first_at = [0.0]

    def handler(signum: int, frame: Any) -> None:
        if received:
            if ddp and _same_request(first_at[0]):
                received.append(signum)
                return
            raise Interrupted(signum)
        received.append(signum)
        first_at[0] = time.monotonic()
        if not announce:
            return
        where = " and the next on every process" if ddp else ""  # the ranks share it after the next step
        print(f"{signal_name(signum)}: finishing this iteration{where}, then writing a checkpoint "
              f"({signal_name(signum)} again to stop at once)", file=sys.stderr)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield lambda: max(received) if received else None
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class StopAgreement:
    """Under DDP, the step after which every rank stops: the ranks could get a signal at different steps (or only
    some of them get one), and a checkpoint of whole steps needs them all to stop after the same one.

    After each step every rank starts an all-reduce (MAX) of its signal number (0: none) and waits for it after the
    next step, so a signal noted before the all-reduce of step i stops every rank after step i+1, with the largest
    signal number (SIGTERM over SIGINT). The flag is a CPU tensor on a gloo group (the default group under gloo, a
    gloo group of all ranks under NCCL), so no step waits for the GPU: a blocking ``.item()`` of a CUDA flag each
    step would stall the pipeline, and the one-step lag leaves the all-reduce a whole step to finish."""

    def __init__(self, group: Any = None):
        self.group = group
        self.flag = torch.zeros((), dtype=torch.int64)
        self.pending: Any = None

    @classmethod
    def for_process_group(cls) -> StopAgreement:
        """Called by every rank at the same point (creating a gloo group under NCCL is a collective)."""
        dist = torch.distributed
        return cls(None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo"))

    def after_step(self, signum: int | None) -> int | None:
        """Every rank, after every step, with its own signal (None: none): the signal that the ranks agreed to stop
        on after this step, or None to go on."""
        agreed = None
        if self.pending is not None:
            self.pending.wait()
            self.pending = None
            agreed = int(self.flag) or None
        if agreed is None:
            self.flag.fill_(signum or 0)
            self.pending = torch.distributed.all_reduce(self.flag, op=torch.distributed.ReduceOp.MAX,
                                                        group=self.group, async_op=True)
        return agreed

    def finish(self) -> None:
        """The loop ended: wait for the last all-reduce (every rank started it; its answer no longer matters)."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None

    def barrier(self) -> None:
        torch.distributed.barrier(group=self.group)


@dataclasses.dataclass
class StepParts:
    """What one optimisation step is made of (built by :func:`ddkit.engine.train.train_model`)."""

    task: Task
    student: nn.Module
    terms: list[Any]
    names: list[str]
    extras: nn.ModuleList
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: Any
    amp: Amp
    ddp: DDP
    teacher: nn.Module | None
    teacher_outputs: TeacherOutputs
    augment: Augment
    # the task's ``teacher_targets`` where the data holds a transfer set's unlabeled items to label, else None
    teacher_targets: Callable[[nn.Module, Any], Any] | None = None


class Trainer:
    """``train(start, stop)`` runs ``run_step`` for each iteration between the hooks' calls."""

    def __init__(self, parts: StepParts, cfg: TrainConfig, total: int, seed: int, rank: int,
                 device: torch.device, loader: Any, runlog: Any = None, static: dict[str, Any] | None = None,
                 hooks: Sequence[HookBase] = ()):
        self.parts, self.cfg, self.total, self.seed, self.rank, self.device = parts, cfg, total, seed, rank, device
        self.task, self.student, self.optimizer, self.ddp = parts.task, parts.student, parts.optimizer, parts.ddp
        self.is_main = rank == 0
        self.loader, self.runlog, self.static = loader, runlog, dict(static or {})
        self.params = [p for p in parts.student.parameters() if p.requires_grad] + list(parts.extras.parameters())
        self.train_module = parts.ddp.wrap(parts.student, any(getattr(t, "stage_fraction", 0) > 0
                                                               for t in parts.terms))
        stage_iters = {i: round(getattr(t, "stage_fraction", 0.0) * total) for i, t in enumerate(parts.terms)}
        self._stage_iters = {i: n for i, n in stage_iters.items() if n > 0}
        self.check_every_step = device.type != "cuda"  # on GPU the log step checks (no host sync per iteration)
        self.hooks: list[HookBase] = []
        self.register_hooks(hooks)
        self.start = self.stop = self.iter = 0
        self.metrics: dict[str, float] = {}
        self.checkpoint_path: Path | None = None
        self.model_path: Path | None = None
        self.train_time = 0.0
        self.step_values: dict[str, torch.Tensor] = {}
        self.step_samples = 0
        self.stopped_by = ""  # what interrupted the loop (Ctrl-C, SIGTERM), for the checkpoint hook's message
        self.averaged: nn.Module | None = None  # an average of the weights to evaluate instead (EMAHook)

    def register_hooks(self, hooks: Sequence[HookBase]) -> None:
        for h in hooks:
            h.trainer = self
            self.hooks.append(h)

    # ------------------------------------------------------------------------------------------------- state
    def state_dict(self, iteration: int) -> dict[str, Any]:
        """The checkpoint's training state at ``iteration`` (the model itself is added by the checkpoint writer)."""
        p = self.parts
        state = {"optimizer": p.optimizer.state_dict(), "scheduler": p.scheduler.state_dict(),
                 Amp.state_key: p.amp.state_dict(), "sampler": {**p.sampler.state_dict(), "step": iteration},
                 "rng": {"torch": torch.get_rng_state(), "seed": self.seed}, "iteration": iteration,
                 "total_iterations": self.total, "losses": [m.state_dict() for m in p.extras], **self.static}
        state.update({h.state_key: h.state_dict() for h in self.hooks if h.state_key})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> int:
        """Restore a checkpoint's training state; returns the iteration to continue from."""
        p = self.parts
        unwrap_model(p.student).load_state_dict(state["model"])
        p.optimizer.load_state_dict(state["optimizer"])
        p.scheduler.load_state_dict(state["scheduler"])
        p.amp.load_state_dict(state.get(Amp.state_key))
        p.sampler.load_state_dict(state["sampler"])
        for module, sd in zip(p.extras, state.get("losses", [])):
            if sd:
                module.load_state_dict(sd)
        for h in self.hooks:
            if h.state_key:
                h.load_state_dict(state.get(h.state_key))
        return int(state["iteration"])

    # -------------------------------------------------------------------------------------------------- loop
    def active_terms(self, it: int) -> list[int]:
        """The loss terms of iteration ``it``: first-stage terms (``stage_fraction``) first, then the others."""
        n = len(self.parts.terms)
        if not self._stage_iters:
            return list(range(n))
        in_stage = [i for i, stop in self._stage_iters.items() if it < stop]
        return in_stage or [i for i in range(n) if i not in self._stage_iters]

    def _loss(self, ctx: LossContext, active: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms, names = self.parts.terms, self.parts.names
        values: dict[str, torch.Tensor] = {}
        loss = None
        for i in active:
            value = check_loss_value(terms[i].compute(ctx), f"loss {names[i]!r}")
            values[names[i]] = value
            weighted = terms[i].weight * value
            loss = weighted if loss is None else loss + weighted
        return loss, values

    def run_step(self) -> None:
        """One optimisation step at ``self.iter``; leaves the step's loss values in ``self.step_values``."""
        p, it, dev = self.parts, self.iter, self.device
        _reseed(mix_seed(self.seed, self.rank, it), dev)
        samples = p.augment(next(self._data), it)
        batch = p.task.to_device(p.task.collate(samples), dev)
        if p.teacher_targets is not None:  # a transfer set's unlabeled items, labeled by the teacher
            batch = p.teacher_targets(p.teacher, batch)
        active = self.active_terms(it)
        with p.amp.autocast():
            out: TrainOutputs = p.task.training_forward(self.train_module, batch)
            teacher_logits = p.teacher_outputs(p.task, batch, active, dev)
            ctx = LossContext(p.task, self.train_module, p.teacher, batch, out, it, self.total,
                              (lambda tl=teacher_logits: tl))
            loss, values = self._loss(ctx, active)
        if self.check_every_step and not bool(torch.isfinite(loss.detach())):
            detail = ", ".join(f"{k} {_float(v):.4g}" for k, v in values.items())
            raise diverged(f"{_float(loss)} at iteration {it} ({detail})", self.cfg.lr)
        p.optimizer.zero_grad(set_to_none=True)
        p.amp.backward(loss)
        p.ddp.average_grads(p.extras)
        p.amp.step(p.optimizer, p.scheduler, self.params, self.cfg.clip_grad_norm)
        self.step_values = {"loss": loss, **values, **ctx.logs}
        self.step_samples = len(samples) * p.ddp.world

    def _loop(self, start: int, stop: int, stop_signal: Callable[[], int | None],
              agree: StopAgreement | None) -> None:
        for self.iter in range(start, stop):
            for h in self.hooks:
                h.before_step()
            self.run_step()
            for h in self.hooks:
                h.after_step()
            signum = stop_signal() if agree is None else agree.after_step(stop_signal())
            if signum is not None:
                self.iter, self.whole_steps = self.iter + 1, True
                raise Interrupted(signum)
        if agree is not None:
            agree.finish()

    def _interrupted(self, err: KeyboardInterrupt, agree: StopAgreement | None) -> None:
        self.stopped_by = signal_name(getattr(err, "signum", signal.SIGINT))
        for h in self.hooks:
            h.on_interrupt()
        if agree is not None and self.whole_steps:
            agree.barrier()  # none exits (torchrun would then end the others) before rank 0's checkpoint is written

    def train(self, start: int, stop: int) -> None:
        """Iterations ``[start, stop)``; ``after_train`` hooks run only when the loop completes."""
        self.start, self.stop, self.iter = start, stop, start
        self.parts.sampler.set_step(start)
        self._data = iter(self.loader)
        for h in self.hooks:
            h.before_train()
        t0 = time.perf_counter()
        self.whole_steps = False  # whether an interrupt came between steps (its checkpoint resumes exactly)
        ddp = self.ddp.world > 1
        agree = StopAgreement.for_process_group() if ddp else None
        try:
            with deferred_interrupt(ddp=ddp, announce=self.is_main) as stop_signal:
                try:
                    self._loop(start, stop, stop_signal, agree)
                except KeyboardInterrupt as err:  # inside: a repeat of the request must not cut the checkpoint
                    self._interrupted(err, agree)
                    raise
            self.iter = stop
        finally:
            for h in self.hooks:
                h.close()
            for term in self.parts.terms:
                getattr(term, "close", lambda: None)()
        self.train_time = time.perf_counter() - t0
        self.ddp.check_in_sync(self.student, self.parts.extras, self.runlog if self.is_main else None)
        for h in self.hooks:
            h.after_train()
