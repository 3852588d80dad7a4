"""``train.ema_decay``: an exponential moving average of the student's weights (Ultralytics' ModelEMA ramp),
checked against a slow reference computed from the raw weights of every step, on a model with BatchNorm."""
from __future__ import annotations

import math

import pytest
import torch

import ddkit
from ddkit.engine.checkpoint import LAST, load_checkpoint, load_model
from ddkit.engine.data import split_dataset
from ddkit.engine.ema import ema_decay_at
from ddkit.engine.task import unwrap_model
from ddkit.engine.train import parse_train_config, train_model
from ddkit.engine.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)

CFG = {"iterations": 12, "batch_size": 16, "lr": 0.05, "checkpoint_every": 5, "ema_decay": 0.9, "ema_tau": 4}


@pytest.fixture(scope="module")
def digits():
    return split_dataset(ddkit.build("datasets", "digits"), labeled=0.3, unlabeled=0.5, test=0.2, seed=0)


def _student(task, digits):
    torch.manual_seed(0)
    return task.build_model({"name": "lenet", "channels": [4, 8], "hidden": 16, "dropout": 0.2}, digits.info)


def _train(task, digits, run, **cfg):
    return train_model(task, _student(task, digits), digits.labeled, {**CFG, **cfg}, run, eval_set=digits.test,
                       seed=1, progress=False)


def _reference(raw: list[dict[str, torch.Tensor]], decay: float, tau: float) -> dict[str, torch.Tensor]:
    """Ultralytics' ModelEMA by hand: update n (0-based) keeps decay * (1 - exp(-n / tau)) of the average;
    floating entries (weights and BatchNorm statistics) are averaged, integer ones (the step count) follow."""
    average = {k: v.double() if v.is_floating_point() else v.clone() for k, v in raw[0].items()}
    for n, weights in enumerate(raw[1:], start=1):
        keep = decay * (1 - math.exp(-n / tau))
        for k, v in weights.items():
            average[k] = keep * average[k] + (1 - keep) * v.double() if v.is_floating_point() else v.clone()
    return average


def test_the_ramp_starts_at_a_copy_and_approaches_the_decay():
    assert ema_decay_at(0, 0.9999, 2000) == 0.0
    assert ema_decay_at(2000, 0.9999, 2000) == pytest.approx(0.9999 * (1 - math.exp(-1)))
    assert ema_decay_at(10**6, 0.9999, 2000) == pytest.approx(0.9999)


def test_the_saved_model_is_the_average_of_every_step(digits, tmp_path, monkeypatch):
    task = ddkit.build("tasks", "classification")
    raw: list[dict[str, torch.Tensor]] = []
    step = Trainer.run_step

    def recording_step(self):
        step(self)
        raw.append({k: v.detach().clone() for k, v in unwrap_model(self.student).state_dict().items()})

    monkeypatch.setattr(Trainer, "run_step", recording_step)
    result = _train(task, digits, tmp_path / "ema")
    assert len(raw) == CFG["iterations"]
    expected = _reference(raw, CFG["ema_decay"], CFG["ema_tau"])
    saved = load_model(result["model_path"])[1].state_dict()
    assert saved.keys() == expected.keys() and any("running_var" in k for k in saved)
    for k, v in saved.items():
        torch.testing.assert_close(v.double() if v.is_floating_point() else v, expected[k], rtol=1e-5, atol=1e-6)
    # the average is not the last weights; the checkpoint keeps those for the optimizer to continue from
    last = load_checkpoint(tmp_path / "ema" / "checkpoints" / LAST)
    assert all(torch.equal(last["model"][k], raw[-1][k]) for k in raw[-1])
    assert not torch.allclose(saved["classifier.4.weight"], raw[-1]["classifier.4.weight"])
    # the final evaluation is of the average
    model = load_model(result["model_path"])[1]
    assert result["metrics"] == task.evaluate(model, digits.test, CFG["batch_size"])


def test_an_interrupted_ema_run_resumes_to_the_same_average(digits, tmp_path):
    task = ddkit.build("tasks", "classification")
    full = _train(task, digits, tmp_path / "full")
    part = _train(task, digits, tmp_path / "part", max_iterations=7)
    assert part["model_path"] is None
    rest = train_model(task, _student(task, digits), digits.labeled, CFG, tmp_path / "part", eval_set=digits.test,
                       seed=1, progress=False, resume=True)
    a, b = (load_model(r["model_path"])[1].state_dict() for r in (full, rest))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rest["metrics"] == full["metrics"]


def test_off_by_default_and_bad_values_are_refused_with_the_key():
    assert parse_train_config({}).ema_decay == 0
    with pytest.raises(ValueError, match="ema_decay"):
        parse_train_config({"ema_decay": 1.0})
    with pytest.raises(ValueError, match="ema_tau"):
        parse_train_config({"ema_decay": 0.99, "ema_tau": 0})
