"""Ctrl-C or SIGTERM under ``torchrun`` (2 gloo processes): every rank stops after the same whole step, rank 0
writes ``checkpoints/last.pt`` and ``--resume`` finishes the schedule; the launcher's repeat of the signal is the
same request. Unit tests of the agreement and of the repeat rule, without processes, come first."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddkit.engine import trainer
from ddkit.engine.checkpoint import load_model
from ddkit.engine.trainer import StopAgreement, deferred_interrupt
from ddkit.errors import Interrupted

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")


# ------------------------------------------------------------------------------------------------- no processes
def test_the_ranks_agree_one_step_after_the_signal_is_shared(tmp_path):
    """The all-reduce started after step i is read after step i+1: a signal noted by step 2 stops after step 3."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        agree = StopAgreement.for_process_group()
        assert [agree.after_step(s) for s in (None, None, signal.SIGINT)] == [None, None, None]
        assert agree.after_step(None) == signal.SIGINT
        assert agree.pending is None  # stopping: no collective is left in flight
        agree = StopAgreement.for_process_group()
        agree.after_step(None)
        agree.finish()
        assert agree.pending is None
    finally:
        dist.destroy_process_group()


def test_under_ddp_a_quick_repeat_is_the_same_request_and_a_later_one_stops_at_once(capsys, monkeypatch):
    with deferred_interrupt(ddp=True, announce=True) as stop_signal:
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)  # the launcher forwarding the Ctrl-C it got
        assert stop_signal() == signal.SIGINT
        signal.raise_signal(signal.SIGTERM)  # its shutdown of the workers: the same request, named by its SIGTERM
        assert stop_signal() == signal.SIGTERM
        monkeypatch.setattr(trainer, "DDP_REPEAT_S", 0.0)
        with pytest.raises(Interrupted) as err:
            signal.raise_signal(signal.SIGTERM)  # a user's second Ctrl-C (the agent then sends SIGTERM)
        assert err.value.signum == signal.SIGTERM
    err_text = capsys.readouterr().err
    assert err_text.count("Ctrl-C: finishing this iteration and the next on every process, then writing") == 1


def test_under_ddp_only_rank_0_says_it_finishes_the_step(capsys):
    with deferred_interrupt(ddp=True, announce=False) as stop_signal:
        signal.raise_signal(signal.SIGTERM)
        assert stop_signal() == signal.SIGTERM
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------------------------- torchrun, gloo
# A torchrun worker running `ddkit` whose step 2 waits, once done, for the test to signal it (argv: folder, then
# the command's arguments): it writes ready-RANK holding its pid and goes on when the folder holds `sent`.
CHILD = """
import os, sys, time
from pathlib import Path
from ddkit.engine import trainer
folder, step = Path(sys.argv[1]), trainer.Trainer.run_step
if "REPEAT_S" in os.environ:
    trainer.DDP_REPEAT_S = float(os.environ["REPEAT_S"])
def run_step(self):
    step(self)
    if self.iter == 2:
        (folder / f"ready-{self.rank}").write_text(str(os.getpid()))
        deadline = time.time() + 120
        while not (folder / "sent").exists() and time.time() < deadline:
            time.sleep(0.01)
trainer.Trainer.run_step = run_step
from ddkit.cli import main
sys.argv = ["ddkit", *sys.argv[2:]]
main()
"""

RECIPE = """
run: {{name: t, out_dir: "{out}", seed: 1, device: cpu}}
task: {{name: classification}}
data: {{dataset: {{name: digits}}, split: {{labeled: 0.5, test: 0.2, seed: 0}}}}
teacher:
  model: {{name: mlp, hidden: [16]}}
  train: {{iterations: 12, batch_size: 16, lr: 0.05, momentum: 0.9, checkpoint_every: 100, log_every: 4}}
"""


def _wait_for(condition, what: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None and time.time() < deadline, f"no {what}"
        time.sleep(0.02)


def _interrupted_run(tmp_path: Path, send, env: dict[str, str] | None = None) -> tuple[Path, str, Path]:
    """Start the child under torchrun, wait for both ranks at step 2, ``send(proc, pids, stderr_path)``, then let
    them go on; returns the run folder, the output (stdout and stderr) and the recipe."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(out=tmp_path / "out"))
    (tmp_path / "child.py").write_text(CHILD)
    log_path = tmp_path / "torchrun.txt"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([TORCHRUN, "--standalone", "--nproc-per-node", "2", str(tmp_path / "child.py"),
                                 str(tmp_path), "train", str(recipe), "--no-progress"], stdout=log, stderr=log,
                                env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, start_new_session=True)
        try:
            ready = [tmp_path / f"ready-{r}" for r in (0, 1)]
            _wait_for(lambda: all(p.exists() and p.read_text() for p in ready), "worker at step 2", proc)
            send(proc, [int(p.read_text()) for p in ready], log_path)
            (tmp_path / "sent").touch()
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    return tmp_path / "out" / "teacher", log_path.read_text(), recipe


def _torchrun_train(recipe: Path, *args: str) -> None:
    out = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "ddkit", "train", str(recipe),
                          "--no-progress", *args], env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["finished"] and summary["iterations"] == 12


def _resumes_to_the_end(recipe: Path, run_dir: Path) -> None:
    _torchrun_train(recipe, "--resume")
    assert "resumed from" in (run_dir / "train.log").read_text()


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
def test_ctrl_c_under_torchrun_stops_every_rank_after_one_step_and_checkpoints(tmp_path):
    """Ctrl-C as a terminal sends it: SIGINT to torchrun's process group; the agent forwards it to each worker
    (they run in sessions of their own). Noted by step 2, shared after it, every rank stops after step 3: the
    checkpoint says 4 (none periodic: checkpoint_every 100), as the log line says, and --resume ends the run with
    the uninterrupted run's weights."""
    def ctrl_c(proc: subprocess.Popen, pids: list[int], log_path: Path) -> None:
        os.killpg(proc.pid, signal.SIGINT)
        _wait_for(lambda: log_path.read_text().count("closing signal SIGINT") >= 2, "forwarded SIGINT", proc)

    run_dir, output, recipe = _interrupted_run(tmp_path, ctrl_c)
    ckpt = run_dir / "checkpoints" / "last.pt"
    assert ckpt.exists(), output[-4000:]
    assert torch.load(ckpt, weights_only=True)["iteration"] == 4
    assert "interrupted (Ctrl-C) at iteration 4; checkpoint written" in (run_dir / "train.log").read_text()
    assert output.count("Ctrl-C: finishing this iteration and the next on every process") == 1, output[-4000:]
    assert output.count("ddkit train: interrupted") == 1, output[-4000:]  # rank 0 says it for every process
    assert not (run_dir / "model.pt").exists()
    _resumes_to_the_end(recipe, run_dir)
    _torchrun_train(recipe, f"run.out_dir={tmp_path / 'ref'}")  # uninterrupted: a step applied twice would differ
    a, b = load_model(run_dir)[1].state_dict(), load_model(tmp_path / "ref" / "teacher")[1].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
def test_sigint_then_sigterm_under_torchrun_is_one_request_and_still_checkpoints(tmp_path):
    """SIGINT then, at once, SIGTERM to each worker (a launcher's or scheduler's shutdown after the Ctrl-C): the
    same request, so every rank still finishes step 3 and rank 0 checkpoints 4 whole steps; the request is named
    SIGTERM whichever handler ran first (CPython may run the second one nested in the first)."""
    def sigint_sigterm(proc: subprocess.Popen, pids: list[int], log_path: Path) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            for pid in pids:
                os.kill(pid, sig)

    run_dir, output, recipe = _interrupted_run(tmp_path, sigint_sigterm)
    ckpt = run_dir / "checkpoints" / "last.pt"
    assert ckpt.exists(), output[-4000:]
    assert torch.load(ckpt, weights_only=True)["iteration"] == 4
    assert "interrupted (SIGTERM) at iteration 4; checkpoint written" in (run_dir / "train.log").read_text()
    _resumes_to_the_end(recipe, run_dir)


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
def test_a_later_second_signal_under_torchrun_still_stops_at_once(tmp_path):
    """Past DDP_REPEAT_S (0 here) a second signal is a second request: every rank stops mid-step, and no
    checkpoint of a step cut in the middle is written."""
    def twice(proc: subprocess.Popen, pids: list[int], log_path: Path) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            for pid in pids:
                os.kill(pid, sig)

    run_dir, output, _ = _interrupted_run(tmp_path, twice, env={"REPEAT_S": "0"})
    assert not (run_dir / "checkpoints" / "last.pt").exists(), output[-4000:]
    assert "a step cut in the middle is not saved" in (run_dir / "train.log").read_text()
