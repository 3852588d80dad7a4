"""A third-party KD loss (tests/plugin_pkg, registered through its entry points like any outside package) gets the
teacher under ``ddkit train`` and under ``ddkit run``: ddkit asks each loss term whether it reads the teacher
instead of knowing KD losses by name."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ddkit
from ddkit.engine.checkpoint import load_model
from ddkit.engine.data import split_dataset
from ddkit.io import file_sha256
from ddkit.plugin_manager import make_plugin_manager, registry_from_plugin_manager

RECIPE = """
run: {{name: kd3p, out_dir: "{out}", seed: 0, device: cpu}}
task: {{name: classification}}
data:
  dataset: {{name: digits}}
  split: {{labeled: 0.3, test: 0.2, seed: 0}}
teacher:
  model: {{name: mlp, hidden: [32]}}
  train: {{iterations: 60, batch_size: 32, lr: 0.1, log_every: 20}}
student:
  model: {{name: mlp, hidden: [16]}}
  losses: [{{name: example_logit_l2}}]
  train: {{iterations: 60, batch_size: 32, lr: 0.05, log_every: 20}}
kd:
  variants:
    alone: {{losses: [{{name: hard_label}}]}}
    l2: {{losses: [{{name: example_logit_l2}}]}}
"""


def _ddkit(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "ddkit", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _assert_taught_by(student_dir: Path, teacher_dir: Path) -> None:
    """The student trained on the L2 to the teacher's logits alone: the term's logged value (and the teacher's
    logit size, which exists only when a teacher ran) is there, the L2 fell, the student now predicts as the
    teacher does, and its checkpoint records the teacher checkpoint's digest."""
    logs = [json.loads(line) for line in (student_dir / "metrics.jsonl").read_text().splitlines()]
    logs = [r["losses"] for r in logs if "losses" in r]
    assert len(logs) == 3 and all(set(r) == {"example_logit_l2", "example_logit_l2/teacher_abs"} for r in logs)
    assert all(r["example_logit_l2/teacher_abs"] > 0 for r in logs)
    assert 0 < logs[-1]["example_logit_l2"] < 0.5 * logs[0]["example_logit_l2"]
    ckpt = torch.load(student_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["inputs"]["teacher"] == file_sha256(teacher_dir / "model.pt")
    test = split_dataset(ddkit.build("datasets", "digits"), labeled=0.3, test=0.2, seed=0).test
    x = torch.stack([test[i][0] for i in range(len(test))])
    registry = registry_from_plugin_manager(make_plugin_manager())  # not the process-wide one: left as it was
    student, teacher = (load_model(d, registry=registry)[1] for d in (student_dir, teacher_dir))
    with torch.no_grad():
        agree = (student(x).argmax(1) == teacher(x).argmax(1)).float().mean().item()
    assert agree > 0.6  # 10 classes: a student that never saw the teacher agrees with it about 1 time in 10


@pytest.mark.usefixtures("with_example_plugin", "one_thread")
def test_third_party_kd_loss_gets_the_teacher_under_train_and_run(tmp_path, monkeypatch):
    monkeypatch.setenv("DDKIT_DISABLE_PLUGINS", "example_clash")  # the clash module exists to test clashes
    recipe = tmp_path / "kd3p.yaml"
    recipe.write_text(RECIPE.format(out=tmp_path / "train"))
    _ddkit("train", str(recipe), "--no-progress")
    out = json.loads(_ddkit("train", str(recipe), "--stage", "student", "--no-progress").stdout.splitlines()[-1])
    assert out["finished"]
    _assert_taught_by(tmp_path / "train" / "student", tmp_path / "train" / "teacher")

    _ddkit("run", str(recipe), f"run.out_dir={tmp_path / 'run'}")
    _assert_taught_by(tmp_path / "run" / "kd_l2", tmp_path / "run" / "teacher")
