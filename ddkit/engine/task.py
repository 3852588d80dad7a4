"""The Task protocol: everything that differs between classification, detection and keypoint detection.

A task is a strategy of kind ``tasks`` (``ddkit.build("tasks", {"name": "detection"})``). The engine (train, label,
evaluate) only talks to this protocol, never to a concrete task, so a plugin can add a new problem type.

Data conventions (shared by every dataset and task):

* a dataset item is ``(image, target)``: ``image`` a float tensor ``[C, H, W]`` in ``[0, 1]``, ``target`` a dict with
  ``target["image_id"]: int`` and

  - classification: ``target["label"]: int`` (a category id of ``DatasetInfo.categories``);
  - detection: ``target["boxes"]: float32 [N, 4]`` (``xyxy`` pixels) and ``target["labels"]: int64 [N]`` (dataset
    category ids, not contiguous model labels); optional ``area [N]`` and ``iscrowd [N]`` (COCO);
  - keypoints: also ``target["keypoints"]: float32 [N, K, 3]`` ``(x, y, visibility)``, visibility 0/1/2 as in COCO.

* a *batch* is what :meth:`Task.collate` returns: a dict with ``"images"`` (a stacked ``[B, C, H, W]`` tensor for
  classification, a list of ``[C, H, W]`` tensors for detection), ``"targets"`` (the list of target dicts) and
  ``"index"`` (``int64 [B]``: each sample's index in the training set, ``-1`` when unknown; the teacher-output cache
  is keyed by it). A classification batch also has ``"labels"`` (``int64 [B]``, contiguous model labels).

* the mapping between dataset category ids and contiguous model labels lives in the task; the model remembers
  its dataset's categories (:func:`model_info`) so that a model loaded from a checkpoint predicts category ids.

This module is the engine API that plugins may import (with :mod:`ddkit.types`, :mod:`ddkit.errors`,
:mod:`ddkit.io`, :mod:`ddkit.ops`): the Task protocol, what loss terms see (:class:`LossContext`,
:class:`SetupContext`, :class:`FeatureHook`) and the dataset helpers of :mod:`ddkit.engine.data` it re-exports
(``get_target``, ``read_image``, ``image_size``, ``adapt_image``, ``check_images``, ``report_skipped``,
``split_indices``).

Loss terms (kind ``losses``):

A recipe's ``losses`` is a weighted list of terms; the trainer adds ``weight * term.compute(ctx)`` and logs each
term's unweighted value under its name. A term is any object with:

* ``weight: float``;
* ``teacher_outputs: str``: ``"none"`` (no teacher needed), ``"logits"`` (the teacher's class logits, which the
  trainer may serve from its per-sample cache), ``"features"`` (a teacher forward on every batch, for hooks) or
  ``"model"`` (the term runs the teacher itself, e.g. on the student's RoIs);
* ``tasks: tuple[str, ...]`` (optional): the task kinds the term supports (default: any);
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
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn

from ddkit.engine.coco_eval import coco_evaluate, coco_evaluate_per_category
from ddkit.engine.coco_results import coco_ground_truth
from ddkit.engine.data import (IMAGE_EXTENSIONS, adapt_image, check_images, get_target, image_size, read_image,
                               report_skipped, skipped_extra, split_indices)
from ddkit.errors import ConfigError
from ddkit.types import DatasetInfo, Instances

__all__ = ["warn_renamed_classes", "coco_evaluate", "coco_evaluate_per_category",
           "coco_ground_truth", "Task", "KeypointTask", "TrainOutputs", "Batch", "LossTerm", "LossContext", "SetupContext", "FeatureHook",
           "get_submodule", "unwrap_model", "attach_model_info", "model_info", "category_ids", "get_target",
           "read_image", "image_size", "adapt_image", "check_images", "report_skipped", "skipped_extra",
           "split_indices",
           "IMAGE_EXTENSIONS"]

Batch = dict[str, Any]


@dataclass
class TrainOutputs:
    """What one training forward of a student produces.

    Attributes:
        losses: the task's native supervised loss terms (``{"ce": ...}`` or torchvision's detection losses); their
            sum is the ``hard_label`` loss.
        logits: ``[B, C]`` class logits for soft-target distillation, or ``None`` where the task has none.
    """

    losses: dict[str, Tensor]
    logits: Tensor | None = None


@runtime_checkable
class Task(Protocol):
    """One problem type: model building, batching, native loss, inference and evaluation.

    Attributes:
        name: the registry name (``classification``, ``detection``, ``keypoints``); for messages only: the engine
            never compares it, it reads the capabilities below.
        prediction_type: ``"probs"`` (``predict`` returns class probabilities) or ``"instances"``.
        has_keypoints: targets and predictions carry keypoints ``[N, K, 3]``.
        supports_translate: whole-pixel random shifts keep a sample's target valid (the ``translate``
            augmentation; classification of small images).
        headline: the results-table column that ranks models (``"error %"``, ``"AP"``), one of
            :meth:`table_row`'s keys; ``higher_is_better`` its direction.

    Optional methods, asked for with ``getattr`` (a task without them works, with less said):

    * ``evaluate_per_class(preds, dataset) -> (metrics, [{"id", "name", "instances", <metric>: value, ...}])``:
      :meth:`evaluate_predictions`'s metrics and, from the same evaluation, one row per category of
      ``dataset.info`` (``nan`` where a class has no item), printed and saved by ``ddkit eval``;
    * ``chance_level(info) -> float``: the headline value of a model that learnt nothing; a teacher within 2 points
      of it is a warning atop the run's results.
    * ``trains_on_unlabeled`` (attribute, default ``False``): :meth:`training_forward` leaves out of the native loss
      the items whose target says ``unlabeled: True`` (a KD variant's ``transfer_set`` with the unlabeled part);
      a detector's loss, which would read an image without boxes as background, does not;
    * ``teacher_targets(teacher, batch) -> batch``: instead, gives those items targets read from the teacher (a
      detector: its confident detections) before :meth:`training_forward`, so that they train as labeled.
    """

    name: str
    prediction_type: str
    has_keypoints: bool
    supports_translate: bool
    headline: str
    higher_is_better: bool

    def config(self) -> dict[str, Any]:
        """The config block (``{"name": ..., **params}``, plain types) that rebuilds this task."""

    def build_model(self, model_cfg: Mapping[str, Any], info: DatasetInfo) -> nn.Module:
        """Build a model of kind ``models`` for this task and dataset (num classes / keypoints from ``info``).

        The model carries its config and dataset info (see :func:`model_info`). ``pretrained`` weights come only
        from a local checkpoint path; nothing is downloaded.
        """

    def collate(self, samples: Sequence[tuple[Tensor, dict[str, Any]]]) -> Batch:
        """A list of dataset items -> a batch (see the module docstring)."""

    def to_device(self, batch: Batch, device: torch.device | str) -> Batch:
        """Move a batch's tensors to ``device``."""

    def training_forward(self, model: nn.Module, batch: Batch) -> TrainOutputs:
        """One forward pass of ``model`` (in train mode, with grad) that yields the native losses and logits."""

    def loss(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        """The native supervised loss on a batch with hard labels (ground truth or pseudo-labels alike)."""

    def feature_forward(self, model: nn.Module, batch: Batch) -> Tensor | None:
        """A teacher-side forward (caller sets eval mode and no grad) that runs at least the layers hints use.

        Returns the class logits ``[B, C]`` where the task has them (used by soft targets), else ``None``.
        """

    def predict(self, model: nn.Module, images: Sequence[Tensor], native_size: bool = False
                ) -> list[Tensor] | list[Instances]:
        """Eval mode, no grad. ``images`` are ``[C, H, W]`` in ``[0, 1]``. ``native_size``: a detector runs at the
        input's own size instead of resizing it to its ``min_size`` (the labelling engine's scale views set it).

        Returns per image either class probabilities ``[C]`` (ordered like ``info.categories``) or
        :class:`~ddkit.types.Instances` whose labels are dataset category ids and coordinates are in the frame of
        the input image.
        """

    def evaluate(self, model: nn.Module, dataset: Any, batch_size: int = 8) -> dict[str, float]:
        """Predict on every item of ``dataset`` and score against its targets (see :meth:`evaluate_predictions`)."""

    def evaluate_predictions(self, preds: Sequence[Any], dataset: Any) -> dict[str, float]:
        """Score predictions aligned with ``dataset``'s items: accuracy/error or COCO AP (pycocotools)."""

    def hflip(self, image: Tensor, target: dict[str, Any], info: DatasetInfo) -> tuple[Tensor, dict[str, Any]]:
        """Horizontally flip a training sample (boxes and keypoints too, using ``info.flip_indices``)."""

    def table_row(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """:meth:`evaluate`'s metrics as the results table's columns (percent, rounded), ``headline`` among them."""

    def quality_metric(self, quality: Mapping[str, Any]) -> str:
        """The key of a labelling quality report (``quality.json``'s ``single`` / ``ensemble``) that measures
        this task's TTA (e.g. ``accuracy``, ``AP``, ``kp_AP``)."""


@runtime_checkable
class KeypointTask(Task, Protocol):
    """A task whose model has a keypoint head on RoIs (torchvision's KeypointRCNN)."""

    def keypoint_heatmaps(self, model: nn.Module, images: Sequence[Tensor], rois: Sequence[Tensor],
                          native_size: bool = False) -> list[Tensor]:
        """Run the keypoint head on given boxes.

        Args:
            images: ``[C, H, W]`` images in ``[0, 1]``.
            rois: per image ``[N, 4]`` ``xyxy`` boxes in the image's pixel frame.

        Returns:
            per image ``[N, K, h, w]`` heatmap logits, each map covering its RoI (the RoI's frame, not the image's).
        """

    def heatmaps_to_keypoints(self, heatmaps: Sequence[Tensor], rois: Sequence[Tensor]) -> list[Tensor]:
        """Per image ``[N, K, h, w]`` heatmaps of ``[N, 4]`` RoIs -> ``[N, K, 3]`` ``(x, y, score)`` in pixels.

        The score is the heatmap's maximum logit at the keypoint (as torchvision and Detectron report it).
        """


# ----------------------------------------------------------------------------------------------------------- helpers
def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel / torch.compile wrapper."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def attach_model_info(model: nn.Module, model_cfg: Mapping[str, Any], info: DatasetInfo,
                      task_cfg: Mapping[str, Any]) -> nn.Module:
    """Remember on the model (as plain attributes) how to rebuild it: its config, dataset info and task config."""
    model.ddkit_model_cfg = dict(model_cfg)
    model.ddkit_info = info
    model.ddkit_task_cfg = dict(task_cfg)
    return model


def model_info(model: nn.Module) -> tuple[dict[str, Any], DatasetInfo, dict[str, Any]]:
    """``(model_cfg, info, task_cfg)`` attached by :meth:`Task.build_model`; raises if the model was built otherwise."""
    inner = unwrap_model(model)
    try:
        return inner.ddkit_model_cfg, inner.ddkit_info, inner.ddkit_task_cfg
    except AttributeError:
        raise ValueError("this model was not built by a ddkit task (Task.build_model); its config and dataset "
                         "info are unknown") from None


def warn_renamed_classes(path: Any, theirs: Sequence[str] | None, ours: Sequence[str]) -> None:
    """One warning when a weights file predicts as many classes as the dataset but names them otherwise: its class
    head was loaded by index (class i of the file became the dataset's class i). ``theirs``: ``None`` = unknown."""
    if theirs is None or len(theirs) != len(ours) or list(theirs) == list(ours):
        return
    i = next(i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b)
    n = sum(a != b for a, b in zip(theirs, ours))
    warnings.warn(f"{path}: {n} of its {len(ours)} class names differ from the dataset's (class {i} is {theirs[i]!r} "
                  f"there, {ours[i]!r} here); its class head was loaded by index, so check the dataset's class order",
                  stacklevel=3)


def category_ids(model: nn.Module) -> list[int]:
    """The dataset category ids in the order of the model's contiguous labels."""
    return [int(c["id"]) for c in model_info(model)[1].categories]


# ------------------------------------------------------------------------------------------------------ losses
@runtime_checkable
class LossTerm(Protocol):
    """A loss term. Optional methods the trainer and the runner call when a term has them: ``check_models(student,
    teacher)`` (before any stage trains, with the recipe's built models; raise :class:`ConfigError` for models the
    term cannot work with, e.g. a hint layer that does not exist; ``teacher`` may be None), ``setup(ctx)`` (its
    trainable extras, once, with a dry batch) and ``close()``."""

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
    """Keeps the latest output of one submodule (captured by a forward hook; the model's code is not changed): a
    tensor, or the list of maps of a multi-level module such as an FPN (its dict's values, in order)."""

    def __init__(self, model: nn.Module, path: str, role: str = "model"):
        self.path, self.role = path, role
        self.module = get_submodule(model, path, role)
        self.value: Tensor | list[Tensor] | None = None
        self._handle = self.module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        levels = list(output.values()) if isinstance(output, Mapping) else output
        if isinstance(levels, (list, tuple)) and levels and all(isinstance(v, Tensor) for v in levels):
            self.value = list(levels)
            return
        if not isinstance(output, Tensor):
            kind = type(output).__name__
            raise ConfigError(f"{self.role} module {self.path!r} returns a {kind}, not a tensor or a list / dict of "
                              "tensors; hook a submodule that returns one (e.g. backbone.body.layer3)")
        self.value = output

    def get(self) -> Tensor | list[Tensor]:
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
