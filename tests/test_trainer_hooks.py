"""The trainer's hooks and resume rules: ``metrics.csv`` beside ``metrics.jsonl`` (fixed columns, truncated on
resume like the jsonl) and which changed keys a resume refuses."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import ddkit
from ddkit.engine.checkpoint import save_model
from ddkit.engine.data import split_dataset
from ddkit.engine.train import resume_changes, train_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)


@pytest.fixture(scope="module")
def digits():
    return split_dataset(ddkit.build("datasets", "digits"), labeled=0.3, unlabeled=0.5, test=0.2, seed=0)


def _csv(run: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(run / "metrics.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], [dict(zip(rows[0], r)) for r in rows[1:]]


def _logged(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"losses"' in line]


def _train(task, digits, tmp_path, run: str, **cfg):
    torch.manual_seed(0)
    student = task.build_model({"name": "mlp", "hidden": [16], "dropout": 0.2}, digits.info)
    losses = [{"name": "hard_label"},
              {"name": "hint", "teacher_layer": "1", "student_layer": "1", "stage_fraction": 0.4},
              {"name": "soft_target", "temperature": 2.0}]
    base = {"iterations": 20, "batch_size": 16, "lr": 0.05, "log_every": 3, "checkpoint_every": 4}
    return train_model(task, student, digits.labeled, {**base, **cfg}, tmp_path / run,
                       teacher=tmp_path / "teacher.pt", losses=losses, seed=1, progress=False)


def test_metrics_csv_has_fixed_columns_and_resumes_like_the_jsonl(digits, tmp_path):
    task = ddkit.build("tasks", "classification")
    torch.manual_seed(0)
    save_model(task.build_model({"name": "mlp", "hidden": [24]}, digits.info), tmp_path / "teacher.pt")
    _train(task, digits, tmp_path, "full")
    header, rows = _csv(tmp_path / "full")
    # every term known at start, although the first records (the hint stage) log only the hint
    assert header == ["iteration", "lr", "loss", "hard_label", "hint", "soft_target", "samples_per_s"]
    logged = _logged(tmp_path / "full")
    assert [int(r["iteration"]) for r in rows] == [r["iteration"] for r in logged] == [3, 6, 9, 12, 15, 18, 20]
    for row, rec in zip(rows, logged):
        assert float(row["loss"]) == rec["loss"] and float(row["lr"]) == rec["lr"]
        for name in ("hard_label", "hint", "soft_target"):
            assert row[name] == ("" if name not in rec["losses"] else repr(rec["losses"][name]))
    assert rows[0]["hard_label"] == "" and rows[-1]["hint"] == ""

    # stopped at 10 (checkpoint at 8), then a killed writer's rows after the checkpoint and a torn line
    _train(task, digits, tmp_path, "part", max_iterations=10)
    with open(tmp_path / "part" / "metrics.csv", "a") as fh:
        fh.write("12,0.05,9.9,,9.9,,1.0\n14,0.05,9.")
    _train(task, digits, tmp_path, "part")
    header_b, rows_b = _csv(tmp_path / "part")
    strip = lambda rs: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rs]
    assert header_b == header and strip(rows_b) == strip(rows)


def test_metrics_csv_has_the_evaluations_as_columns(digits, tmp_path):
    """As Ultralytics' results.csv: each evaluation's metrics on the row of its iteration, other rows empty."""
    task = ddkit.build("tasks", "classification")
    torch.manual_seed(0)
    student = task.build_model({"name": "mlp", "hidden": [16]}, digits.info)
    cfg = {"iterations": 20, "batch_size": 16, "lr": 0.05, "log_every": 3, "eval_every": 6}
    train_model(task, student, digits.labeled, cfg, tmp_path / "run", eval_set=digits.test, seed=1, progress=False)
    header, rows = _csv(tmp_path / "run")
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["iteration"]: r["eval"] for r in evals if r.get("eval") and not r.get("final")}
    assert sorted(evals) == [6, 12, 18, 20] and header[:4] == ["iteration", "lr", "loss", "hard_label"]
    names = [f"eval/{k}" for k in evals[20]]
    assert header[-len(names):] == names and [int(r["iteration"]) for r in rows] == [3, 6, 9, 12, 15, 18, 20]
    for row in rows:
        measured = evals.get(int(row["iteration"]))
        assert [row[n] for n in names] == ([repr(v) for v in measured.values()] if measured else [""] * len(names))
        assert row["loss"] != ""  # the training values stay on the same row


def test_resume_changes_sorts_refused_from_harmless():
    old = {"recipe": {"train": {"lr": 0.05, "log_every": 10, "max_iterations": 5, "num_workers": 0},
                      "losses": [{"name": "hard_label"}], "seed": 0},
           "inputs": {"data": "aa", "teacher": None}}
    new = {"recipe": {"train": {"lr": 0.5, "log_every": 20, "max_iterations": None, "num_workers": 2, "fused": True},
                      "losses": [{"name": "hard_label"}, {"name": "soft_target"}], "seed": 0},
           "inputs": {"data": "bb", "teacher": None}}
    refused, harmless = resume_changes(old, new)
    assert harmless == ["train.fused: '<unset>' -> True", "train.log_every: 10 -> 20",  # an older ddkit's checkpoint
                        "train.max_iterations: 5 -> None", "train.num_workers: 0 -> 2"]
    assert refused == ["the training data (fingerprint of targets and files): 'aa' -> 'bb'",
                       "losses: [{'name': 'hard_label'}] -> [{'name': 'hard_label'}, {'name': 'soft_target'}]",
                       "train.lr: 0.05 -> 0.5"]
    assert resume_changes(old, old) == ([], [])
    assert "train.fused: True -> '<unset>'" in resume_changes(new, old)[0]  # a key this run lacks is refused


def test_a_checkpoint_of_an_older_ddkit_resumes_and_its_missing_keys_are_harmless(tmp_path):
    from ddkit.engine.resume import check_resume
    from ddkit.errors import ConfigError

    oldest = {"train_cfg": {"lr": 0.05}, "total_iterations": 10}  # before recipe and inputs records
    recipe = {"train": {"lr": 0.05, "fused": True}, "losses": [{"name": "hard_label"}], "seed": 0}
    harmless = check_resume(tmp_path / "last.pt", oldest, recipe, {"data": "aa", "teacher": None}, 10)
    assert "train.fused: '<unset>' -> True" in harmless and "seed: '<unset>' -> 0" in harmless
    assert any(line.startswith("the training data") for line in harmless)
    with pytest.raises(ConfigError, match=r"differs in train.lr: 0.05 -> 0.5"):
        check_resume(tmp_path / "last.pt", oldest, {**recipe, "train": {"lr": 0.5}}, {}, 10)


def test_init_teacher_applies_when_resume_finds_no_checkpoint(digits, tmp_path):
    """``ddkit run`` always asks to resume: with nothing to resume from, ``init: teacher`` must still copy the
    teacher (it used to be skipped whenever ``resume`` was set)."""
    task = ddkit.build("tasks", "classification")
    torch.manual_seed(0)
    teacher = task.build_model({"name": "mlp", "hidden": [24]}, digits.info)
    save_model(teacher, tmp_path / "teacher.pt")
    torch.manual_seed(1)
    student = task.build_model({"name": "mlp", "hidden": [24]}, digits.info)
    cfg = {"iterations": 5, "max_iterations": 0, "batch_size": 8, "init": "teacher"}
    train_model(task, student, digits.labeled, cfg, tmp_path / "run", teacher=tmp_path / "teacher.pt",
                resume=True, progress=False)
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["iteration"] == 0
    expected = teacher.state_dict()
    assert all(torch.equal(saved["model"][k], expected[k]) for k in expected)
