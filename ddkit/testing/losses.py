"""Contract checks for loss terms (kind ``losses``): the attributes the trainer reads and a finite, differentiable
value on a toy classification step.

    from ddkit.testing.losses import check_loss_term
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ddkit.engine.losses import TEACHER_OUTPUTS, LossContext, SetupContext
from ddkit.engine.task import Task
from ddkit.errors import ConfigError
from ddkit.types import DatasetInfo


def toy_classification(num_classes: int = 3) -> tuple[Task, nn.Module, nn.Module, dict[str, Any]]:
    """A classification task, an MLP student and teacher (``hidden=[8]``: module paths ``1``, ``3``) and a batch."""
    from ddkit.plugin_manager import build

    task = build("tasks", {"name": "classification"})
    info = DatasetInfo([{"id": i, "name": str(i)} for i in range(num_classes)], extra={"image_shape": [1, 4, 4]})
    torch.manual_seed(0)
    student = task.build_model({"name": "mlp", "hidden": [8]}, info)
    teacher = task.build_model({"name": "mlp", "hidden": [12]}, info).eval()
    samples = [(torch.rand(1, 4, 4), {"image_id": i, "label": i % num_classes, "_index": i}) for i in range(6)]
    return task, student, teacher, task.collate(samples)


# a Faster R-CNN small enough for a unit test on 64 x 64 images (frozen BN: the same output in train and eval mode)
TINY_FASTERRCNN = {"name": "fasterrcnn", "backbone": "tiny", "min_size": 64, "max_size": 64,
                   "representation_size": 32, "box_batch_size_per_image": 16, "norm": "frozen_bn"}
TINY_RETINANET = {"name": "retinanet", "backbone": "tiny", "min_size": 64, "max_size": 64, "norm": "frozen_bn"}


def toy_detection(model: dict[str, Any] | None = None) -> tuple[Task, nn.Module, nn.Module, dict[str, Any]]:
    """A detection task, tiny student and teacher (``model``, default :data:`TINY_FASTERRCNN`) and a batch of two
    generated 64 x 64 images."""
    from ddkit.plugin_manager import build

    task = build("tasks", {"name": "detection"})
    ds = build("datasets", {"name": "synthetic_shapes", "num_images": 2, "image_size": 64})
    torch.manual_seed(0)
    model = model or TINY_FASTERRCNN
    student, teacher = task.build_model(model, ds.info), task.build_model(model, ds.info).eval()
    samples = []
    for i in range(2):
        image, target = ds[i]
        samples.append((image, {**target, "_index": i}))
    return task, student, teacher, task.collate(samples)


def check_loss_term(term: Any) -> torch.Tensor:
    """The trainer's view of a term: ``weight``, ``teacher_outputs``, optional ``check_models`` and ``setup``,
    ``compute`` -> scalar with a gradient for the student; on a toy classification step, or, for a term whose
    ``tasks`` attribute (optional: the task kinds it supports) leaves classification out, a detection step of the
    first toy detector (two-stage, then one-stage) whose ``check_models`` and ``setup`` do not refuse it. A term
    for another library's detectors names a toy model block it accepts as ``contract_model`` (tried first)."""
    assert isinstance(getattr(term, "weight", None), (int, float)) and term.weight >= 0, "term.weight must be >= 0"
    assert getattr(term, "teacher_outputs", None) in TEACHER_OUTPUTS, \
        f"term.teacher_outputs must be one of {TEACHER_OUTPUTS}"
    assert callable(getattr(term, "compute", None)), "term.compute(ctx) is missing"
    tasks = getattr(term, "tasks", None)
    toys = [toy_classification] if not tasks or "classification" in tasks else \
        [toy_detection, lambda: toy_detection(TINY_RETINANET)]  # a detector term: the first kind it accepts
    own = getattr(term, "contract_model", None)
    if own is not None:
        toys.insert(0, lambda: toy_detection(own))
    for i, toy in enumerate(toys):
        task, student, teacher, batch = toy()
        try:
            if callable(getattr(term, "check_models", None)):  # its own check passes the models it works with
                term.check_models(student, teacher)
            extra = term.setup(SetupContext(task, student, teacher, batch, torch.device("cpu"), 10)) \
                if hasattr(term, "setup") else None
            break
        except ConfigError:
            if i == len(toys) - 1:
                raise
    student.train()
    out = task.training_forward(student, batch)
    with torch.no_grad():
        t_logits = task.feature_forward(teacher, batch)
    ctx = LossContext(task, student, teacher, batch, out, 0, 10, lambda: t_logits)
    value = term.compute(ctx)
    assert isinstance(value, torch.Tensor) and value.ndim == 0, "compute must return a scalar tensor"
    assert torch.isfinite(value), "the loss is not finite"
    value.backward()
    params = list(student.parameters()) + (list(extra.parameters()) if isinstance(extra, nn.Module) else [])
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params), \
        "the loss gives no gradient to the student (or its adapter)"
    if hasattr(term, "close"):
        term.close()
    return value.detach()
