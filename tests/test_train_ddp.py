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
  train: {{iterations: 40, batch_size: 16, lr: 0.05, teacher_cache: true, log_every: 20, ema_decay: 0.9,
          ema_tau: 5}}
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
    # model.pt (and the final checkpoint's model) is the EMA of the 40 steps' weights
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert int(last["ema"]["n_averaged"]) == 40
    average = {k.removeprefix("module."): v for k, v in last["ema"].items() if k.startswith("module.")}
    assert all(torch.equal(v, average[k]) and torch.equal(v, last["model"][k]) for k, v in model.state_dict().items())


RUN_RECIPE = """
run: {{name: ddp_run, out_dir: {out}, seed: 0, device: cpu}}
task: {{name: classification}}
data: {{dataset: {{name: digits}}, split: {{labeled: 0.1, unlabeled: 0.3, test: 0.2, seed: 0}}}}
teacher:
  model: {{name: mlp, hidden: [16]}}
  train: {{iterations: 20, batch_size: 16, lr: 0.1, log_every: 10}}
label:
  transforms: [{{name: identity}}, {{name: translate, shifts: [[1, 0]]}}]
  aggregator: {{name: prob_mean}}
  selector: {{name: count_match}}
  shards: 2
student:
  model: {{name: mlp, hidden: [16]}}
  train: {{iterations: 20, batch_size: 16, lr: 0.1, ratio: [6, 4], log_every: 10}}
baselines: {{labeled_only: true, fully_labeled: true}}
kd:  # a KD transfer set under DDP: each rank's batch mixes labeled and unlabeled digits
  variants:
    transfer:
      transfer_set: [labeled, unlabeled]
      losses: [{{name: hard_label, weight: 0.1}}, {{name: soft_target, weight: 0.9}}]
      train: {{teacher_cache: true}}
"""


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
def test_torchrun_two_gloo_processes_run_a_recipe(tmp_path):
    """``torchrun -m ddkit run``: every training stage is DDP over both ranks with one writer, the label stage's
    shards are split between them, and the results have the structure of a one-process run's."""
    from ddkit.config import load_config
    from ddkit.engine.run import run_recipe

    for name in ("one", "two"):
        (tmp_path / f"{name}.yaml").write_text(RUN_RECIPE.format(out=tmp_path / name))
    single = run_recipe(load_config(tmp_path / "one.yaml"), progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "ddkit", "run",
                          str(tmp_path / "two.yaml"), "--no-progress"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    run_dir = tmp_path / "two"
    assert sorted(p.name for p in run_dir.glob("results.*")) == ["results.json", "results.md"]
    assert out.stdout.count("| model |") == 1 and out.stdout.count("[ddkit run] teacher: running") == 1
    for stage in ("teacher", "student", "baseline_full", "kd_transfer"):
        starts = [line for line in (run_dir / stage / "train.log").read_text().splitlines() if " training " in line]
        assert len(starts) == 1 and "2 process(es)" in starts[0], (stage, starts)
    assert len(list((run_dir / "label" / "shards").glob("shard-*.pt"))) == 2
    two = json.loads((run_dir / "results.json").read_text())
    assert set(two) == set(single) and [r["stage"] for r in two["rows"]] == [r["stage"] for r in single["rows"]]
    assert [set(r) for r in two["rows"]] == [set(r) for r in single["rows"]]


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
def test_torchrun_run_refuses_a_batch_the_ranks_cannot_split_before_anything_is_written(tmp_path):
    recipe = tmp_path / "odd.yaml"
    recipe.write_text(RUN_RECIPE.format(out=tmp_path / "out").replace("batch_size: 16, lr: 0.1, ratio",
                                                                      "batch_size: 15, lr: 0.1, ratio"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "ddkit", "run", str(recipe),
                          "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "error: " + str(recipe) + ": student.train.batch_size 15 is not divisible by the 2 torchrun" in out.stderr
    assert not (tmp_path / "out").exists()


def test_a_torchrun_worker_leaves_with_its_exit_code_and_every_line_written():
    """Under torchrun (WORLD_SIZE > 1) the command ends with os._exit after flushing: the output piped to the
    parent is whole and the exit code is the command's, as in a single process."""
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "ddkit", "config", "show", str(repo / "configs" / "mnist_dd.yaml")]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # piped stdout is block-buffered
    one = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    two = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**env, "WORLD_SIZE": "2"})
    assert one.returncode == two.returncode == 0 and two.stdout == one.stdout and len(one.stdout) > 1000
    bad = subprocess.run(cmd + ["run.sed=1"], capture_output=True, text=True, timeout=120,
                         env={**env, "WORLD_SIZE": "2"})
    assert bad.returncode == 2 and "unknown key 'sed'" in bad.stderr
