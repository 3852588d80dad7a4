"""``torchrun --nproc-per-node 2 -m ddkit train``: DDP on CPU with gloo (a student with KD and a hint adapter)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ddkit
from ddkit.engine.checkpoint import load_model, save_model

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
def test_torchrun_two_gloo_processes_train_a_student(tmp_path):
    task = ddkit.build("tasks", "classification")
    info = ddkit.build("datasets", "digits").info
    torch.manual_seed(0)
    save_model(task.build_model({"name": "mlp", "hidden": [24]}, info), tmp_path / "teacher.pt")
    recipe = tmp_path / "ddp.yaml"
    recipe.write_text(f"""
run: {{name: ddp, out_dir: {tmp_path / 'out'}, seed: 0, device: cpu}}
task: {{name: classification}}
data: {{dataset: {{name: digits}}, split: {{labeled: 0.5, test: 0.2, seed: 0}}}}
student:
  model: {{name: mlp, hidden: [16]}}
  teacher: {tmp_path / 'teacher.pt'}
  losses: [{{name: hard_label}}, {{name: soft_target}}, {{name: hint, teacher_layer: '1', student_layer: '1'}}]
  train: {{iterations: 40, batch_size: 16, lr: 0.05, teacher_cache: true, log_every: 20}}
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "ddkit", "train", str(recipe),
                          "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    run_dir = tmp_path / "out" / "student"
    log = (run_dir / "train.log").read_text()
    assert "(batch 16, 2 process(es), cpu)" in log
    assert "DDP: the 2 ranks hold identical weights" in log  # gradients (adapter included) were averaged
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["finished"] and summary["iterations"] == 40
    assert summary["metrics"]["accuracy"] > 0.3
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "losses" in r] == [20, 40]  # rank 0 alone writes
    _, model, _ = load_model(run_dir)
    assert sum(p.numel() for p in model.parameters()) == 64 * 16 + 16 + 16 * 10 + 10
