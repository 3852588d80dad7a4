"""detector_kd (Chen et al. 2017 for two-stage detectors): its terms against a slow reference, zero against an
identical teacher, training end to end on generated shapes, and clear refusals."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

import ddkit
from ddkit.engine.task import SetupContext, LossContext
from ddkit.engine.train import train_model
from ddkit.errors import ConfigError
from ddkit.testing.losses import TINY_FASTERRCNN as CFG, toy_detection
from ddkit_plugins.detector_kd import detector_kd_terms, roi_mimic, rpn_kd_terms

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)



def reference_error(r, y, loss):
    """One box's regression error by hand: squared L2, or torchvision's smooth L1 (beta 1/9) summed."""
    if loss == "l2":
        return sum((a - b) ** 2 for a, b in zip(r.tolist(), y.tolist()))
    beta, total = 1 / 9, 0.0
    for a, b in zip(r.tolist(), y.tolist()):
        d = abs(a - b)
        total += 0.5 * d * d / beta if d < beta else d - 0.5 * beta
    return total


def reference_regression(rs, rt, y, margin, loss, target):
    """One foreground box's regression term: the student's error where not better than the teacher's (the paper's
    bound, ``ground_truth``), or its distance to the teacher's deltas (``teacher``)."""
    if target == "teacher":
        return reference_error(rs, rt, loss)
    es, et = reference_error(rs, y, loss), reference_error(rt, y, loss)
    return es if es + margin > et else 0.0


def reference_terms(s_logits, t_logits, s_deltas, t_deltas, labels, targets, T, bg, margin, loss="l2",
                    target="ground_truth"):
    """Loops over RoIs and classes, in float64 Python."""
    soft = 0.0
    for srow, trow in zip(s_logits.tolist(), t_logits.tolist()):
        zs = sum(math.exp(v / T) for v in srow)
        zt = sum(math.exp(v / T) for v in trow)
        for c, (a, b) in enumerate(zip(srow, trow)):
            ps, pt = math.exp(a / T) / zs, math.exp(b / T) / zt
            soft += (bg if c == 0 else 1.0) * pt * (math.log(pt) - math.log(ps))
    soft = soft / len(s_logits) * T * T if len(s_logits) else 0.0
    errs = []
    for r in range(len(labels)):
        c = int(labels[r])
        if c == 0:
            continue
        rs, rt, y = s_deltas[r, 4 * c:4 * c + 4], t_deltas[r, 4 * c:4 * c + 4], targets[r]
        errs.append(reference_regression(rs, rt, y, margin, loss, target))
    return soft, (sum(errs) / len(labels) if errs else 0.0)


@pytest.mark.parametrize("target", ["ground_truth", "teacher"])
@pytest.mark.parametrize("seed", range(6))
def test_terms_match_a_slow_reference(seed, target):
    g = torch.Generator().manual_seed(seed)
    r, c = [0, 1, 7, 30, 5, 12][seed], 4
    s_logits, t_logits = torch.randn(r, c, generator=g) * 3, torch.randn(r, c, generator=g) * 3
    s_deltas, t_deltas = torch.randn(r, 4 * c, generator=g), torch.randn(r, 4 * c, generator=g)
    labels = torch.randint(0, c, (r,), generator=g) if seed != 4 else torch.zeros(r, dtype=torch.long)  # 4: no fg
    targets = torch.randn(r, 4, generator=g)
    if seed == 5:  # ties: the teacher exactly as good as the student on every RoI
        t_deltas = s_deltas.clone()
    for T, bg, margin, loss in ((1.0, 1.5, 0.0, "l2"), (3.0, 1.0, 0.5, "l2"), (0.5, 2.0, 0.0, "smooth_l1"),
                                (1.0, 1.5, 0.1, "smooth_l1")):
        soft, regression = detector_kd_terms(s_logits, t_logits, s_deltas, t_deltas, labels, targets, T, bg,
                                             margin, loss, target)
        ref_soft, ref_regression = reference_terms(s_logits.double(), t_logits.double(), s_deltas.double(),
                                                   t_deltas.double(), labels, targets.double(), T, bg, margin, loss,
                                                   target)
        assert float(soft) == pytest.approx(ref_soft, rel=1e-4, abs=1e-5)
        assert float(regression) == pytest.approx(ref_regression, rel=1e-4, abs=1e-6)
        if seed == 5 and target == "ground_truth":  # a tie counts only with a margin: then every fg RoI's error does
            assert float(regression) > 0 if margin > 0 else float(regression) == 0.0
        if seed == 5 and target == "teacher":  # the teacher's own deltas: nothing to imitate
            assert float(regression) == 0.0


def test_imitation_pulls_the_student_towards_the_teacher_not_the_targets():
    """``regression_target: teacher``: with the teacher's deltas on one side of the student's and the ground truth
    on the other, a gradient step moves each foreground RoI's deltas towards the teacher's and away from the ground
    truth (a term on the targets, bounded or not, would do neither); background RoIs get no gradient."""
    labels = torch.tensor([0, 1, 2])
    s = torch.randn(3, 12, requires_grad=True)
    t = s.detach() + 1.0
    targets = torch.stack([s.detach()[r, 4 * c:4 * c + 4] for r, c in enumerate(labels.tolist())]) - 1.0
    _, regression = detector_kd_terms(torch.zeros(3, 3), torch.zeros(3, 3), s, t, labels, targets,
                                      regression_target="teacher")
    regression.backward()
    moved = s.detach() - 0.1 * s.grad
    for r, c in ((1, 1), (2, 2)):
        cols = slice(4 * c, 4 * c + 4)
        assert (moved[r, cols] - t[r, cols]).norm() < (s.detach()[r, cols] - t[r, cols]).norm()
        assert (moved[r, cols] - targets[r]).norm() > (s.detach()[r, cols] - targets[r]).norm()
    assert s.grad[0].abs().sum() == 0


def test_soft_term_gradient_flows_to_the_student_only():
    s = torch.randn(5, 3, requires_grad=True)
    t = torch.randn(5, 3, requires_grad=True)
    d = torch.randn(5, 12, requires_grad=True)
    soft, regression = detector_kd_terms(s, t, d, torch.zeros(5, 12), torch.tensor([0, 1, 2, 1, 0]),
                                         torch.ones(5, 4))
    (soft + regression).backward()
    assert s.grad.abs().sum() > 0 and d.grad.abs().sum() > 0 and t.grad is None


def _setup(student, teacher, batch, task, **params):
    term = ddkit.build("losses", {"name": "detector_kd", **params})
    term.setup(SetupContext(task, student, teacher, batch, torch.device("cpu"), 10))
    return term


def test_an_identical_teacher_gives_zero_and_close_restores_the_student():
    """Every term of Chen et al. is 0; what is left is the (1 - mu) share of the hard losses the term takes out. The
    mimic is off here: its adapter starts random, so an identical teacher does not zero it."""
    task, student, _, batch = toy_detection()
    teacher = copy.deepcopy(student).eval()
    sampler = student.rpn.fg_bg_sampler
    term = _setup(student, teacher, batch, task, mimic_weight=0.0)
    student.train()
    out = task.training_forward(student, batch)
    ctx = LossContext(task, student, teacher, batch, out, 0, 10)
    value = term.compute(ctx)
    for key in ("soft", "regression", "rpn_soft", "rpn_regression"):
        assert abs(float(ctx.logs[f"detector_kd/{key}"])) < 1e-5, key
    hard = out.losses["loss_classifier"] + out.losses["loss_objectness"]
    assert float(value.detach()) == pytest.approx(-(1 - term.mu) * float(hard.detach()), abs=1e-5)
    term.close()
    assert "select_training_samples" not in student.roi_heads.__dict__ and not student.roi_heads.box_predictor._forward_hooks
    assert "compute_loss" not in student.rpn.__dict__ and student.rpn.fg_bg_sampler is sampler
    assert not teacher.backbone._forward_hooks


@pytest.mark.parametrize("mimic_weight", [0.0, None])  # None: the default, the mimic at 0.5
def test_trains_a_student_with_the_detector_losses(tmp_path, mimic_weight):
    task = ddkit.build("tasks", "detection")
    ds = ddkit.build("datasets", {"name": "synthetic_shapes", "num_images": 6, "image_size": 64})
    torch.manual_seed(0)
    teacher = task.build_model({**CFG, "min_size": 96, "max_size": 96}, ds.info)  # another input size: RoIs scaled
    student = task.build_model(CFG, ds.info)
    before = copy.deepcopy(student.state_dict())
    res = train_model(task, student, ds, {"iterations": 3, "batch_size": 2, "log_every": 1}, tmp_path,
                      teacher=teacher, losses=[{"name": "hard_label"}, {"name": "detector_kd", "rpn": False,
                                               **({} if mimic_weight is None else {"mimic_weight": mimic_weight})}],
                      progress=False)
    logs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"losses"' in line]
    assert res["finished"] and len(logs) == 3
    for r in logs:
        assert {"detector_kd", "detector_kd/soft", "detector_kd/regression"} <= set(r["losses"])
        assert all(math.isfinite(v) for v in r["losses"].values()) and r["losses"]["detector_kd/soft"] > 0
        assert ("detector_kd/mimic" in r["losses"]) == (mimic_weight != 0.0)
    assert any(not torch.equal(v, student.state_dict()[k].cpu()) for k, v in before.items())
    assert "select_training_samples" not in student.roi_heads.__dict__  # the trainer closed the term


def test_refuses_one_stage_detectors_and_other_categories():
    task, student, teacher, batch = toy_detection()
    ds = ddkit.build("datasets", {"name": "synthetic_shapes", "num_images": 2, "image_size": 64})
    retina = task.build_model({"name": "retinanet", "backbone": "tiny", "min_size": 64, "max_size": 64}, ds.info)
    with pytest.raises(ConfigError, match="two-stage detectors .*the student"):
        _setup(retina, teacher, batch, task)
    other = ddkit.build("datasets", {"name": "synthetic_shapes", "num_images": 2, "image_size": 64, "num_classes": 2})
    n = len(ds.info.categories)  # classes as the user counts them, without Faster R-CNN's background slot
    with pytest.raises(ConfigError, match=f"predicts {n} classes and the teacher 2; they must share the dataset's "):
        _setup(student, task.build_model(CFG, other.info), batch, task)
    teacher.roi_heads.box_roi_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], 5, 2)
    with pytest.raises(ConfigError, match=r"the student pools \(7, 7\) and the teacher \(5, 5\).*mimic_weight: 0"):
        _setup(student, teacher, batch, task)
    _setup(student, teacher, batch, task, mimic_weight=0.0).close()  # without the mimic the pooling may differ


def test_the_detector_kd_recipe_runs_end_to_end(tmp_path):
    """configs/synthetic_det_kd.yaml at tiny settings: every variant trains (four on the transfer set) and the AP
    gains are reported."""
    from ddkit.config import load_config
    from ddkit.engine.run import run_recipe

    cfg = load_config(Path(__file__).parents[1] / "configs" / "synthetic_det_kd.yaml",
                      [f"run.out_dir={tmp_path}", "run.device=cpu", "data.dataset.num_images=20",
                       "teacher.train.iterations=2", "teacher.train.batch_size=2", "student.train.iterations=2",
                       "student.train.batch_size=2"])
    summary = run_recipe(cfg, progress=False)
    rows = {r["stage"]: r for r in summary["rows"]}
    variants = ("kd_detector_kd", "kd_detector_kd_soft", "kd_detector_kd_hint", "kd_teacher_boxes")
    assert set(rows) == {"teacher", "kd_alone", *variants}
    assert summary["kd_ap_gain"] == {s: round(rows[s]["AP"] - rows["kd_alone"]["AP"], 2) for s in variants}
    logs = {v: (tmp_path / v / "metrics.jsonl").read_text() for v in variants}
    assert '"detector_kd/mimic"' in logs["kd_detector_kd"]  # the default
    assert '"detector_kd/soft"' in logs["kd_detector_kd_soft"]
    assert '"detector_kd/mimic"' not in logs["kd_detector_kd_soft"]
    assert '"detector_kd/mimic"' in logs["kd_detector_kd_hint"] and '"hint"' in logs["kd_detector_kd_hint"]


def reference_rpn_terms(s_obj, t_obj, s_deltas, t_deltas, labels, targets, T, bg, margin, loss, target):
    """The RPN's terms by hand: the two-class (background, object) distribution of each anchor."""
    soft = 0.0
    for a, b in zip(s_obj.tolist(), t_obj.tolist()):
        ps1, pt1 = 1 / (1 + math.exp(-a / T)), 1 / (1 + math.exp(-b / T))
        soft += bg * (1 - pt1) * (math.log(1 - pt1) - math.log(1 - ps1)) + pt1 * (math.log(pt1) - math.log(ps1))
    soft = soft / len(s_obj) * T * T
    regression = 0.0
    for r in range(len(labels)):
        if int(labels[r]) == 1:
            regression += reference_regression(s_deltas[r], t_deltas[r], targets[r], margin, loss, target)
    return soft, regression / len(labels)


@pytest.mark.parametrize("target", ["ground_truth", "teacher"])
@pytest.mark.parametrize("seed", range(5))
def test_rpn_terms_match_a_slow_reference(seed, target):
    g = torch.Generator().manual_seed(seed)
    a = [1, 9, 64, 20, 33][seed]
    s_obj, t_obj = torch.randn(a, generator=g) * 3, torch.randn(a, generator=g) * 3
    s_deltas, t_deltas, targets = (torch.randn(a, 4, generator=g) for _ in range(3))
    labels = torch.randint(0, 2, (a,), generator=g).float() if seed != 3 else torch.zeros(a)  # 3: no object
    if seed == 4:
        t_deltas = s_deltas.clone()
    for T, bg, margin, loss in ((1.0, 1.5, 0.0, "l2"), (2.0, 1.0, 0.3, "smooth_l1")):
        soft, regression = rpn_kd_terms(s_obj, t_obj, s_deltas, t_deltas, labels, targets, T, bg, margin, loss,
                                        target)
        ref_soft, ref_regression = reference_rpn_terms(s_obj.double(), t_obj.double(), s_deltas.double(),
                                                       t_deltas.double(), labels, targets.double(), T, bg, margin,
                                                       loss, target)
        assert float(soft) == pytest.approx(ref_soft, rel=1e-4, abs=1e-6)
        assert float(regression) == pytest.approx(ref_regression, rel=1e-4, abs=1e-6)


def test_the_rpn_terms_refuse_anchors_that_do_not_coincide():
    task = ddkit.build("tasks", "detection")
    ds = ddkit.build("datasets", {"name": "synthetic_shapes", "num_images": 4, "image_size": 64})
    teacher = task.build_model({**CFG, "min_size": 96, "max_size": 96}, ds.info).eval()
    student = task.build_model(CFG, ds.info)
    batch = task.collate([(*ds[i][:1], {**ds[i][1], "_index": i}) for i in range(2)])
    term = _setup(student, teacher, batch, task)
    student.train()
    out = task.training_forward(student, batch)
    with pytest.raises(ConfigError, match="rpn: false"):
        term.compute(LossContext(task, student, teacher, batch, out, 0, 10))
    term.close()


def test_mu_blends_hard_and_soft_classification_as_the_paper():
    """With mu = 1 the term is the bounded regression alone; each (1 - mu) moves that share of the hard losses to
    the soft ones: value(mu) = bounded part + (1 - mu) * (soft - hard) over the RoI head and the RPN."""
    task, student, teacher, batch = toy_detection()
    values, logs = {}, {}
    for mu in (1.0, 0.5, 0.0):
        term = ddkit.build("losses", {"name": "detector_kd", "mu": mu, "regression_weight": 0.5, "mimic_weight": 0})
        term.setup(SetupContext(task, student, teacher, batch, torch.device("cpu"), 10))
        student.train()
        torch.manual_seed(1)  # the same anchor and RoI samples each time
        out = task.training_forward(student, batch)
        ctx = LossContext(task, student, teacher, batch, out, 0, 10)
        values[mu] = float(term.compute(ctx).detach())
        logs[mu] = {k: float(v) for k, v in ctx.logs.items()}
        term.close()
        hard = float((out.losses["loss_classifier"] + out.losses["loss_objectness"]).detach())
    soft = logs[0.0]["detector_kd/soft"] + logs[0.0]["detector_kd/rpn_soft"]
    bounded = 0.5 * (logs[1.0]["detector_kd/regression"] + logs[1.0]["detector_kd/rpn_regression"])
    assert values[1.0] == pytest.approx(bounded, abs=1e-5)
    for mu in (0.5, 0.0):
        assert values[mu] == pytest.approx(bounded + (1 - mu) * (soft - hard), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_roi_mimic_matches_a_slow_reference(seed):
    g = torch.Generator().manual_seed(seed)
    r, c, h, w = (int(v) for v in torch.randint(1, 6, (4,), generator=g))
    s = torch.randn(r, c, h, w, generator=g, requires_grad=True)
    t = torch.randn(r, c, h, w, generator=g, requires_grad=True)
    expected = sum(float(((s[i] - t[i]) ** 2).sum().detach()) / (c * h * w) for i in range(r)) / r
    value = roi_mimic(s, t)
    assert float(value.detach()) == pytest.approx(expected, rel=1e-5)
    value.backward()
    assert s.grad.abs().sum() > 0 and t.grad is None
    assert float(roi_mimic(s[:0], t[:0]).detach()) == 0.0


def _mimic_models(teacher_size: int | None = None):
    """The detection task, a tiny student, a ResNet-18 teacher (at another input size if given) and a batch of 2."""
    task = ddkit.build("tasks", "detection")
    ds = ddkit.build("datasets", {"name": "synthetic_shapes", "num_images": 2, "image_size": 64})
    torch.manual_seed(0)
    student = task.build_model(CFG, ds.info)
    sizes = {"min_size": teacher_size, "max_size": teacher_size} if teacher_size else {}
    teacher = task.build_model({**CFG, "backbone": "resnet18", **sizes}, ds.info).eval()
    batch = task.collate([(*ds[i][:1], {**ds[i][1], "_index": i}) for i in range(2)])
    return task, student, teacher, batch


def test_the_mimic_term_imitates_the_teachers_features_on_the_students_rois():
    """A 64-channel student, a 256-channel teacher at another input size: the term's mimic is the adapted student
    features against the teacher's pooled on the student's sampled RoIs (scaled), computed here by hand, and it
    adds mimic_weight times that; the adapter and the student get gradients, the teacher none."""
    task, student, teacher, batch = _mimic_models(teacher_size=96)
    term = ddkit.build("losses", {"name": "detector_kd", "mimic_weight": 2.0, "rpn": False})  # other anchors
    adapter = term.setup(SetupContext(task, student, teacher, batch, torch.device("cpu"), 10))
    assert isinstance(adapter, torch.nn.Conv2d) and (adapter.in_channels, adapter.out_channels) == (64, 256)
    seen = {}
    hook = student.roi_heads.box_roi_pool.register_forward_hook(
        lambda m, args, out: seen.update(proposals=args[1], sizes=args[2], pooled=out))
    student.train()
    out = task.training_forward(student, batch)
    hook.remove()
    ctx = LossContext(task, student, teacher, batch, out, 0, 10)
    value = term.compute(ctx)
    with torch.no_grad():
        t_images, _ = teacher.transform(list(batch["images"]))
        feats = teacher.backbone(t_images.tensors)
        scaled = [p * p.new_tensor([tw / sw, th / sh, tw / sw, th / sh])
                  for p, (sh, sw), (th, tw) in zip(seen["proposals"], seen["sizes"], t_images.image_sizes)]
        t_pooled = teacher.roi_heads.box_roi_pool(feats, scaled, t_images.image_sizes)
        s_pooled = adapter(seen["pooled"])
    assert len(t_pooled) == sum(len(p) for p in seen["proposals"]) > 0
    expected = float(((s_pooled - t_pooled) ** 2).mean())
    assert float(ctx.logs["detector_kd/mimic"]) == pytest.approx(expected, rel=1e-4)
    keep, logs = 1 - term.mu, {k: float(v) for k, v in ctx.logs.items()}
    hard = float(out.losses["loss_classifier"].detach())
    assert float(value.detach()) == pytest.approx(keep * (logs["detector_kd/soft"] - hard) + 2.0 * expected,
                                                  rel=1e-4)
    value.backward()
    assert adapter.weight.grad.abs().sum() > 0
    assert seen["pooled"].requires_grad  # the student's features are imitated, not a detached copy
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.backbone.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    term.close()
    assert not student.roi_heads.box_roi_pool._forward_hooks and term.adapter is None


def test_mimic_until_stops_the_mimic_after_its_fraction_of_the_iterations():
    """mimic_until 0.5 of 10 iterations: the mimic is in the term at iteration 4 and out of it (the term exactly
    the soft part, the adapter without gradient) from iteration 5."""
    task, student, teacher, batch = _mimic_models()
    term = ddkit.build("losses", {"name": "detector_kd", "mimic_weight": 2.0, "mimic_until": 0.5, "rpn": False})
    adapter = term.setup(SetupContext(task, student, teacher, batch, torch.device("cpu"), 10))
    student.train()
    for it in (4, 5):
        out = task.training_forward(student, batch)
        ctx = LossContext(task, student, teacher, batch, out, it, 10)
        value = term.compute(ctx)
        hard = float(out.losses["loss_classifier"].detach())
        soft_part = (1 - term.mu) * (float(ctx.logs["detector_kd/soft"]) - hard)
        adapter.zero_grad(set_to_none=True)
        value.backward()
        if it == 4:
            assert float(ctx.logs["detector_kd/mimic"]) > 0 and adapter.weight.grad.abs().sum() > 0
            mimic = float(ctx.logs["detector_kd/mimic"])
            assert float(value.detach()) == pytest.approx(soft_part + 2.0 * mimic, rel=1e-4)
        else:
            assert "detector_kd/mimic" not in ctx.logs and adapter.weight.grad is None
            assert float(value.detach()) == pytest.approx(soft_part, rel=1e-5)
    term.close()
    with pytest.raises(ConfigError, match="mimic_until must be in"):
        ddkit.build("losses", {"name": "detector_kd", "mimic_weight": 1.0, "mimic_until": 0.0})


def test_distils_a_keypoint_rcnn_student_at_the_defaults(tmp_path):
    """Keypoint R-CNN is a two-stage detector too: its box head and RPN distil, the mimic on by default."""
    task = ddkit.build("tasks", "keypoints")
    ds = ddkit.build("datasets", {"name": "synthetic_figures", "num_images": 4, "image_size": 64, "min_height": 20,
                                  "max_height": 40})
    torch.manual_seed(0)
    model = {"name": "keypointrcnn", "backbone": "tiny", "min_size": 64, "max_size": 64, "keypoint_head": [8]}
    teacher = task.build_model({**model, "backbone": "resnet18"}, ds.info)
    student = task.build_model(model, ds.info)
    before = copy.deepcopy(student.state_dict())
    res = train_model(task, student, ds, {"iterations": 2, "batch_size": 2, "log_every": 1}, tmp_path,
                      teacher=teacher, losses=[{"name": "hard_label"}, {"name": "detector_kd"}], progress=False)
    logs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"losses"' in line]
    assert res["finished"] and len(logs) == 2
    for r in logs:
        assert {"detector_kd/soft", "detector_kd/rpn_soft", "detector_kd/mimic"} <= set(r["losses"])
        assert all(math.isfinite(v) for v in r["losses"].values())
    assert any(not torch.equal(v, student.state_dict()[k].cpu()) for k, v in before.items())
