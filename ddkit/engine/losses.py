"""What a training loss term sees: defined in :mod:`ddkit.engine.task` (the module plugins may import) and
re-exported here; and the checks of a term's contract that ``ddkit run`` (before anything is written) and the
trainer (on each value ``compute`` returns) make, each one line naming the term."""
from __future__ import annotations

from typing import Any, Iterable

import torch

from ddkit.engine.task import FeatureHook, LossContext, LossTerm, SetupContext, get_submodule
from ddkit.errors import ConfigError, PluginContractError

__all__ = ["FeatureHook", "LossContext", "LossTerm", "SetupContext", "get_submodule", "TEACHER_OUTPUTS",
           "check_term_contract", "check_loss_value"]

TEACHER_OUTPUTS = ("none", "logits", "features", "model")


def check_term_contract(term: Any, who: str, task_name: str, fitting: Iterable[str] = ()) -> None:
    """What the trainer reads of a built term (see :mod:`ddkit.engine.task`): a callable ``compute``, a number
    ``weight``, ``teacher_outputs`` (optional, default ``none``) among :data:`TEACHER_OUTPUTS`, and ``tasks``
    (optional) naming the recipe's task. ``fitting``: losses that would fit, for the message."""
    if not callable(getattr(term, "compute", None)):
        raise ConfigError(f"{who} has no compute(ctx) method (it returns the batch's scalar loss)")
    weight = getattr(term, "weight", None)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise ConfigError(f"{who} needs a number 'weight' attribute (its factor in the summed loss), got "
                          f"{type(weight).__name__ if weight is not None else 'none'}")
    outputs = getattr(term, "teacher_outputs", "none")
    if outputs not in TEACHER_OUTPUTS:
        raise ConfigError(f"{who}: teacher_outputs must be one of {', '.join(TEACHER_OUTPUTS)}, got {outputs!r}")
    tasks = getattr(term, "tasks", None)
    if tasks and task_name not in tasks:
        others = ", ".join(fitting)
        raise ConfigError(f"{who} supports the tasks {', '.join(tasks)}, not this recipe's {task_name!r}"
                          + (f"; losses for {task_name}: {others}" if others else ""))


def check_loss_value(value: Any, who: str) -> torch.Tensor:
    """What ``compute`` returned must be a floating-point tensor with one element (the batch's loss)."""
    if not isinstance(value, torch.Tensor):
        raise PluginContractError(f"{who}.compute must return a scalar tensor, got {type(value).__name__}")
    if value.numel() != 1 or not value.is_floating_point():
        raise PluginContractError(f"{who}.compute must return a scalar floating-point tensor, got {value.dtype} "
                                  f"{tuple(value.shape)} (reduce it, e.g. with .mean())")
    return value
