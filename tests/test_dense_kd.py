"""dense_kd (soft class targets on a one-stage detector's anchors) and hints on every FPN level: the loss against a
slow reference, zero against an identical teacher, training a RetinaNet student, and clear refusals."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import ddkit
from ddkit.engine.task import LossContext, SetupContext
from ddkit.engine.train import train_model
from ddkit.errors import ConfigError
from ddkit.testing.losses import TINY_RETINANET, toy_detection
from ddkit_plugins.dense_kd import dense_soft_targets

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)


def reference_dense(s, t, T):
    """Bernoulli KL per anchor and class, by hand in float64."""
    total, objects = 0.0, 0.0
    for srow_img, trow_img in zip(s.tolist(), t.tolist()):
        for srow, trow in zip(srow_img, trow_img):
            objects += max(1 / (1 + math.exp(-b)) for b in trow)
            for a, b in zip(srow, trow):
                ps, pt = 1 / (1 + math.exp(-a / T)), 1 / (1 + math.exp(-b / T))
                total += pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps))
    return total * T * T / max(objects, 1.0)


@pytest.mark.parametrize("seed", range(4))
def test_dense_soft_targets_match_a_slow_reference(seed):
    g = torch.Generator().manual_seed(seed)
    n, a, k = [(1, 1, 1), (2, 7, 3), (1, 30, 5), (3, 4, 2)][seed]
    s, t = torch.randn(n, a, k, generator=g) * 4, torch.randn(n, a, k, generator=g) * 4 - 3 * (seed == 3)
    for T in (1.0, 2.5):
        assert float(dense_soft_targets(s, t, T)) == pytest.approx(reference_dense(s.double(), t.double(), T),
                                                                    rel=1e-4, abs=1e-6)
    assert float(dense_soft_targets(t, t, 1.0)) == pytest.approx(0.0, abs=1e-5)


def reference_ld(s, t, w, T):
    """LD by hand in float64: per anchor and edge the KL of the tempered bin softmaxes, mean over the 4 edges,
    weighted by the anchor's weight, over the weights' sum (at least 1), times T^2."""
    total = 0.0
    for n in range(s.shape[0]):
        for a in range(s.shape[1]):
            kl = 0.0
            for side in range(4):
                p = [math.exp(v / T) for v in t[n, a, side].tolist()]
                q = [math.exp(v / T) for v in s[n, a, side].tolist()]
                p, q = [x / sum(p) for x in p], [x / sum(q) for x in q]
                kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)) / 4
            total += float(w[n, a]) * kl
    return total * T * T / max(float(w.sum()), 1.0)


@pytest.mark.parametrize("seed", range(3))
def test_localization_distillation_matches_a_slow_reference(seed):
    from ddkit.ops.distill import localization_distillation

    g = torch.Generator().manual_seed(seed)
    n, a, r = [(1, 1, 2), (2, 5, 16), (3, 4, 7)][seed]
    s, t = torch.randn(n, a, 4, r, generator=g) * 3, torch.randn(n, a, 4, r, generator=g) * 3
    w = torch.rand(n, a, generator=g) * (10 if seed == 2 else 1)  # weights summing under and over 1
    for T in (1.0, 10.0):
        assert float(localization_distillation(s, t, w, T)) == pytest.approx(reference_ld(s, t, w, T), rel=1e-4,
                                                                               abs=1e-7)
    assert float(localization_distillation(t, t, w, 10.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(localization_distillation(s, t, torch.zeros(n, a), 10.0)) == 0.0


def _setup(name, student, teacher, batch, task, **params):
    term = ddkit.build("losses", {"name": name, **params})
    term.setup(SetupContext(task, student, teacher, batch, torch.device("cpu"), 10))
    return term


def test_an_identical_one_stage_teacher_gives_zero_and_close_removes_the_hooks():
    task, student, _, batch = toy_detection(TINY_RETINANET)
    teacher = copy.deepcopy(student).eval()
    term = _setup("dense_kd", student, teacher, batch, task)
    student.train()
    out = task.training_forward(student, batch)
    assert abs(float(term.compute(LossContext(task, student, teacher, batch, out, 0, 10)).detach())) < 1e-5
    term.close()
    assert not student.head._forward_hooks and not teacher.backbone._forward_hooks


def test_refuses_two_stage_detectors():
    task, student, teacher, batch = toy_detection()
    with pytest.raises(ConfigError, match="one-stage detectors .*the student"):
        _setup("dense_kd", student, teacher, batch, task)


def test_a_hint_on_the_fpn_imitates_every_level_through_one_adapter():
    task, student, teacher, batch = toy_detection(TINY_RETINANET)
    wide = task.build_model({**TINY_RETINANET, "backbone": "resnet18"}, ddkit.build(
        "datasets", {"name": "synthetic_shapes", "num_images": 2, "image_size": 64}).info).eval()
    hint = ddkit.build("losses", {"name": "hint", "teacher_layer": "backbone", "student_layer": "backbone"})
    adapter = hint.setup(SetupContext(task, student, wide, batch, torch.device("cpu"), 10))
    assert (adapter.in_channels, adapter.out_channels) == (64, 256)  # tiny FPN -> ResNet-18 FPN widths
    student.train()
    task.training_forward(student, batch)
    with torch.no_grad():
        task.feature_forward(wide, batch)
    s_levels, t_levels = hint.student_hook.get(), hint.teacher_hook.get()
    assert isinstance(s_levels, list) and len(s_levels) == len(t_levels) == 5  # P3-P7 of RetinaNet
    with torch.no_grad():
        expected = sum(float(((adapter(s) - t) ** 2).mean()) for s, t in zip(s_levels, t_levels)) / 5
    assert float(hint.compute(None).detach()) == pytest.approx(expected, rel=1e-5)
    hint.close()


def test_trains_a_retinanet_student_with_dense_kd_and_an_fpn_hint(tmp_path):
    task = ddkit.build("tasks", "detection")
    ds = ddkit.build("datasets", {"name": "synthetic_shapes", "num_images": 6, "image_size": 64})
    torch.manual_seed(0)
    teacher = task.build_model({**TINY_RETINANET, "backbone": "resnet18"}, ds.info)
    student = task.build_model(TINY_RETINANET, ds.info)
    before = copy.deepcopy(student.state_dict())
    losses = [{"name": "hard_label"}, {"name": "dense_kd"},
              {"name": "hint", "teacher_layer": "backbone", "student_layer": "backbone", "weight": 0.5}]
    res = train_model(task, student, ds, {"iterations": 3, "batch_size": 2, "log_every": 1}, tmp_path,
                      teacher=teacher, losses=losses, progress=False)
    logs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"losses"' in line]
    assert res["finished"] and len(logs) == 3
    for r in logs:
        assert r["losses"]["dense_kd"] > 0 and r["losses"]["hint"] > 0 and math.isfinite(r["loss"])
    assert any(not torch.equal(v, student.state_dict()[k].cpu()) for k, v in before.items())


def test_the_one_stage_kd_recipe_runs_end_to_end(tmp_path):
    """configs/synthetic_det_kd_onestage.yaml at tiny settings: every variant trains and its AP gain is reported."""
    from pathlib import Path

    from ddkit.config import load_config
    from ddkit.engine.run import run_recipe

    cfg = load_config(Path(__file__).parents[1] / "configs" / "synthetic_det_kd_onestage.yaml",
                      [f"run.out_dir={tmp_path}", "run.device=cpu", "data.dataset.num_images=8",
                       "data.dataset.image_size=64", "teacher.model.min_size=64", "teacher.model.max_size=64",
                       "student.model.min_size=64", "student.model.max_size=64", "teacher.train.iterations=2",
                       "teacher.train.batch_size=2", "student.train.iterations=2", "student.train.batch_size=2"])
    summary = run_recipe(cfg, progress=False)
    variants = {"kd_dense_kd", "kd_dense_kd_hint"}
    assert {r["stage"] for r in summary["rows"]} == {"teacher", "kd_alone"} | variants
    assert set(summary["kd_ap_gain"]) == variants
    logs = (tmp_path / "kd_dense_kd_hint" / "metrics.jsonl").read_text()
    assert '"dense_kd"' in logs and '"hint"' in logs
