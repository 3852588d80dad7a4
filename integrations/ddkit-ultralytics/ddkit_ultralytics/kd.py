"""``yolo_kd``: soft classification targets for Ultralytics YOLO students (knowledge distillation on a one-stage
detector's dense predictions).

At every anchor point of the Detect head the student's class logits are taught the teacher's per-class sigmoid
probabilities: Hinton et al.'s soft targets (2015) in the sigmoid form one-stage detectors use, the Bernoulli KL at
temperature ``T``, ``T^2``-scaled and normalised by the teacher's expected number of object anchors, as in Tang et
al., *Learning Efficient Detector with Semi-supervised Adaptive Distillation*, 2019, without their adaptive weights
(:func:`ddkit.ops.distill.dense_soft_targets`). With ``box_weight > 0`` the box branch is distilled too: each box
edge's DFL distribution as in Zheng et al., *Localization Distillation for Dense Object Detection*, 2022 (LD: the
KL at ``box_temperature`` = 10), at every anchor weighted by the teacher's object confidence (its highest class
probability) where LD uses the student's positives and a "valuable localization region"
(:func:`ddkit.ops.distill.localization_distillation`).

The student's forward of the training step is reused: one forward hook on its network keeps the letterboxed batch it
saw and its head's raw training output; the teacher (eval mode, no grad) then runs on that same batch. Written for
the Detect head of Ultralytics 8.4, whose training output is ``{"boxes", "scores" [N, K, A], "feats"}`` (end-to-end
heads such as YOLO26: ``{"one2many": ..., "one2one": ...}``, of which the dense one-to-many branch is distilled) and
whose eval output is ``(decoded, raw)``; another form is refused with a :class:`ConfigError`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ddkit import ConfigError
from ddkit.engine.task import LossContext, SetupContext, unwrap_model
from ddkit.ops.distill import dense_soft_targets, localization_distillation
from ddkit_ultralytics.adapter import YoloAdapter  # imports no Ultralytics code


@dataclass
class YoloKDParams:
    temperature: float = 1.0
    weight: float = 1.0
    box_weight: float = 0.0
    box_temperature: float = 10.0

    def __post_init__(self) -> None:
        for name in ("temperature", "box_temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("weight", "box_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def _head_output(out: Any, key: str) -> Tensor:
    """The ``[N, C, A]`` tensor ``key`` ("scores" or "boxes") of a YOLO Detect head's raw output, in train mode (a
    dict) or eval mode (``(decoded, dict)``)."""
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict):
        out = out[1]
    if isinstance(out, dict) and "one2many" in out:  # end-to-end head: the dense branch
        out = out["one2many"]
    value = out.get(key) if isinstance(out, dict) else None
    if not isinstance(value, Tensor) or value.ndim != 3:
        from importlib.metadata import version

        raise ConfigError(f"yolo_kd: the YOLO head of Ultralytics {version('ultralytics')} returned a "
                          f"{type(out).__name__} without {key!r} [N, channels, anchors]; this term reads the Detect "
                          "head of Ultralytics 8.4 (install the version ddkit-ultralytics is tested with)")
    return value


def head_class_logits(out: Any) -> Tensor:
    """``[N, A, K]`` class logits (before the sigmoid) from a YOLO Detect head's raw output."""
    return _head_output(out, "scores").transpose(1, 2)


def head_box_logits(out: Any) -> Tensor:
    """``[N, A, 4, R]`` DFL logits (``R`` bins per box edge, side-major as Ultralytics' ``DFL`` reads them) from a
    YOLO Detect head's raw output."""
    boxes = _head_output(out, "boxes")
    n, c, a = boxes.shape
    return boxes.view(n, 4, c // 4, a).permute(0, 3, 1, 2)


def yolo_pair(ctx: SetupContext) -> tuple[YoloAdapter, YoloAdapter]:
    """The unwrapped ``(student, teacher)``: both YOLO models of this plugin with the same classes and strides,
    else a one-line :class:`ConfigError` naming the fix."""
    if ctx.teacher is None:
        raise ConfigError("yolo_kd needs a teacher; give a YOLO teacher checkpoint")
    student, teacher = unwrap_model(ctx.student), unwrap_model(ctx.teacher)
    for role, m in (("student", student), ("teacher", teacher)):
        if not isinstance(m, YoloAdapter):
            raise ConfigError(f"yolo_kd distils Ultralytics YOLO detectors (model: {{name: yolo}}); the {role} is a "
                              f"{type(m).__name__} (torchvision one-stage detectors: dense_kd, two-stage: "
                              "detector_kd)")
    if student.num_classes != teacher.num_classes:
        raise ConfigError(f"yolo_kd: the student predicts {student.num_classes} classes and the teacher "
                          f"{teacher.num_classes}; train both on the dataset's categories")
    strides = [m.net.stride.tolist() for m in (student, teacher)]
    if strides[0] != strides[1]:
        raise ConfigError(f"yolo_kd: the student's head has strides {strides[0]} and the teacher's {strides[1]}; "
                          "use cfgs with the same detection levels (e.g. yolov8n.yaml and yolov8s.yaml, no -p2/-p6 "
                          "mix)")
    return student, teacher


class YoloKD:
    """Per-anchor soft class targets from a YOLO teacher to a YOLO student (see the module's docstring). The teacher
    has the same classes and strides (e.g. a larger scale of the same family); it sees the student's letterboxed
    batch, so its own ``imgsz`` does not matter."""

    teacher_outputs = "model"  # the term runs the teacher itself
    stage_fraction = 0.0
    tasks = ("detection",)
    # the toy detector ddkit's loss-contract test trains this term on (an eighth of yolov8n at 64 px)
    contract_model = {"name": "yolo", "cfg": "yolov8n.yaml", "imgsz": 64, "width": 0.125, "conf": 0.0}

    def __init__(self, temperature: float = 1.0, weight: float = 1.0, box_weight: float = 0.0,
                 box_temperature: float = 10.0):
        self.temperature, self.weight = temperature, weight
        self.box_weight, self.box_temperature = box_weight, box_temperature
        self._hook: Any = None
        self._seen: tuple[Tensor, Any] | None = None

    def setup(self, ctx: SetupContext) -> None:
        student, _ = yolo_pair(ctx)
        self.close()
        # The network's output is its Detect head's output; its input is the batch after letterboxing.
        self._hook = student.net.register_forward_hook(self._keep)
        return None

    def _keep(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if module.training:  # the training step's forward, not a dry or evaluation one
            self._seen = (args[0].detach(), out)

    def compute(self, ctx: LossContext) -> Tensor:
        seen, self._seen = self._seen, None
        if seen is None:
            raise RuntimeError("yolo_kd: the student's network did not run in training mode this step")
        images, s_out = seen
        s_logits = head_class_logits(s_out)
        teacher = unwrap_model(ctx.teacher)
        teacher.eval()  # a frozen teacher: BatchNorm must use, not update, its statistics
        with torch.no_grad():
            t_out = teacher.net(images)
        t_logits = head_class_logits(t_out)
        if t_logits.shape != s_logits.shape:
            raise ConfigError(f"yolo_kd: the teacher predicts {tuple(t_logits.shape)} class scores on this batch and "
                              f"the student {tuple(s_logits.shape)} (images, anchors, classes); give both the same "
                              "strides and classes")
        loss = dense_soft_targets(s_logits, t_logits, self.temperature)
        if self.box_weight > 0:
            s_boxes, t_boxes = head_box_logits(s_out), head_box_logits(t_out)
            if s_boxes.shape != t_boxes.shape:
                raise ConfigError(f"yolo_kd: box_weight needs the same DFL bins in both heads; the teacher has "
                                  f"{t_boxes.shape[-1]} per edge and the student {s_boxes.shape[-1]}")
            objectness = torch.sigmoid(t_logits.float()).amax(-1)  # [N, A]
            loss = loss + self.box_weight * localization_distillation(s_boxes, t_boxes, objectness,
                                                                      self.box_temperature)
        return loss

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._seen = None
