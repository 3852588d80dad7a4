"""The trainer: train-block validation, schedule, resume (exact), checkpoints (weights only), export, the CLI
(including a killed run), KD recipe defaults."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ddkit
from ddkit.config import load_config, validate_config
from ddkit.engine.checkpoint import load_model
from ddkit.engine.data import split_dataset
from ddkit.engine.train import (TrainConfig, TrainingDiverged, lr_factor, parse_train_config, run_train,
                                total_iterations, train_model)
from ddkit.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)


@pytest.fixture(scope="module")
def digits():
    return split_dataset(ddkit.build("datasets", "digits"), labeled=0.3, unlabeled=0.5, test=0.2, seed=0)


def _records(run: Path) -> list[dict]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rec.pop("samples_per_s", None)
        rec.pop("train_time_s", None)
        out.append(rec)
    return out


def _weights(path) -> dict[str, torch.Tensor]:
    return load_model(path)[1].state_dict()


# --------------------------------------------------------------------------------------------- train block
def test_train_block_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"teacher.train: unknown key 'warmpu'\. Did you mean 'warmup'\? "
                                          r"Valid keys: .*batch_size.*weight_decay"):
        parse_train_config({"warmpu": 10}, where="teacher.train")
    with pytest.raises(ConfigError, match="'iterations' = 'many' is not of type int"):
        parse_train_config({"iterations": "many"})
    with pytest.raises(ConfigError, match="steps must be increasing fractions"):
        parse_train_config({"steps": [0.9, 0.5]})
    with pytest.raises(ConfigError, match="optimizer"):
        parse_train_config({"optimizer": "lbfgs"})
    assert parse_train_config({"lr": 1}).lr == 1.0


def test_lr_schedule_warmup_and_steps():
    cfg = TrainConfig(iterations=100, warmup=10, warmup_factor=0.1, steps=[0.5, 0.8], gamma=0.1)
    assert lr_factor(0, 100, cfg) == pytest.approx(0.1)
    assert lr_factor(5, 100, cfg) == pytest.approx(0.55)
    assert lr_factor(10, 100, cfg) == pytest.approx(1.0)
    assert lr_factor(49, 100, cfg) == pytest.approx(1.0)
    assert lr_factor(50, 100, cfg) == pytest.approx(0.1)
    assert lr_factor(80, 100, cfg) == pytest.approx(0.01)


def test_schedule_length_scales_with_data():
    assert total_iterations(TrainConfig(iterations=100), [50, 150]) == 100
    assert total_iterations(TrainConfig(iterations=100, scale_with_data=True), [50, 150]) == 400
    assert total_iterations(TrainConfig(epochs=2, batch_size=10), [50, 150]) == 40


# ---------------------------------------------------------------------------------------------------- resume
def test_stop_and_resume_equals_an_uninterrupted_run(digits, tmp_path):
    """Mixed labeled + pseudo data, dropout (RNG), KD with the teacher cache, a hint adapter, momentum SGD with
    warmup and steps: stopping at 23 of 50 iterations and resuming ends bit-identical, metrics included."""
    task = ddkit.build("tasks", "classification")
    torch.manual_seed(0)
    teacher = task.build_model({"name": "mlp", "hidden": [24]}, digits.info)
    from ddkit.engine.checkpoint import save_model

    save_model(teacher, tmp_path / "teacher.pt")
    cfg = {"iterations": 50, "batch_size": 16, "lr": 0.05, "warmup": 5, "steps": [0.6], "log_every": 7,
           "checkpoint_every": 10, "eval_every": 20, "teacher_cache": True}
    losses = [{"name": "hard_label"}, {"name": "soft_target", "temperature": 3},
              {"name": "hint", "teacher_layer": "1", "student_layer": "1", "weight": 0.1}]
    sets = [digits.labeled, digits.unlabeled.ground_truth]

    def student(seed=0):
        torch.manual_seed(seed)
        return task.build_model({"name": "mlp", "hidden": [16], "dropout": 0.3}, digits.info)

    full = train_model(task, student(), sets, cfg, tmp_path / "a", teacher=tmp_path / "teacher.pt",
                       losses=losses, eval_set=digits.test, seed=3, progress=False)
    part = train_model(task, student(), sets, {**cfg, "max_iterations": 23}, tmp_path / "b",
                       teacher=tmp_path / "teacher.pt", losses=losses, eval_set=digits.test, seed=3, progress=False)
    assert not part["finished"] and part["iterations"] == 23 and part["model_path"] is None
    rest = train_model(task, student(seed=99), sets, cfg, tmp_path / "b", teacher=tmp_path / "teacher.pt",
                       losses=losses, eval_set=digits.test, seed=3, resume=True, progress=False)
    assert rest["finished"] and full["finished"]
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _records(tmp_path / "a") == _records(tmp_path / "b")
    assert rest["metrics"] == full["metrics"]
    # without resume=True the same folder starts over
    again = train_model(task, student(), sets, {**cfg, "max_iterations": 5}, tmp_path / "b",
                        teacher=tmp_path / "teacher.pt", losses=losses, seed=3, progress=False)
    assert again["iterations"] == 5


@pytest.mark.parametrize("optimizer", [{"optimizer": "sgd", "nesterov": True}, {"optimizer": "adamw", "lr": 1e-3}])
def test_fused_step_is_the_default_and_makes_the_same_update(digits, tmp_path, optimizer):
    task = ddkit.build("tasks", "classification")
    cfg = {"iterations": 12, "batch_size": 8, "weight_decay": 0.01, "warmup": 4, **optimizer}
    trained = {}
    for fused in (True, False):
        torch.manual_seed(0)
        model = task.build_model({"name": "lenet", "channels": [4], "hidden": 8}, digits.info)
        init = {k: v.clone() for k, v in model.state_dict().items()}
        train_model(task, model, digits.labeled, {**cfg, "fused": fused}, tmp_path / str(fused), progress=False)
        ckpt = torch.load(tmp_path / str(fused) / "checkpoints" / "last.pt", weights_only=True)
        assert ckpt["optimizer"]["param_groups"][0]["fused"] is (True if fused else None)
        trained[fused] = ckpt["model"]
    assert parse_train_config({}).fused  # the default
    assert max((trained[True][k] - init[k]).abs().max() for k in init) > 1e-3  # the steps moved the weights
    for k in init:  # the same arithmetic up to float rounding, over 12 steps of momentum and weight decay
        torch.testing.assert_close(trained[True][k], trained[False][k], rtol=1e-4, atol=1e-5)


def test_fused_sgd_takes_parameters_that_join_later_and_resumes():
    """A parameter without a gradient on the first steps (a term that joins after a hint stage) gets the same
    updates as with torch's default step, also across a state-dict round trip."""
    from ddkit.engine.train import _optimizer

    torch.manual_seed(0)
    start = [torch.randn(5, 3), torch.randn(4)]
    grads = [[torch.randn(5, 3), None if step < 2 else torch.randn(4)] for step in range(5)]
    final = {}
    for fused in (True, False):
        cfg = parse_train_config({"lr": 0.1, "nesterov": True, "fused": fused})
        params = [torch.nn.Parameter(t.clone()) for t in start]
        optimizer, _ = _optimizer(cfg, params, 5)
        for step, gs in enumerate(grads):
            if step == 1:  # resume from a state without the late parameter's buffer, as saved by torch's step
                state = optimizer.state_dict()
                state["state"].pop(1, None)
                optimizer, _ = _optimizer(cfg, params, 5)
                optimizer.load_state_dict(state)
            for p, g in zip(params, gs):
                p.grad = None if g is None else g.clone()
            optimizer.step()
        final[fused] = [p.detach().clone() for p in params]
    assert not torch.equal(final[True][1], start[1])  # the late parameter moved
    for a, b in zip(final[True], final[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_checkpoint_is_weights_only_and_rebuilds_the_model(digits, tmp_path):
    task = ddkit.build("tasks", "classification")
    model = task.build_model({"name": "lenet", "channels": [4], "hidden": 8}, digits.info)
    train_model(task, model, digits.labeled, {"iterations": 3, "batch_size": 8, "optimizer": "adamw",
                                              "lr": 1e-3}, tmp_path, progress=False)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "sampler", "rng", "task", "model_cfg", "info", "iteration"} <= set(ckpt)
    assert ckpt["iteration"] == 3 and ckpt["sampler"]["step"] == 3 and ckpt["model_cfg"]["name"] == "lenet"
    task2, model2, info = load_model(tmp_path / "checkpoints" / "last.pt")
    assert task2.name == "classification" and info.extra["image_shape"] == [1, 8, 8]
    x = torch.stack([digits.test[i][0] for i in range(4)])
    model.cpu().eval()  # train_model moved it to the training device (the GPU where there is one)
    torch.testing.assert_close(model2(x), model(x))


def test_export_writes_student_only_weights(digits, tmp_path):
    from ddkit.cli import main

    task = ddkit.build("tasks", "classification")
    model = task.build_model({"name": "mlp", "hidden": [8]}, digits.info)
    teacher = task.build_model({"name": "mlp", "hidden": [12]}, digits.info)
    train_model(task, model, digits.labeled, {"iterations": 4, "batch_size": 8}, tmp_path / "run", teacher=teacher,
                losses=[{"name": "hard_label"}, {"name": "hint", "teacher_layer": "1", "student_layer": "1"}],
                progress=False)
    assert main(["export", str(tmp_path / "run" / "checkpoints" / "last.pt"), "-o", str(tmp_path / "s.pt")]) == 0
    rec = torch.load(tmp_path / "s.pt", weights_only=True)
    assert set(rec) == {"format", "task", "model_cfg", "info", "model"}
    assert rec["model"].keys() == model.state_dict().keys()  # no adapter, no teacher, no optimizer
    _, exported, _ = load_model(tmp_path / "s.pt")
    assert all(torch.equal(v, model.cpu().state_dict()[k]) for k, v in exported.state_dict().items())


def test_divergence_is_reported_with_a_fix(digits, tmp_path):
    task = ddkit.build("tasks", "classification")
    model = task.build_model({"name": "mlp", "hidden": [8]}, digits.info)
    with torch.no_grad():
        model[-1].weight.fill_(float("nan"))
    # the CPU checks every step; on CUDA the check waits for the logging window (no sync per step)
    with pytest.raises(TrainingDiverged, match=r"loss became nan (at iteration 0|between iterations 0 and 5)"
                                               r"\b.*lower train.lr"):
        train_model(task, model, digits.labeled, {"iterations": 5, "batch_size": 8}, tmp_path, progress=False)


def test_student_initialised_from_the_teacher(digits, tmp_path):
    task = ddkit.build("tasks", "classification")
    teacher = task.build_model({"name": "mlp", "hidden": [8]}, digits.info)
    student = task.build_model({"name": "mlp", "hidden": [8]}, digits.info)
    train_model(task, student, digits.labeled, {"iterations": 5, "max_iterations": 0, "init": "teacher"}, tmp_path,
                teacher=teacher, progress=False)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in student.state_dict().items())
    other = task.build_model({"name": "mlp", "hidden": [4]}, digits.info)
    with pytest.raises(ConfigError, match="architecture differs"):
        train_model(task, other, digits.labeled, {"iterations": 5, "init": "teacher"}, tmp_path / "x",
                    teacher=teacher, progress=False)


# --------------------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("recipe", sorted(CONFIGS.glob("train_*.yaml")), ids=lambda p: p.name)
def test_train_recipes_validate(recipe):
    cfg = load_config(recipe)
    validate_config(cfg, ddkit.get_registry(), source=str(recipe))
    for stage in ("teacher", "student"):
        if cfg.get(stage) is not None and cfg[stage].get("train") is not None:
            parse_train_config(cfg[stage].train, where=f"{recipe.name}: {stage}.train")


def test_mnist_kd_recipe_defaults_train_stably(tmp_path):
    """The KD recipe's student settings (LR, temperature, clipping) on the real MNIST digits, shortened."""
    cfg = load_config(CONFIGS / "train_mnist_kd.yaml", [
        f"run.out_dir={tmp_path}", "teacher.model.hidden=[128]", "teacher.train.iterations=150",
        "teacher.train.eval_every=0", "teacher.train.checkpoint_every=0",
        "student.train.iterations=200", "student.train.eval_every=0", "student.train.checkpoint_every=0",
        "student.train.log_every=50"])
    teacher = run_train(cfg, stage="teacher", source="kd recipe", progress=False)
    student = run_train(cfg, stage="student", source="kd recipe", progress=False)
    assert teacher["metrics"]["accuracy"] > 0.75
    logs = [r for r in _records(tmp_path / "student") if "losses" in r]
    assert set(logs[0]["losses"]) == {"hard_label", "soft_target"}
    assert logs[-1]["loss"] < 0.5 * logs[0]["loss"]
    assert student["metrics"]["accuracy"] > 0.75
    assert list((tmp_path / "student" / "teacher_cache").glob("*.pt"))


# ------------------------------------------------------------------------------------------------------- CLI
def _recipe(tmp_path: Path, iterations: int = 300) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(f"""
run: {{name: t, out_dir: {tmp_path / 'out'}, seed: 1, device: cpu}}
task: {{name: classification}}
data: {{dataset: {{name: digits}}, split: {{labeled: 0.5, test: 0.2, seed: 0}}}}
teacher:
  model: {{name: mlp, hidden: [16], dropout: 0.2}}
  train: {{iterations: {iterations}, batch_size: 16, lr: 0.05, steps: [0.5], checkpoint_every: 10, log_every: 20}}
""")
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_cli_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    # long enough to be caught mid-run: 300 tiny steps took under one 0.2 s poll on an idle machine, and the run had
    # finished (its last checkpoint written, not model.pt) when the kill came
    total = 3000
    recipe = _recipe(tmp_path, iterations=total)
    run_dir = tmp_path / "out" / "teacher"
    proc = subprocess.Popen([sys.executable, "-m", "ddkit", "train", str(recipe), "--no-progress"], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            ckpt = run_dir / "checkpoints" / "last.pt"
            if ckpt.exists() and torch.load(ckpt, weights_only=True)["iteration"] >= total // 10:
                break
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    stopped_at = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["iteration"]
    assert 0 < stopped_at < total and not (run_dir / "model.pt").exists()
    out = subprocess.run([sys.executable, "-m", "ddkit", "train", str(recipe), "--resume", "--no-progress"],
                         env=_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["finished"] and summary["iterations"] == total
    assert f"resumed from {run_dir / 'checkpoints' / 'last.pt'} at iteration" in (run_dir / "train.log").read_text()

    resumed = _records(run_dir)
    cfg = load_config(recipe, [f"run.out_dir={tmp_path / 'ref'}"])
    reference = run_train(cfg, source=str(recipe), progress=False)
    assert reference["metrics"] == summary["metrics"]
    a, b = _weights(run_dir), _weights(tmp_path / "ref" / "teacher")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed == _records(tmp_path / "ref" / "teacher")
    assert (run_dir / "config.yaml").is_file()


def test_cli_reports_recipe_errors_in_one_line(tmp_path, capsys):
    from ddkit.cli import main

    recipe = _recipe(tmp_path, iterations=5)
    assert main(["train", str(recipe), "teacher.train.lr_rate=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'lr_rate'" in err and len(err.strip().splitlines()) == 1
    assert main(["train", str(recipe), "teacher.trainer.lr=1"]) == 2
    assert "unknown key 'trainer'" in capsys.readouterr().err


def test_student_stage_mixes_pseudo_labels_and_lengthens_the_schedule(tmp_path):
    """``student.pseudo_labels`` (a file in the format ``ddkit label`` writes) joins the labeled set; the sampler
    mixes them 6:4 and ``scale_with_data`` lengthens the schedule by (labeled + pseudo) / labeled."""
    from ddkit.engine.pseudo import IMAGE_LABELS, PseudoLabelWriter

    recipe = tmp_path / "dd.yaml"
    recipe.write_text(f"""
run: {{name: dd, out_dir: {tmp_path / 'out'}, seed: 0, device: cpu}}
task: {{name: classification}}
data: {{dataset: {{name: digits}}, split: {{labeled: 0.1, unlabeled: 0.3, test: 0.2, seed: 0}}}}
student:
  model: {{name: mlp, hidden: [16]}}
  pseudo_labels: auto
  train: {{iterations: 10, scale_with_data: true, batch_size: 10, lr: 0.05, log_every: 0}}
""")
    cfg = load_config(recipe)
    from ddkit.engine.data import build_data

    splits = build_data(cfg.data)
    unl = splits.unlabeled
    writer = PseudoLabelWriter(tmp_path / "out" / "label" / "pseudo_labels.json", IMAGE_LABELS,
                               splits.info.categories, {"dataset_info": {}})
    kept = 0
    for i in range(0, len(unl), 2):  # every other unlabeled image gets its (true) label as a pseudo-label
        writer.add_image(i, f"{i}.png", 8, 8, i)
        writer.add_label(i, unl.ground_truth.get_target(i)["label"], 0.9)
        kept += 1
    writer.close()
    res = run_train(cfg, stage="student", source=str(recipe), progress=False)
    n_lab = len(splits.labeled)
    assert res["total_iterations"] == round(10 * (n_lab + kept) / n_lab)
    log = (tmp_path / "out" / "student" / "train.log").read_text()
    assert f"sources [{n_lab}, {kept}] at ratio [6.0, 4.0]" in log


def test_run_stage_init_follows_train_seed(tmp_path, monkeypatch):
    """In ``ddkit run`` a stage's ``train.seed`` overrides ``run.seed`` for its init and batches; an extra teacher's
    offset applies on top of either."""
    import ddkit.engine.run as run_module

    inits, seeds = [], []

    def initial_weights_only(task, model, sets, cfg, *args, seed, **kwargs):
        inits.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        seeds.append(cfg["seed"] if cfg["seed"] is not None else seed)  # the seed train_model's batches get
        return {"finished": True, "model_path": None, "metrics": {}, "iterations": 0}

    monkeypatch.setattr(run_module, "train_model", initial_weights_only)
    runner = run_module.Runner(load_config(_recipe(tmp_path)))  # run.seed 1
    model_cfg, train_cfg = runner.teacher_cfg["model"], dict(runner.teacher_cfg["train"])
    for train_seed, offset in ((None, 0), (1, 0), (2, 0), (2, 1000), (1002, 0), (None, 1000)):
        runner._train("teacher", model_cfg, {**train_cfg, "seed": train_seed}, [runner.splits.labeled],
                      seed_offset=offset)
    assert seeds == [1, 1, 2, 1002, 1002, 1001]
    assert torch.equal(inits[0], inits[1]) and not torch.equal(inits[0], inits[2])
    assert torch.equal(inits[3], inits[4]) and not torch.equal(inits[3], inits[2])  # an extra teacher's offset


@pytest.mark.parametrize("classes", ["fewer", "renamed"])
def test_a_teacher_of_other_classes_is_refused_before_training_unless_only_its_features_are_read(digits, tmp_path,
                                                                                                 classes):
    """Soft targets read the teacher's class outputs: a teacher of other classes (fewer; or as many, named
    otherwise) is one error before any step; a hint reads features only, so such a teacher may serve it."""
    import dataclasses

    from ddkit.engine.checkpoint import save_model

    task = ddkit.build("tasks", "classification")
    cats = digits.info.categories
    other = cats[:5] if classes == "fewer" else [{**c, "name": f"class {c['id']}"} for c in cats]
    torch.manual_seed(0)
    teacher = task.build_model({"name": "mlp", "hidden": [24]}, dataclasses.replace(digits.info, categories=other))
    save_model(teacher, tmp_path / "teacher.pt")
    cfg = {"iterations": 3, "batch_size": 8, "log_every": 1}

    def train(losses, out):
        torch.manual_seed(0)
        student = task.build_model({"name": "mlp", "hidden": [16]}, digits.info)
        return train_model(task, student, [digits.labeled], cfg, tmp_path / out, teacher=tmp_path / "teacher.pt",
                           losses=losses, progress=False)

    with pytest.raises(ConfigError, match=r"loss terms \['soft_target'\].* are not the model's .*give a teacher "
                                          r"trained on these classes"):
        train([{"name": "hard_label"}, {"name": "soft_target"}], "soft")
    assert not (tmp_path / "soft" / "checkpoints").exists()
    hint = {"name": "hint", "teacher_layer": "1", "student_layer": "1", "weight": 0.1}
    assert train([{"name": "hard_label"}, hint], "hint")["finished"]
