"""``train.ema_decay``: an exponential moving average of the student's weights (Ultralytics' ModelEMA ramp),
checked against a slow reference computed from the raw weights of every step, on a model with BatchNorm."""
from __future__ import annotations

import json
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


def _train(task, digits, run, resume=False, **cfg):
    return train_model(task, _student(task, digits), digits.labeled, {**CFG, **cfg}, run, eval_set=digits.test,
                       seed=1, progress=False, resume=resume)


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
    # the average is not the last weights; the final checkpoint holds it as its model too
    assert not torch.allclose(saved["classifier.4.weight"], raw[-1]["classifier.4.weight"])
    last = load_checkpoint(tmp_path / "ema" / "checkpoints" / LAST)
    assert all(torch.equal(last["model"][k], v) for k, v in saved.items())
    first = (tmp_path / "ema" / "train.log").read_text().splitlines()[0]
    assert first.endswith("; an EMA of the weights (decay 0.9, tau 4)"), first
    # the final evaluation is of the average
    model = load_model(result["model_path"])[1]
    assert result["metrics"] == task.evaluate(model, digits.test, CFG["batch_size"])


def test_a_run_killed_after_a_periodic_checkpoint_resumes_to_the_same_average(digits, tmp_path, monkeypatch):
    """The checkpoint of iteration 5 holds the average of 5 updates (evaluations too see every step), so a run that
    died at iteration 8 resumes from it to the uninterrupted run's model and metrics."""
    task = ddkit.build("tasks", "classification")
    full = _train(task, digits, tmp_path / "full", eval_every=5)
    step = Trainer.run_step

    def dying_step(self):
        if self.iter == 8:
            raise RuntimeError("killed")
        step(self)

    monkeypatch.setattr(Trainer, "run_step", dying_step)
    with pytest.raises(RuntimeError, match="killed"):
        _train(task, digits, tmp_path / "part", eval_every=5)
    killed = load_checkpoint(tmp_path / "part" / "checkpoints" / LAST)
    assert int(killed["ema"]["n_averaged"]) == 5 and killed["iteration"] == 5
    # a periodic checkpoint keeps the raw weights for the optimizer, the average beside them
    average = {k.removeprefix("module."): v for k, v in killed["ema"].items() if k.startswith("module.")}
    assert not torch.equal(average["classifier.4.weight"], killed["model"]["classifier.4.weight"])
    monkeypatch.setattr(Trainer, "run_step", step)
    rest = _train(task, digits, tmp_path / "part", eval_every=5, resume=True)
    a, b = (load_model(r["model_path"])[1].state_dict() for r in (full, rest))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rest["metrics"] == full["metrics"]
    evals = [[{k: v for k, v in json.loads(line).items() if k != "train_time_s"}
              for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
             for run in ("full", "part")]
    assert evals[0] == evals[1] and [e["iteration"] for e in evals[0]] == [5, 10, 12, 12]  # 12: eval, final
    # the evaluation at 5 was of the average (the raw weights score otherwise)
    model = _student(task, digits)
    model.load_state_dict(average)
    assert evals[0][0]["eval"] == task.evaluate(model, digits.test, CFG["batch_size"])
    model.load_state_dict(killed["model"])
    assert evals[0][0]["eval"] != task.evaluate(model, digits.test, CFG["batch_size"])


def test_off_by_default_and_bad_values_are_refused_with_the_key():
    assert parse_train_config({}).ema_decay == 0
    with pytest.raises(ValueError, match="ema_decay"):
        parse_train_config({"ema_decay": 1.0})
    with pytest.raises(ValueError, match="ema_tau"):
        parse_train_config({"ema_decay": 0.99, "ema_tau": 0})
