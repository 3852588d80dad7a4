"""``ddkit train`` never silently trains on changed data or hyperparameters and never loses finished work (issue 12):
resume refuses a recipe or inputs that change the result and says which harmless keys changed; a finished run is
not replaced without --force; --resume without a checkpoint says it starts fresh; stale temp files go; an unreadable
checkpoint is one line. On every failure nothing in the existing run folder changes."""
from __future__ import annotations

import hashlib
import json
import logging
import pathlib
from pathlib import Path

import pytest
import torch

import ddkit
from ddkit.cli import main
from ddkit.engine.checkpoint import load_model, save_model
from ddkit.engine.teacher_cache import dataset_fingerprint

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)

RECIPE = """
run: {{name: t, out_dir: "{out}", seed: 1, device: cpu}}
task: {{name: classification}}
data: {{dataset: {dataset}, split: {{labeled: 0.5, test: 0.2, seed: 0}}}}
teacher:
  model: {{name: mlp, hidden: [16], dropout: 0.2}}
  train: {{iterations: 8, batch_size: 16, lr: 0.05, momentum: 0.9, checkpoint_every: 2, log_every: 2{extra}}}
student:
  model: {{name: mlp, hidden: [8]}}
  losses: [{{name: hard_label}}, {{name: soft_target, temperature: 2.0}}]
  train: {{iterations: 6, batch_size: 16, lr: 0.05, log_every: 2{extra}}}
"""


def _recipe(tmp_path: Path, extra: str = "", dataset: str = "{name: digits}") -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(out=tmp_path / "out", dataset=dataset, extra=extra))
    return path


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder``: its content digest and mtime."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _fails_in_one_line(args: list[str], capsys, *needles: str) -> str:
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "weights_only=False" not in err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def stopped(tmp_path):
    """A teacher run stopped at iteration 4 of 8 (``max_iterations``), and its recipe."""
    recipe = _recipe(tmp_path)
    assert main(["train", str(recipe), "--no-progress", "teacher.train.max_iterations=4"]) == 0
    return recipe, tmp_path / "out" / "teacher"


# ---------------------------------------------------------------------------------------------- resume changes
@pytest.mark.parametrize("override, shown", [
    ("teacher.train.lr=0.5", "train.lr: 0.05 -> 0.5"),
    ("teacher.train.momentum=0.5", "train.momentum: 0.9 -> 0.5"),
    ("teacher.model.dropout=0.4", "model.dropout: 0.2 -> 0.4"),
    ("run.seed=7", "seed: 1 -> 7"),
    ("data.split.seed=3", "the training data"),
])
def test_resume_refuses_a_change_that_alters_the_result(stopped, capsys, override, shown):
    recipe, run_dir = stopped
    before = _snapshot(run_dir)
    _fails_in_one_line(["train", str(recipe), "--resume", "--no-progress", "teacher.train.max_iterations=4",
                        override], capsys, str(run_dir / "checkpoints" / "last.pt"), shown, "--force")
    assert _snapshot(run_dir) == before


@pytest.mark.parametrize("override, shown", [
    ("teacher.train.log_every=3", "train.log_every: 2 -> 3"),
    ("teacher.train.checkpoint_every=3", "train.checkpoint_every: 2 -> 3"),
    ("teacher.train.eval_every=4", "train.eval_every: 0 -> 4"),
])
def test_resume_allows_harmless_changes_and_says_so(stopped, tmp_path, override, shown):
    recipe, run_dir = stopped
    assert main(["train", str(recipe), "--resume", "--no-progress", override]) == 0  # max_iterations: 4 -> None
    log = (run_dir / "train.log").read_text()
    assert f"{shown}" in log and "train.max_iterations: 4 -> None" in log and "does not change the result" in log
    assert main(["train", str(recipe), "--no-progress", f"run.out_dir={tmp_path / 'ref'}"]) == 0
    a, b = load_model(run_dir)[1].state_dict(), load_model(tmp_path / "ref" / "teacher")[1].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the resumed run ends as the uninterrupted one


def test_resume_refuses_another_teacher_checkpoint(tmp_path, capsys):
    """The student's checkpoint records the teacher's digest: a retrained / replaced teacher is refused."""
    recipe = _recipe(tmp_path)
    assert main(["train", str(recipe), "--no-progress"]) == 0
    assert main(["train", str(recipe), "--stage", "student", "--no-progress", "student.train.max_iterations=2"]) == 0
    run_dir = tmp_path / "out" / "student"
    before = _snapshot(run_dir)
    teacher_pt = tmp_path / "out" / "teacher" / "model.pt"
    _, teacher, _ = load_model(teacher_pt)
    with torch.no_grad():
        next(teacher.parameters()).add_(0.01)
    save_model(teacher, teacher_pt)
    _fails_in_one_line(["train", str(recipe), "--stage", "student", "--resume", "--no-progress",
                        "student.train.max_iterations=2"], capsys, "the teacher checkpoint (sha256)", "--force")
    assert _snapshot(run_dir) == before


def _image_folder(root: Path, n: int = 12) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            pixels = (torch.rand(8, 8, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels, mode="L").save(root / c / f"{i}.png")


def test_data_fingerprint_covers_files_and_targets(tmp_path):
    _image_folder(tmp_path / "imgs")
    build = lambda: ddkit.build("datasets", {"name": "image_folder", "root": str(tmp_path / "imgs"),
                                             "grayscale": True})
    first = dataset_fingerprint(build())
    assert dataset_fingerprint(build()) == first  # stable
    from PIL import Image

    Image.fromarray(torch.zeros(9, 9, dtype=torch.uint8).numpy(), mode="L").save(tmp_path / "imgs" / "a" / "3.png")
    changed_file = dataset_fingerprint(build())
    assert changed_file != first
    (tmp_path / "imgs" / "a" / "5.png").rename(tmp_path / "imgs" / "b" / "z5.png")  # a label changes
    assert dataset_fingerprint(build()) not in (first, changed_file)
    digits = ddkit.build("datasets", "digits")
    from ddkit.engine.data import Subset

    assert dataset_fingerprint(Subset(digits, range(50))) != dataset_fingerprint(Subset(digits, range(1, 51)))


def test_pseudo_label_fingerprint_covers_the_unlabeled_image_files(tmp_path):
    """Pseudo-labels train on the unlabeled source's images: a changed image file changes the fingerprint although
    the pseudo-label file is the same."""
    from PIL import Image

    from ddkit.engine.data import HiddenLabels, Subset
    from ddkit.engine.pseudo import IMAGE_LABELS, PseudoLabelWriter, load_pseudo_dataset

    _image_folder(tmp_path / "imgs")
    folder = ddkit.build("datasets", {"name": "image_folder", "root": str(tmp_path / "imgs"), "grayscale": True})
    unlabeled = HiddenLabels(Subset(folder, range(4, 20)))
    writer = PseudoLabelWriter(tmp_path / "pseudo.json", IMAGE_LABELS, folder.info.categories, {"dataset_info": {}})
    for i in range(0, len(unlabeled), 3):
        writer.add_image(i, f"{i}.png", 8, 8, i)
        writer.add_label(i, 0, 0.9)
    writer.close()
    load = lambda: load_pseudo_dataset(tmp_path / "pseudo.json", source=unlabeled)
    first = dataset_fingerprint(load())
    assert dataset_fingerprint(load()) == first
    black = Image.fromarray(torch.zeros(8, 8, dtype=torch.uint8).numpy(), mode="L")
    black.save(folder.files[4 + 3])  # unlabeled item 3 (pseudo-labelled) is folder item 7
    second = dataset_fingerprint(load())
    assert second != first
    black.save(folder.files[4 + 5])  # unlabeled item 5 has no pseudo-label: training does not read it
    assert dataset_fingerprint(load()) == second


def test_resume_refuses_changed_image_files(tmp_path, capsys):
    _image_folder(tmp_path / "imgs")
    dataset = f"{{name: image_folder, root: {tmp_path / 'imgs'}, grayscale: true}}"
    recipe = _recipe(tmp_path, dataset=dataset)
    assert main(["train", str(recipe), "--no-progress", "teacher.train.max_iterations=4"]) == 0
    run_dir = tmp_path / "out" / "teacher"
    before = _snapshot(run_dir)
    from PIL import Image

    for i in range(12):  # every image changes (the split is random): same count, same labels
        Image.fromarray(torch.full((8, 8), i, dtype=torch.uint8).numpy(), mode="L").save(tmp_path / "imgs" / "b" / f"{i}.png")
    _fails_in_one_line(["train", str(recipe), "--resume", "--no-progress", "teacher.train.max_iterations=4"],
                       capsys, "the training data", "--force")
    assert _snapshot(run_dir) == before


# ------------------------------------------------------------------------------------------ finished work kept
@pytest.mark.parametrize("override", [[], ["teacher.train.log_every=4"]])
def test_rerun_of_a_finished_run_is_skipped_unless_forced(tmp_path, caplog, capsys, override):
    recipe = _recipe(tmp_path)
    assert main(["train", str(recipe), "--no-progress"]) == 0
    run_dir = tmp_path / "out" / "teacher"
    before = _snapshot(run_dir)
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="ddkit.train"):
        assert main(["train", str(recipe), "--no-progress", *override]) == 0
    assert f"{run_dir} finished earlier" in caplog.text and "with this recipe" in caplog.text
    assert ("train.log_every: 2 -> 4, which do not change the result" in caplog.text) == bool(override)
    assert "--force" in caplog.text
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["model_path"] == str(run_dir / "model.pt")
    assert _snapshot(run_dir) == before
    assert main(["train", str(recipe), "--no-progress", "--force", "teacher.train.lr=0.5"]) == 0
    after = _snapshot(run_dir)
    assert after["model.pt"][1] != before["model.pt"][1] and after["model.pt"][0] != before["model.pt"][0]
    with caplog.at_level(logging.WARNING, logger="ddkit.train"):  # the same recipe again: the same weights
        assert main(["train", str(recipe), "--no-progress", "--force", *override]) == 0
    assert _snapshot(run_dir)["model.pt"][0] == before["model.pt"][0]


@pytest.mark.parametrize("override, shown", [
    ("teacher.train.lr=0.5", "train.lr: 0.05 -> 0.5"),
    ("teacher.model.dropout=0.4", "model.dropout: 0.2 -> 0.4"),
    ("data.split.seed=3", "the training data"),
])
def test_a_finished_run_of_another_recipe_is_refused_not_reported_done(tmp_path, capsys, override, shown):
    recipe = _recipe(tmp_path)
    assert main(["train", str(recipe), "--no-progress"]) == 0
    run_dir = tmp_path / "out" / "teacher"
    before = _snapshot(run_dir)
    err = _fails_in_one_line(["train", str(recipe), "--no-progress", override], capsys,
                             f"stage teacher finished earlier ({run_dir / 'model.pt'}) with another recipe", shown,
                             "--force", "run.out_dir")
    assert "nothing to do" not in err
    assert _snapshot(run_dir) == before


def test_a_finished_runs_rerun_checks_the_recipe_first(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    assert main(["train", str(recipe), "--no-progress"]) == 0
    run_dir = tmp_path / "out" / "teacher"
    before = _snapshot(run_dir)
    _fails_in_one_line(["train", str(recipe), "--no-progress", "teacher.model.name=torchvision",
                        "teacher.model.arch=resnt18"], capsys, "teacher.model: ", "'resnt18'", "resnet18")
    assert _snapshot(run_dir) == before


def test_a_student_whose_teacher_changed_is_refused_not_reported_done(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    assert main(["train", str(recipe), "--no-progress"]) == 0
    assert main(["train", str(recipe), "--stage", "student", "--no-progress"]) == 0
    assert main(["train", str(recipe), "--no-progress", "--force", "teacher.train.lr=0.5"]) == 0
    before = _snapshot(tmp_path / "out" / "student")
    _fails_in_one_line(["train", str(recipe), "--stage", "student", "--no-progress"], capsys,
                       "stage student finished earlier", "the teacher checkpoint (sha256)", "--force")
    assert _snapshot(tmp_path / "out" / "student") == before


# ---------------------------------------------------------------------------------------- unfinished work kept
def _interrupt_at(monkeypatch, iteration: int, times: int = 1) -> None:
    """Ctrl-C (a real SIGINT, ``times`` times) at the end of training step ``iteration``, after its optimizer
    update: the moment a checkpoint taken at once would record the step as not done."""
    import os
    import signal

    from ddkit.engine.trainer import Trainer

    step = Trainer.run_step

    def run_step(self) -> None:
        step(self)
        if self.iter == iteration:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Trainer, "run_step", run_step)


def test_an_interrupted_run_is_not_started_over_without_asking(tmp_path, capsys, monkeypatch):
    recipe = _recipe(tmp_path)
    _interrupt_at(monkeypatch, 5)
    assert main(["train", str(recipe), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert "ddkit train: interrupted; re-run the same command with --resume to continue" in err
    monkeypatch.undo()
    run_dir = tmp_path / "out" / "teacher"
    before = _snapshot(run_dir)
    _fails_in_one_line(["train", str(recipe), "--no-progress"], capsys, "stage teacher was interrupted at "
                       "iteration 6 of 8", str(run_dir / "checkpoints" / "last.pt"), "--resume", "--force")
    assert _snapshot(run_dir) == before  # the checkpoint of iterations 0-5 is still there
    capsys.readouterr()
    assert main(["train", str(recipe), "--no-progress", "--resume"]) == 0
    assert "resumed from" in (run_dir / "train.log").read_text()
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["finished"]


def test_an_interrupted_forced_run_says_to_resume_with_resume_not_force(tmp_path, capsys, monkeypatch):
    """``ddkit train --force`` interrupted: re-running the same command would start over again (``--force`` wins
    over ``--resume``), so the advice names ``--resume`` instead of ``--force``; that command continues."""
    recipe = _recipe(tmp_path)
    _interrupt_at(monkeypatch, 5)
    assert main(["train", str(recipe), "--no-progress", "--force"]) == 130
    err = capsys.readouterr().err
    assert "ddkit train: interrupted; re-run it with --resume instead of --force to continue" in err, err
    monkeypatch.undo()
    assert main(["train", str(recipe), "--no-progress", "--resume"]) == 0
    assert "resumed from" in (tmp_path / "out" / "teacher" / "train.log").read_text()


def test_ctrl_c_finishes_the_step_so_the_resumed_run_equals_the_uninterrupted_one(tmp_path, capsys, monkeypatch):
    """Ctrl-C right after step 4's optimizer update: the checkpoint says 5 steps are done, and the resumed run ends
    with the uninterrupted run's weights (a checkpoint saying 4 would apply step 4 twice). A second Ctrl-C stops at
    once and writes no checkpoint of a step cut in the middle."""
    recipe = _recipe(tmp_path)
    _interrupt_at(monkeypatch, 4)
    assert main(["train", str(recipe), "--no-progress"]) == 130
    run_dir = tmp_path / "out" / "teacher"
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["iteration"] == 5
    monkeypatch.undo()
    assert main(["train", str(recipe), "--no-progress", "--resume"]) == 0
    assert main(["train", str(recipe), "--no-progress", f"run.out_dir={tmp_path / 'ref'}"]) == 0
    a, b = load_model(run_dir)[1].state_dict(), load_model(tmp_path / "ref" / "teacher")[1].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    _interrupt_at(monkeypatch, 0, times=2)  # twice: at once, in step 0, before any periodic checkpoint
    assert main(["train", str(recipe), "--no-progress", f"run.out_dir={tmp_path / 'twice'}"]) == 130
    assert not (tmp_path / "twice" / "teacher" / "checkpoints" / "last.pt").exists()
    assert "a step cut in the middle is not saved" in (tmp_path / "twice" / "teacher" / "train.log").read_text()


# A `ddkit train` whose step 2 waits, once done, for the test to send SIGTERM (argv: ready file, sent file, the
# command's arguments): the signal comes mid-training at a known step, as Slurm's or Kubernetes' would at any.
SIGTERM_CHILD = """
import sys, time
from pathlib import Path
from ddkit.engine.trainer import Trainer
step, ready, sent = Trainer.run_step, Path(sys.argv[1]), Path(sys.argv[2])
def run_step(self):
    step(self)
    if self.iter == 2:
        ready.touch()
        deadline = time.time() + 120
        while not sent.exists() and time.time() < deadline:
            time.sleep(0.01)
Trainer.run_step = run_step
from ddkit.cli import main
sys.exit(main(sys.argv[3:]))
"""


def test_sigterm_finishes_the_step_checkpoints_and_says_how_to_resume(tmp_path, capsys):
    """SIGTERM (Slurm, Kubernetes, docker stop) mid-training acts as the first Ctrl-C: the step ends, a checkpoint
    of iteration 3 is written (none periodic: checkpoint_every 100), the command says how to resume and exits 143;
    --resume then ends with the uninterrupted run's weights."""
    import os
    import signal
    import subprocess
    import sys
    import time

    recipe, cadence = _recipe(tmp_path), "teacher.train.checkpoint_every=100"
    ready, sent = tmp_path / "ready", tmp_path / "sent"
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_CHILD, str(ready), str(sent), "train", str(recipe),
                             "--no-progress", cadence], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not ready.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        sent.touch()
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "SIGTERM: finishing this iteration, then writing a checkpoint" in err
    assert "ddkit train: interrupted by SIGTERM; re-run the same command with --resume to continue" in err
    run_dir = tmp_path / "out" / "teacher"
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["iteration"] == 3
    assert "interrupted (SIGTERM) at iteration 3; checkpoint written" in (run_dir / "train.log").read_text()
    assert not (run_dir / "model.pt").exists()
    assert main(["train", str(recipe), "--no-progress", "--resume", cadence]) == 0
    assert main(["train", str(recipe), "--no-progress", cadence, f"run.out_dir={tmp_path / 'ref'}"]) == 0
    a, b = load_model(run_dir)[1].state_dict(), load_model(tmp_path / "ref" / "teacher")[1].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_stop_signal_handlers_are_restored_after_training():
    import signal

    from ddkit.engine.trainer import deferred_interrupt

    def mine(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, mine)
    try:
        sigint = signal.getsignal(signal.SIGINT)
        with deferred_interrupt() as stop_signal:
            assert signal.getsignal(signal.SIGTERM) is not mine and stop_signal() is None
            signal.raise_signal(signal.SIGTERM)
            assert stop_signal() == signal.SIGTERM  # deferred: noted, not raised
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGINT) is sigint
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_run_stopped_by_max_iterations_is_not_started_over_without_asking(stopped, capsys):
    recipe, run_dir = stopped
    before = _snapshot(run_dir)
    _fails_in_one_line(["train", str(recipe), "--no-progress", "teacher.train.max_iterations=4"], capsys,
                       "iteration 4 of 8", "--resume", "--force")
    assert _snapshot(run_dir) == before


@pytest.mark.parametrize("prepare", ["nothing", "empty_folder"])
def test_resume_without_a_checkpoint_says_it_starts_fresh(tmp_path, caplog, prepare):
    recipe = _recipe(tmp_path)
    if prepare == "empty_folder":
        (tmp_path / "out" / "teacher" / "checkpoints").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="ddkit.train"):
        assert main(["train", str(recipe), "--resume", "--no-progress"]) == 0
    last = tmp_path / "out" / "teacher" / "checkpoints" / "last.pt"
    assert f"no checkpoint {last}; starting fresh" in caplog.text
    assert (tmp_path / "out" / "teacher" / "model.pt").is_file()


@pytest.mark.parametrize("resume", [False, True])
def test_stale_temp_files_are_removed_on_start(stopped, resume):
    recipe, run_dir = stopped
    ckpts = run_dir / "checkpoints"
    (ckpts / ".last.pt.k1ll3d_0.tmp").write_bytes(b"")  # mkstemp's names: 8 characters of [a-z0-9_]
    (ckpts / ".last.pt.h4lfz1p_.tmp").write_bytes(b"PK\x03\x04 half a zip")
    args = ["train", str(recipe), "--no-progress"] + (["--resume"] if resume else ["--force"])
    assert main(args) == 0
    assert not list(ckpts.glob(".*.tmp")) and (ckpts / "last.pt").is_file()


# ---------------------------------------------------------------------------------------- unreadable checkpoints
def test_truncated_resume_checkpoint_is_one_line(stopped, capsys):
    recipe, run_dir = stopped
    last = run_dir / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:300])
    before = _snapshot(run_dir)
    _fails_in_one_line(["train", str(recipe), "--resume", "--no-progress"], capsys, str(last), "truncated",
                       "--force")
    assert _snapshot(run_dir) == before


@pytest.mark.parametrize("content", ["pickled_object", "plain_state_dict", "text"])
def test_a_teacher_file_that_is_not_a_ddkit_checkpoint_is_one_line(tmp_path, capsys, content):
    recipe = _recipe(tmp_path)
    bad = tmp_path / "teacher.pt"
    if content == "pickled_object":
        torch.save({"where": pathlib.PurePosixPath("/x")}, bad)  # a global that weights-only loading refuses
    elif content == "plain_state_dict":
        torch.save(torch.nn.Linear(2, 2).state_dict(), bad)
    else:
        bad.write_text("not a checkpoint\n")
    assert main(["train", str(recipe), "--no-progress", "teacher.train.iterations=2"]) == 0
    snapshot = _snapshot(tmp_path / "out")
    _fails_in_one_line(["train", str(recipe), "--stage", "student", "--no-progress", f"student.teacher={bad}"],
                       capsys, str(bad), "model.pt")
    assert _snapshot(tmp_path / "out") == snapshot
