"""Loss terms against hand computations, their contract, and KD/hint training end to end (tiny, CPU)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import ddkit
from ddkit.engine.data import split_dataset
from ddkit.engine.train import train_model
from ddkit.errors import ConfigError
from ddkit.testing import build_examples, registered
from ddkit.testing.losses import TINY_FASTERRCNN, check_loss_term


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)


def _softmax(row, t):
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def test_soft_target_matches_hand_computation():
    s = [[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]]
    t = [[3.0, 2.0, 1.0], [1.0, 0.0, 0.0]]
    T = 2.0
    expected = 0.0
    for srow, trow in zip(s, t):
        ps, pt = _softmax(srow, T), _softmax(trow, T)
        expected += sum(q * (math.log(q) - math.log(p)) for p, q in zip(ps, pt))
    expected = expected / len(s) * T * T
    term = ddkit.build("losses", {"name": "soft_target", "temperature": T})
    got = term(torch.tensor(s), torch.tensor(t))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_soft_target_gradient_is_T_times_probability_difference():
    """d/ds [T^2 KL] = T * (softmax(s/T) - softmax(t/T)) / B: the gradient scale does not shrink with T."""
    torch.manual_seed(0)
    s = torch.randn(4, 5, requires_grad=True)
    t = torch.randn(4, 5)
    T = 8.0
    ddkit.build("losses", {"name": "soft_target", "temperature": T})(s, t).backward()
    expected = T * (torch.softmax(s.detach() / T, -1) - torch.softmax(t / T, -1)) / 4
    torch.testing.assert_close(s.grad, expected, rtol=1e-5, atol=1e-7)


def test_soft_target_is_zero_for_identical_logits_and_rejects_bad_temperature():
    term = ddkit.build("losses", {"name": "soft_target"})
    x = torch.randn(3, 4)
    assert term(x, x).abs().item() < 1e-6
    with pytest.raises(ConfigError, match="temperature"):
        ddkit.build("losses", {"name": "soft_target", "temperature": 0})


def test_hard_label_sums_the_task_losses():
    term = ddkit.build("losses", {"name": "hard_label", "weight": 0.5})
    assert term.weight == 0.5
    assert term({"a": torch.tensor(1.5), "b": torch.tensor(0.25)}).item() == pytest.approx(1.75)


@pytest.mark.parametrize("distance", ["l2", "l1"])
def test_hint_with_a_known_1x1_adapter(distance):
    hint = ddkit.build("losses", {"name": "hint", "teacher_layer": "t", "student_layer": "s", "distance": distance})
    s = torch.arange(2 * 2 * 2 * 2, dtype=torch.float32).view(2, 2, 2, 2) / 10
    t = torch.ones(2, 3, 2, 2)
    hint.adapter = hint.make_adapter(s.shape, t.shape)
    assert isinstance(hint.adapter, nn.Conv2d) and hint.adapter.kernel_size == (1, 1)
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, -1.0]])
    b = torch.tensor([0.0, 0.5, -0.5])
    with torch.no_grad():
        hint.adapter.weight.copy_(w.view(3, 2, 1, 1))
        hint.adapter.bias.copy_(b)
    total, n = 0.0, 0
    for bi in range(2):
        for y in range(2):
            for x in range(2):
                v = [s[bi, 0, y, x].item(), s[bi, 1, y, x].item()]
                for c in range(3):
                    a = w[c, 0].item() * v[0] + w[c, 1].item() * v[1] + b[c].item()
                    diff = a - 1.0
                    total += diff * diff if distance == "l2" else abs(diff)
                    n += 1
    assert hint(s, t).item() == pytest.approx(total / n, rel=1e-5)


@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (7, 5), (2, 9, 4)])
def test_pearson_hint_is_one_minus_the_per_channel_correlation(shape):
    """PKD's distance against numpy's corrcoef on each channel: ``(n - 1) / n * mean_c (1 - r_c)`` for n values per
    channel (unbiased standardisation), whatever the teacher's scale and offset."""
    hint = ddkit.build("losses", {"name": "hint", "teacher_layer": "t", "student_layer": "s", "distance": "pearson"})
    g = torch.Generator().manual_seed(len(shape))
    s = torch.randn(shape, generator=g, dtype=torch.float64)
    t = 0.6 * s + torch.randn(shape, generator=g, dtype=torch.float64)
    channel_dim = 2 if len(shape) == 3 else 1
    per_channel = [(s.select(channel_dim, c).flatten().numpy(), t.select(channel_dim, c).flatten().numpy())
                   for c in range(shape[channel_dim])]
    n = per_channel[0][0].size
    expected = (n - 1) / n * np.mean([1 - np.corrcoef(a, b)[0, 1] for a, b in per_channel])
    assert hint(s, t).item() == pytest.approx(expected, rel=1e-5)
    assert hint(s, 5 * t + 3).item() == pytest.approx(expected, rel=1e-5)
    assert hint(t, t).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_channel_kl_hint_matches_a_per_channel_reference(temperature):
    """CWD (Shu et al. 2021) against a loop over (image, channel): softmax over the positions at T, T^2 * KL(teacher
    || student) summed over positions, averaged over channels; indifferent to a per-channel offset (a softmax is);
    0 for identical maps."""
    hint = ddkit.build("losses", {"name": "hint", "teacher_layer": "t", "student_layer": "s",
                                  "distance": "channel_kl", "temperature": temperature})
    g = torch.Generator().manual_seed(int(temperature))
    s = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    t = 2 * s + torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    total = 0.0
    for b in range(2):
        for c in range(3):
            p = np.exp(t[b, c].flatten().numpy() / temperature)
            q = np.exp(s[b, c].flatten().numpy() / temperature)
            p, q = p / p.sum(), q / q.sum()
            total += float((p * np.log(p / q)).sum())
    expected = temperature ** 2 * total / 6
    assert hint(s, t).item() == pytest.approx(expected, rel=1e-6)
    assert hint(s, t + torch.randn(1, 3, 1, 1, generator=g, dtype=torch.float64)).item() == pytest.approx(expected,
                                                                                                        rel=1e-6)
    assert hint(t, t).item() == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ConfigError, match="channel_kl"):
        hint(torch.randn(4, 8), torch.randn(4, 8))
    with pytest.raises(ConfigError, match="imitate"):
        ddkit.build("losses", {"name": "hint", "teacher_layer": "t", "student_layer": "s",
                               "distance": "channel_kl", "imitate": "objects"})


@pytest.mark.parametrize("channels", [(3, 3), (2, 5)])
def test_attention_hint_matches_a_per_image_reference(channels):
    """AT (Zagoruyko and Komodakis 2017) against a loop over images: the channel mean of the squared activations,
    divided by its L2 norm, squared differences summed over positions, averaged over images; the channel counts may
    differ, the teacher's scale does not matter, and 0 when the teacher's map is the student's with channels
    repeated."""
    hint = ddkit.build("losses", {"name": "hint", "teacher_layer": "t", "student_layer": "s", "distance": "attention"})
    g = torch.Generator().manual_seed(sum(channels))
    s = torch.randn(2, channels[0], 4, 5, generator=g, dtype=torch.float64)
    t = torch.randn(2, channels[1], 4, 5, generator=g, dtype=torch.float64) + 0.5 * s.mean(1, keepdim=True)
    total = 0.0
    for b in range(2):
        a_s = (s[b].numpy() ** 2).mean(0).flatten()
        a_t = (t[b].numpy() ** 2).mean(0).flatten()
        total += float(((a_s / np.linalg.norm(a_s) - a_t / np.linalg.norm(a_t)) ** 2).sum())
    assert hint(s, t).item() == pytest.approx(total / 2, rel=1e-6)
    assert hint(s, 3 * t).item() == pytest.approx(total / 2, rel=1e-6)
    assert hint(s, torch.cat([s, s], 1)).item() == pytest.approx(0.0, abs=1e-9)
    s.requires_grad_(True)
    t.requires_grad_(True)
    hint(s, t).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None  # the student learns, the teacher is a fixed target
    with pytest.raises(ConfigError, match="attention"):
        hint(torch.randn(4, 8), torch.randn(4, 8))
    with pytest.raises(ConfigError, match="imitate"):
        ddkit.build("losses", {"name": "hint", "teacher_layer": "t", "student_layer": "s",
                               "distance": "attention", "imitate": "objects"})


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (6, 3), (2, 5, 3)])
def test_an_mlp_adapter_matches_a_cell_by_cell_reference(shape):
    """``adapter: mlp``: linear -> ReLU -> linear on each cell's (or token's) channels, then the L2 hint."""
    hint = ddkit.build("losses", {"name": "hint", "teacher_layer": "t", "student_layer": "s", "adapter": "mlp"})
    g = torch.Generator().manual_seed(len(shape))
    teacher_shape = (*shape[:-1], 4) if len(shape) == 3 else (shape[0], 4, *shape[2:])
    s, t = torch.randn(shape, generator=g), torch.randn(teacher_shape, generator=g)
    hint.adapter = hint.make_adapter(s.shape, t.shape, "mlp")
    w1, b1, w2, b2 = (torch.randn(4, 3, generator=g), torch.randn(4, generator=g), torch.randn(4, 4, generator=g),
                      torch.randn(4, generator=g))
    with torch.no_grad():
        first, last = hint.adapter[0], hint.adapter[2]
        first.weight.copy_(w1.view_as(first.weight)), first.bias.copy_(b1)
        last.weight.copy_(w2.view_as(last.weight)), last.bias.copy_(b2)
    channels_last_s = s.movedim(1, -1) if len(shape) != 3 else s
    channels_last_t = t.movedim(1, -1) if len(shape) != 3 else t
    total, cells = 0.0, 0
    for v, target in zip(channels_last_s.reshape(-1, 3).tolist(), channels_last_t.reshape(-1, 4).tolist()):
        hidden = [max(0.0, sum(w1[j, i].item() * v[i] for i in range(3)) + b1[j].item()) for j in range(4)]
        out = [sum(w2[k, j].item() * hidden[j] for j in range(4)) + b2[k].item() for k in range(4)]
        total += sum((o - u) ** 2 for o, u in zip(out, target))
        cells += 4
    assert hint(s, t).item() == pytest.approx(total / cells, rel=1e-5)
    with pytest.raises(ValueError, match="needs no adapter"):
        ddkit.build("losses", {"name": "hint", "teacher_layer": "t", "student_layer": "s", "distance": "attention",
                               "adapter": "mlp"})


def test_hint_adapters_for_vectors_tokens_and_resized_maps():
    assert isinstance(ddkit.build("losses", {"name": "hint", "teacher_layer": "a", "student_layer": "b"})
                      .make_adapter(torch.Size([4, 8]), torch.Size([4, 12])), nn.Linear)
    hint = ddkit.build("losses", {"name": "hint", "teacher_layer": "a", "student_layer": "b"})
    tok = hint.make_adapter(torch.Size([2, 5, 8]), torch.Size([2, 5, 6]))
    assert isinstance(tok, nn.Linear) and tok.in_features == 8 and tok.out_features == 6
    hint.adapter = hint.make_adapter(torch.Size([1, 4, 8, 8]), torch.Size([1, 6, 4, 4]))
    assert hint(torch.randn(1, 4, 8, 8), torch.randn(1, 6, 4, 4)).ndim == 0  # resized to the teacher's 4x4
    with pytest.raises(ConfigError, match="ranks"):
        hint.make_adapter(torch.Size([1, 4, 8, 8]), torch.Size([1, 6]))


def test_the_hint_trains_the_adapter_the_recipe_names():
    from ddkit.testing.losses import toy_classification
    from ddkit.engine.losses import SetupContext

    task, student, teacher, batch = toy_classification()
    for kind, expected in (("linear", nn.Linear), ("mlp", nn.Sequential)):
        hint = ddkit.build("losses", {"name": "hint", "teacher_layer": "1", "student_layer": "1", "adapter": kind})
        adapter = hint.setup(SetupContext(task, student, teacher, batch, torch.device("cpu"), 10))
        assert isinstance(adapter, expected) and adapter is hint.adapter
        hint.close()


def test_hint_names_a_missing_module():
    from ddkit.testing.losses import toy_classification
    from ddkit.engine.losses import SetupContext

    task, student, teacher, batch = toy_classification()
    hint = ddkit.build("losses", {"name": "hint", "teacher_layer": "1", "student_layer": "9"})
    with pytest.raises(ConfigError, match="student has no module '9'"):
        hint.setup(SetupContext(task, student, teacher, batch, torch.device("cpu"), 10))


@pytest.mark.parametrize("entry", registered("losses"), ids=lambda e: e.spec.name)
def test_every_registered_loss_meets_the_trainer_contract(entry):
    for term in build_examples(entry):
        check_loss_term(term)


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def digits():
    ds = ddkit.build("datasets", {"name": "digits"})
    return split_dataset(ds, labeled=0.5, unlabeled=0.3, test=0.2, seed=0)


@pytest.fixture(scope="module")
def digits_teacher(digits, tmp_path_factory):
    task = ddkit.build("tasks", "classification")
    torch.manual_seed(0)
    teacher = task.build_model({"name": "mlp", "hidden": [128], "dropout": 0.2}, digits.info)
    run = tmp_path_factory.mktemp("teacher")
    res = train_model(task, teacher, digits.labeled, {"iterations": 200, "batch_size": 32, "lr": 0.1,
                                                      "log_every": 0}, run, eval_set=digits.test, progress=False)
    assert res["metrics"]["accuracy"] > 0.9
    return run


def test_kd_with_default_settings_trains_stably(digits, digits_teacher, tmp_path):
    """Default train block (SGD lr 0.01) and default soft_target (T=4) plus hard labels, on labeled + unlabeled
    images: the loss must fall and the student must learn (a diverging setting ends near 10 %)."""
    task = ddkit.build("tasks", "classification")
    torch.manual_seed(1)
    student = task.build_model({"name": "mlp", "hidden": [32]}, digits.info)
    res = train_model(task, student, [digits.labeled, digits.unlabeled.ground_truth],
                      {"iterations": 300, "batch_size": 32, "log_every": 50}, tmp_path, teacher=digits_teacher,
                      losses=[{"name": "hard_label"}, {"name": "soft_target"}], eval_set=digits.test, progress=False)
    logs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_logs = [r for r in logs if "losses" in r]
    assert set(train_logs[0]["losses"]) == {"hard_label", "soft_target"}
    assert train_logs[-1]["loss"] < 0.5 * train_logs[0]["loss"]
    assert all(math.isfinite(r["loss"]) for r in train_logs)
    assert res["metrics"]["accuracy"] > 0.85


def test_teacher_cache_gives_the_same_training_and_is_keyed_by_the_teacher(digits, digits_teacher, tmp_path):
    task = ddkit.build("tasks", "classification")
    cfg = {"iterations": 40, "batch_size": 16, "lr": 0.05, "log_every": 10}
    losses = [{"name": "soft_target", "temperature": 4}]
    results = []
    for cache in (False, True):
        torch.manual_seed(1)
        student = task.build_model({"name": "mlp", "hidden": [16]}, digits.info)
        # on the CPU: under CUDA autocast the live teacher runs in float16, the cache pass in float32
        train_model(task, student, digits.labeled, {**cfg, "teacher_cache": cache}, tmp_path / str(cache),
                    teacher=digits_teacher, losses=losses, progress=False, device="cpu")
        results.append(student.state_dict())
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-4, atol=1e-5)
    files = list((tmp_path / "True" / "teacher_cache").glob("teacher_logits-*.pt"))
    assert len(files) == 1
    from ddkit.io import file_sha256
    from ddkit.engine.checkpoint import resolve_checkpoint

    assert file_sha256(resolve_checkpoint(digits_teacher))[:16] in files[0].name
    with pytest.raises(ConfigError, match="only valid without random augmentation"):
        train_model(task, task.build_model({"name": "mlp", "hidden": [16]}, digits.info), digits.labeled,
                    {**cfg, "teacher_cache": True, "hflip": 0.5}, tmp_path / "aug", teacher=digits_teacher,
                    losses=losses, progress=False)


def test_teacher_cache_is_recomputed_when_the_teacher_changes(digits, tmp_path):
    from ddkit.engine.train import TeacherCache, _Indexed

    task = ddkit.build("tasks", "classification")
    teacher = task.build_model({"name": "mlp", "hidden": [8]}, digits.info)
    data = _Indexed(digits.test)
    a = TeacherCache.build(task, teacher, data, "a" * 64, tmp_path, 64, torch.device("cpu"), False)
    with torch.no_grad():
        teacher[-1].bias.add_(1.0)
    b = TeacherCache.build(task, teacher, data, "b" * 64, tmp_path, 64, torch.device("cpu"), False)
    again = TeacherCache.build(task, teacher, data, "a" * 64, tmp_path, 64, torch.device("cpu"), False)
    assert len(list(tmp_path.glob("teacher_logits-*.pt"))) == 2
    torch.testing.assert_close(b.logits, a.logits + 1.0)
    torch.testing.assert_close(again.logits, a.logits)  # served from the file keyed by sha "a"


def test_fitnets_two_stage_hint_schedule(digits, digits_teacher, tmp_path):
    """stage_fraction 0.5: the first half trains only the hint (and its adapter), the second only the others."""
    task = ddkit.build("tasks", "classification")
    torch.manual_seed(0)
    student = task.build_model({"name": "mlp", "hidden": [16]}, digits.info)
    losses = [{"name": "hard_label"},
              {"name": "hint", "teacher_layer": "1", "student_layer": "1", "stage_fraction": 0.5},
              {"name": "soft_target", "temperature": 4}]
    res = train_model(task, student, digits.labeled, {"iterations": 80, "batch_size": 16, "lr": 0.05,
                                                      "log_every": 20}, tmp_path, teacher=digits_teacher,
                      losses=losses, eval_set=digits.test, progress=False)
    logs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"losses"' in line]
    assert [set(r["losses"]) for r in logs] == [{"hint"}, {"hint"}, {"hard_label", "soft_target"},
                                                {"hard_label", "soft_target"}]
    assert logs[1]["losses"]["hint"] < logs[0]["losses"]["hint"]
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    adapter = ckpt["losses"][1]
    assert adapter["weight"].shape == (128, 16)  # Linear(student 16 -> teacher 128)
    assert res["metrics"]["accuracy"] > 0.5


def test_kd_terms_without_a_teacher_are_refused(digits, tmp_path):
    task = ddkit.build("tasks", "classification")
    model = task.build_model({"name": "mlp", "hidden": [8]}, digits.info)
    with pytest.raises(ConfigError, match="need a teacher"):
        train_model(task, model, digits.labeled, {"iterations": 2}, tmp_path,
                    losses=[{"name": "soft_target"}], progress=False)


def _shapes():
    """The detection task and four generated 64 x 64 images."""
    return ddkit.build("tasks", "detection"), ddkit.build("datasets", {"name": "synthetic_shapes", "num_images": 4,
                                                                      "image_size": 64, "max_object": 30})


def test_soft_target_is_refused_for_detection(tmp_path):
    task, ds = _shapes()
    cfg = TINY_FASTERRCNN
    model, teacher = task.build_model(cfg, ds.info), task.build_model(cfg, ds.info)
    with pytest.raises(ConfigError, match="soft_target needs class logits"):
        train_model(task, model, ds, {"iterations": 1, "batch_size": 2}, tmp_path, teacher=teacher,
                    losses=[{"name": "soft_target"}], progress=False)


def test_hint_between_detector_backbones(tmp_path):
    """Chen et al. 2017 style: a hint between detector backbones (captured by hooks inside torchvision's model)."""
    task, ds = _shapes()
    cfg = TINY_FASTERRCNN
    torch.manual_seed(0)
    teacher = task.build_model({**cfg, "min_size": 96, "max_size": 96}, ds.info)  # larger maps: resized hint
    student = task.build_model(cfg, ds.info)
    res = train_model(task, student, ds, {"iterations": 3, "batch_size": 2, "log_every": 1}, tmp_path,
                      teacher=teacher, losses=[{"name": "hard_label"},
                                               {"name": "hint", "teacher_layer": "backbone.body.layer3",
                                                "student_layer": "backbone.body.layer2"}], progress=False)
    logs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"losses"' in line]
    assert all(r["losses"]["hint"] > 0 for r in logs) and res["finished"]
    adapter = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["losses"][1]
    assert adapter["weight"].shape == (64, 32, 1, 1)  # 1x1 conv: student layer2 (32 ch) -> teacher layer3 (64 ch)


def test_attention_hint_between_detector_necks_trains_without_an_adapter(tmp_path):
    """AT on every FPN level of two detectors of other input sizes: the student's maps are resized to the teacher's,
    the loss is logged, and no adapter is created (none is saved)."""
    task, ds = _shapes()
    torch.manual_seed(0)
    teacher = task.build_model({**TINY_FASTERRCNN, "min_size": 96, "max_size": 96}, ds.info)
    student = task.build_model(TINY_FASTERRCNN, ds.info)
    res = train_model(task, student, ds, {"iterations": 3, "batch_size": 2, "log_every": 1}, tmp_path,
                      teacher=teacher, progress=False,
                      losses=[{"name": "hard_label"}, {"name": "hint", "teacher_layer": "backbone",
                                                       "student_layer": "backbone", "distance": "attention"}])
    logs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"losses"' in line]
    assert all(0 < r["losses"]["hint"] <= 2 for r in logs) and res["finished"]
    assert not torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["losses"][1]
