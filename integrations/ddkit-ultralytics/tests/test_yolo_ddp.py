"""``torchrun --nproc-per-node 2 -m ddkit train`` with a YOLO student: DDP on CPU with gloo."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from yolo_common import DATA

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")


def test_torchrun_two_gloo_processes_train_a_yolo_student(tmp_path):
    assert TORCHRUN, "torchrun ships with torch"
    recipe = tmp_path / "ddp.yaml"
    recipe.write_text(f"""
run: {{name: ddp, out_dir: {tmp_path / 'out'}, seed: 0, device: cpu}}
task: {{name: detection}}
data: {{train: {{dataset: {{name: yolo, root: {DATA / 'coco8'}, split: train}}}}}}
student:
  model: {{name: yolo, cfg: yolov8n.yaml, imgsz: 64, width: 0.125}}
  train: {{iterations: 3, batch_size: 4, optimizer: adamw, lr: 0.001, hflip: 0.5, log_every: 1}}
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "YOLO_OFFLINE": "1"}
    out = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "ddkit", "train", str(recipe),
                          "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    log = (tmp_path / "out" / "student" / "train.log").read_text()
    assert "(batch 4, 2 process(es), cpu)" in log
    assert "DDP: the 2 ranks hold identical weights" in log
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["finished"] and summary["iterations"] == 3
