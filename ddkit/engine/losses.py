"""What a training loss term (kind ``losses``) sees, and the forward hooks that capture features for hints.

A recipe's ``losses`` is a weighted list of terms; the trainer adds ``weight * term.compute(ctx)`` and logs each
term's unweighted value under its name. A term is any object with:

* ``weight: float``;
* ``teacher_outputs: str``: ``"none"`` (no teacher needed), ``"logits"`` (the teacher's class logits, which the
  trainer may serve from its per-sample cache) or ``"features"`` (a teacher forward on every batch, for hooks);
* ``stage_fraction: float`` (optional, default 0): when > 0 the term is a *first-stage* term, as FitNets' hint
  stage: during the first ``stage_fraction`` of the iterations only first-stage terms are active, afterwards
  only the others;
* ``setup(ctx: SetupContext) -> nn.Module | None`` (optional): called once before training, with a dry batch;
  returns trainable extras (an adaptation layer) that the trainer optimises with the student and checkpoints;
* ``compute(ctx: LossContext) -> Tensor``: a scalar; it may add extra scalars to ``ctx.logs`` to be logged;
* ``close()`` (optional): remove hooks.

The student's forward runs once per batch (``ctx.student_out``, from :meth:`Task.training_forward`) and is shared
by every term.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ddkit.engine.task import Task, TrainOutputs, unwrap_model
from ddkit.errors import ConfigError


@runtime_checkable
class LossTerm(Protocol):
    weight: float
    teacher_outputs: str

    def compute(self, ctx: "LossContext") -> Tensor:
        """A scalar loss for the current batch."""


def get_submodule(model: nn.Module, path: str, role: str = "model") -> nn.Module:
    """``model.get_submodule(path)`` with an error that suggests the closest module paths."""
    inner = unwrap_model(model)
    try:
        return inner.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in inner.named_modules() if n]
        hint = difflib.get_close_matches(path, names, n=3, cutoff=0.4)
        listed = ", ".join(hint) if hint else ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
        raise ConfigError(f"{role} has no module {path!r}; closest: {listed}") from None


class FeatureHook:
    """Keeps the latest output of one submodule (captured by a forward hook; the model's code is not changed)."""

    def __init__(self, model: nn.Module, path: str, role: str = "model"):
        self.path, self.role = path, role
        self.module = get_submodule(model, path, role)
        self.value: Tensor | None = None
        self._handle = self.module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if not isinstance(output, Tensor):
            kind = type(output).__name__
            raise ConfigError(f"{self.role} module {self.path!r} returns a {kind}, not a tensor; hook a submodule "
                              "that returns one (e.g. backbone.body.layer3 rather than backbone)")
        self.value = output

    def get(self) -> Tensor:
        if self.value is None:
            raise RuntimeError(f"{self.role} module {self.path!r} did not run in the last forward pass")
        return self.value

    def clear(self) -> None:
        self.value = None

    def remove(self) -> None:
        self._handle.remove()
        self.value = None


@dataclass
class SetupContext:
    """Given to ``term.setup`` once: the models, the task and a dry batch (on the training device)."""

    task: Task
    student: nn.Module
    teacher: nn.Module | None
    batch: dict[str, Any]
    device: torch.device
    total_iterations: int

    def dry_forward(self, role: str) -> None:
        """Run the student or teacher once on the dry batch (eval mode, no grad) so that hooks see shapes."""
        model = self.student if role == "student" else self.teacher
        if model is None:
            raise ConfigError("this loss needs a teacher; pass teacher=... (recipe: a teacher checkpoint)")
        inner = unwrap_model(model)
        was = inner.training
        inner.eval()
        with torch.no_grad():
            self.task.feature_forward(inner, self.batch)
        inner.train(was)


@dataclass
class LossContext:
    """One training step as the loss terms see it."""

    task: Task
    student: nn.Module
    teacher: nn.Module | None
    batch: dict[str, Any]
    student_out: TrainOutputs
    iteration: int
    total_iterations: int
    _teacher_logits: Callable[[], Tensor | None] | None = None
    logs: dict[str, Tensor] = field(default_factory=dict)

    @property
    def student_logits(self) -> Tensor:
        if self.student_out.logits is None:
            raise ConfigError(f"this loss needs class logits, which the task {self.task.name!r} does not produce")
        return self.student_out.logits

    @property
    def teacher_logits(self) -> Tensor:
        value = self._teacher_logits() if self._teacher_logits is not None else None
        if value is None:
            raise ConfigError(f"this loss needs teacher logits, which the task {self.task.name!r} does not produce")
        return value
