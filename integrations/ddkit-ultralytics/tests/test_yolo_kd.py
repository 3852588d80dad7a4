"""``yolo_kd``: soft class targets from a YOLO teacher's Detect head. Its value against ``dense_soft_targets`` of
class logits taken independently from the two networks, zero against an identical teacher, refusals, and a YOLO
student trained with it. (``dense_soft_targets`` itself is tested against a slow reference in ddkit's
tests/test_dense_kd.py.)"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

import ddkit
from ddkit import ConfigError
from ddkit.engine.task import LossContext, SetupContext
from ddkit.ops.distill import dense_soft_targets, localization_distillation
from ddkit.testing import check_spec
from ddkit.testing.losses import TINY_RETINANET, toy_detection
from ddkit.testing.models import info_for_task
from ddkit_ultralytics.kd import head_box_logits, head_class_logits
from ddkit_ultralytics.letterbox import fitted_size, letterbox
from yolo_common import DATA, TINY


@pytest.fixture(scope="module")
def coco8():
    return ddkit.build("datasets", {"name": "yolo", "root": str(DATA / "coco8"), "split": "train"})


def _spread(model: nn.Module) -> nn.Module:
    """Random class-head weights: an untrained head scores every anchor at its prior bias (~1e-5), so a different
    teacher would differ only by rounding."""
    with torch.no_grad():
        for branch in model.net.model[-1].cv3:
            branch[-1].weight.normal_(0, 0.2)
            branch[-1].bias.fill_(-2.0)
    return model


def _calibrated(model: nn.Module, task, batch) -> nn.Module:
    """BatchNorm's running statistics set to the batch's own: untrained ones (mean 0, variance 1) shrink the
    features of an eval-mode network towards 0, so that every anchor would score alike."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0
    model.train()
    with torch.no_grad():
        task.feature_forward(model, batch)
    return model


def _pair(coco8):
    """``(task, student, teacher, batch)``: a tiny YOLO student and a wider teacher whose class scores differ between
    anchors, on two coco8 images."""
    task = ddkit.build("tasks", "detection")
    torch.manual_seed(0)
    student = task.build_model(TINY, coco8.info)
    batch = task.collate([coco8[i] for i in range(2)])
    teacher = _spread(_calibrated(task.build_model({**TINY, "width": 0.25}, coco8.info), task, batch))
    return task, student, teacher, batch


def _canvas(batch, student) -> torch.Tensor:
    """The letterboxed batch the student trains on (``train_scale`` 1)."""
    images = list(batch["images"])
    sizes = [fitted_size(tuple(im.shape[-2:]), TINY["imgsz"]) for im in images]
    canvas, _, _ = letterbox(images, sizes, student.stride, canvas=(TINY["imgsz"],) * 2)
    return canvas


def _setup(student, teacher, batch, task, **params):
    term = ddkit.build("losses", {"name": "yolo_kd", **params})
    term.setup(SetupContext(task, student, teacher, batch, torch.device("cpu"), 10))
    return term


def _step(term, task, student, teacher, batch) -> torch.Tensor:
    out = task.training_forward(student, batch)
    return term.compute(LossContext(task, student, teacher, batch, out, 0, 10))


def test_registered_by_this_distribution():
    entry = next(e for e in ddkit.get_registry().entries("losses") if e.spec.name == "yolo_kd")
    assert entry.provider.replace("_", "-") == "ddkit-ultralytics"
    check_spec(entry)
    with pytest.raises(ConfigError, match="temperature"):
        ddkit.build("losses", {"name": "yolo_kd", "temperature": 0})


def test_value_is_dense_soft_targets_of_the_two_heads(coco8):
    """The student's logits from its raw training output, the teacher's from its eval-mode output (checked against
    the class probabilities Ultralytics' inference decodes), on the canvas the student trains on (``train_scale``
    1)."""
    task, student, teacher, batch = _pair(coco8)
    assert teacher.training  # left in train mode: the term must run it in eval mode
    teacher_state = copy.deepcopy(teacher.state_dict())
    term = _setup(student, teacher, batch, task, temperature=2.0)
    student.train()
    value = _step(term, task, student, teacher, batch)
    assert value.requires_grad
    assert not teacher.training and all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())

    canvas = _canvas(batch, student)
    with torch.no_grad():
        s_logits = student.net(canvas)["scores"].transpose(1, 2)  # train mode: the same batch statistics
        decoded, raw = teacher.net(canvas)  # eval mode: decoded [N, 4 + K, A] and the raw head outputs
    t_logits = raw["scores"].transpose(1, 2)
    # the logits whose sigmoid Ultralytics' inference reports as the class probabilities
    assert torch.allclose(torch.sigmoid(t_logits), decoded[:, 4:].transpose(1, 2))
    assert s_logits.shape == (2, 8 * 8 + 4 * 4 + 2 * 2, 80)  # strides 8, 16, 32 on 64 px; coco8's 80 classes
    assert float(t_logits.std()) > 1.0  # the teacher's scores differ between anchors and classes
    expected = float(dense_soft_targets(s_logits, t_logits, 2.0))
    assert expected > 0.1
    assert float(value.detach()) == pytest.approx(expected, rel=1e-4)
    value.backward()  # the gradient reaches the student's class head, not the teacher
    assert all(bool(b[-1].weight.grad.abs().sum() > 0) for b in student.net.model[-1].cv3)
    assert all(p.grad is None for p in teacher.parameters())
    term.close()


def test_box_weight_adds_localization_distillation_of_the_dfl_bins(coco8):
    """``box_weight``: LD on each box edge's DFL bins, weighted by the teacher's object confidence. The bins are read
    as Ultralytics' DFL reads them (their expectation is what its ``dfl`` module decodes)."""
    task, student, teacher, batch = _pair(coco8)
    term = _setup(student, teacher, batch, task, temperature=2.0, box_weight=0.5, box_temperature=4.0)
    student.train()
    value = _step(term, task, student, teacher, batch)

    canvas = _canvas(batch, student)
    with torch.no_grad():
        s_out = student.net(canvas)
        _, t_out = teacher.net(canvas)
    t_bins = head_box_logits(t_out)
    assert t_bins.shape == (2, 84, 4, 16)  # 84 anchors, 4 edges, reg_max 16
    expectation = (t_bins.softmax(-1) * torch.arange(16.0)).sum(-1)  # [N, A, 4]
    assert torch.allclose(expectation, teacher.net.model[-1].dfl(t_out["boxes"]).transpose(1, 2), atol=1e-5)
    t_logits = head_class_logits(t_out)
    ld = localization_distillation(head_box_logits(s_out), t_bins, torch.sigmoid(t_logits).amax(-1), 4.0)
    assert float(ld) > 1e-3
    expected = float(dense_soft_targets(head_class_logits(s_out), t_logits, 2.0)) + 0.5 * float(ld)
    assert float(value.detach()) == pytest.approx(expected, rel=1e-4)
    value.backward()  # the gradient reaches the student's box branch
    assert all(bool(b[-1].weight.grad.abs().sum() > 0) for b in student.net.model[-1].cv2)
    term.close()


def test_an_identical_teacher_gives_zero_and_close_removes_the_hook(coco8):
    task = ddkit.build("tasks", "detection")
    torch.manual_seed(0)
    batch = task.collate([coco8[i] for i in range(2)])
    student = _spread(_calibrated(task.build_model(TINY, coco8.info), task, batch))
    teacher = copy.deepcopy(student).eval()
    term = _setup(student, teacher, batch, task, box_weight=1.0)  # box bins too
    student.train()
    for m in student.modules():  # BatchNorm on running statistics, as in the eval-mode teacher
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    assert abs(float(_step(term, task, student, teacher, batch).detach())) < 1e-5
    with torch.no_grad():
        _spread(teacher)  # now a different teacher: the same term sees it
    assert float(_step(term, task, student, teacher, batch).detach()) > 0.1
    assert student.net._forward_hooks
    term.close()
    assert not student.net._forward_hooks and not teacher.net._forward_hooks
    with pytest.raises(RuntimeError, match="did not run in training mode"):
        term.compute(LossContext(task, student, teacher, batch, None, 0, 10))


def test_refusals_name_the_fix(coco8):
    task = ddkit.build("tasks", "detection")
    batch = task.collate([coco8[i] for i in range(2)])
    student = task.build_model(TINY, coco8.info)
    few = task.build_model(TINY, info_for_task("detection", num_classes=3))
    with pytest.raises(ConfigError, match="student predicts 80 classes and the teacher 3"):
        _setup(student, few, batch, task)
    p2 = task.build_model({**TINY, "cfg": "yolov8n-p2.yaml"}, coco8.info)
    with pytest.raises(ConfigError, match=r"strides \[8.0, 16.0, 32.0\] and the teacher's \[4.0, 8.0, 16.0, 32.0\]"):
        _setup(student, p2, batch, task)
    tv_task, retinanet, _, tv_batch = toy_detection(TINY_RETINANET)
    with pytest.raises(ConfigError, match="the teacher is a RetinaNet.*dense_kd"):
        _setup(student, retinanet, batch, task)
    with pytest.raises(ConfigError, match="the student is a RetinaNet"):
        _setup(retinanet, student, tv_batch, tv_task)
    with pytest.raises(ConfigError, match="needs a teacher"):
        _setup(student, None, batch, task)
    # Ultralytics 8.3's training form (per-level maps of reg_max * 4 + classes channels) is not read
    with pytest.raises(ConfigError, match="without 'scores'"):
        head_class_logits([torch.zeros(1, 64 + 80, 8, 8)])


def test_trains_a_yolo_student_with_yolo_kd_and_a_neck_hint(coco8, tmp_path):
    from ddkit.engine.train import train_model

    task = ddkit.build("tasks", "detection")
    torch.manual_seed(0)
    teacher = _spread(task.build_model({**TINY, "width": 0.25}, coco8.info))
    student = task.build_model(TINY, coco8.info)
    teacher_state = copy.deepcopy(teacher.state_dict())
    losses = [{"name": "hard_label"}, {"name": "yolo_kd", "temperature": 2.0},
              {"name": "hint", "teacher_layer": "net.model.15", "student_layer": "net.model.15", "weight": 0.5}]
    cfg = {"iterations": 3, "batch_size": 2, "optimizer": "adamw", "lr": 0.01, "log_every": 1}
    result = train_model(task, student, coco8, cfg, tmp_path, teacher=teacher, losses=losses, device="cpu",
                         progress=False)
    assert result["finished"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    kd = [r["losses"]["yolo_kd"] for r in rows if "yolo_kd" in r.get("losses", {})]
    assert len(kd) == 3 and all(math.isfinite(v) and v > 0 for v in kd), kd
    assert not student.net._forward_hooks and not student.net.model[15]._forward_hooks
    assert not teacher.training and not teacher.net.model[15]._forward_hooks
    # the teacher ran in eval mode: its BatchNorm statistics did not move
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())


def test_a_yolo_students_ema_is_ultralytics_model_ema(coco8, tmp_path, monkeypatch):
    """``train.ema_decay`` against Ultralytics' own ``ModelEMA`` on the same weights: started from the first step's
    weights and updated with each later step's (ddkit's first update copies), every floating tensor of ``model.pt``
    equals it; a hint's forward hooks stay out of the average."""
    from ultralytics.utils.torch_utils import ModelEMA

    from ddkit.engine.checkpoint import load_model
    from ddkit.engine.ema import EMAHook
    from ddkit.engine.task import unwrap_model
    from ddkit.engine.train import train_model
    from ddkit.engine.trainer import Trainer

    task = ddkit.build("tasks", "detection")
    torch.manual_seed(0)
    teacher = task.build_model({**TINY, "width": 0.25}, coco8.info)
    student = task.build_model(TINY, coco8.info)
    shell = copy.deepcopy(student)  # holds each step's weights for ModelEMA
    raw: list[dict[str, torch.Tensor]] = []
    step = Trainer.run_step

    def recording_step(self):
        step(self)
        raw.append(copy.deepcopy(unwrap_model(self.student).state_dict()))

    monkeypatch.setattr(Trainer, "run_step", recording_step)
    averages: list[nn.Module] = []
    start = EMAHook.before_train
    monkeypatch.setattr(EMAHook, "before_train", lambda self: (averages.append(self.average.module), start(self)))
    losses = [{"name": "hard_label"},
              {"name": "hint", "teacher_layer": "net.model.15", "student_layer": "net.model.15", "weight": 0.5}]
    cfg = {"iterations": 4, "batch_size": 2, "optimizer": "adamw", "lr": 0.01, "ema_decay": 0.99, "ema_tau": 2}
    result = train_model(task, student, coco8, cfg, tmp_path, teacher=teacher, losses=losses, device="cpu",
                         progress=False)
    shell.load_state_dict(raw[0])
    reference = ModelEMA(shell, decay=0.99, tau=2)
    for weights in raw[1:]:
        shell.load_state_dict(weights)
        reference.update(shell)
    saved = load_model(result["model_path"])[1].state_dict()
    expected = reference.ema.state_dict()
    floats = [k for k, v in expected.items() if v.is_floating_point()]
    assert floats and any("running_mean" in k for k in floats)
    for k in floats:
        torch.testing.assert_close(saved[k], expected[k], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(saved["net.model.22.cv3.0.2.weight"], raw[-1]["net.model.22.cv3.0.2.weight"])
    assert len(averages) == 1 and not any(m._forward_hooks for m in averages[0].modules())
