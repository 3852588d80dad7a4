"""One command at a time per run folder (``.ddkit.lock``, :mod:`ddkit.engine.run_lock`): a second ``ddkit run``,
``train`` or ``label`` on a folder in use is refused in one line and writes nothing; the lock is taken only once the
recipe is validated; ``--shard`` workers share it. Once it is held, the temporary files of writers killed mid-write
are removed under the folder, and nothing else."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from ddkit.cli import main
from ddkit.engine.run_lock import LOCK_NAME, run_lock
from ddkit.io import atomic_write_text, is_atomic_temp

from test_label_cli import recipe as label_recipe, teacher  # noqa: F401 (a fixture)
from test_run_integrity import _recipe as run_recipe_file
from test_trainer_integrity import _fails_in_one_line, _recipe, _snapshot

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)

OTHER = "ddkit run other.yaml run.out_dir=there"  # how the holding command names itself
STALE = [".config.yaml.x1y2z3_a.tmp", "checkpoints/.last.pt.k1ll3d_0.tmp", "sub/.model.pt.abcdefgh.tmp"]
USER = ["notes.tmp", ".notes.tmp", ".a.b.short.tmp", "config.yaml.abcdefgh.tmp", ".x.abcdefgh.tmp.bak",
        ".x.ABCDEFGH.tmp"]


def _refused(args: list[str], capsys, folder: Path) -> str:
    return _fails_in_one_line(args, capsys, f"{folder} is in use by another ddkit command", f"pid {os.getpid()}",
                              f"on {socket.gethostname()}", "started 20", OTHER, "wait for it to finish",
                              "another run.out_dir")


def _plant(folder: Path, names: list[str]) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("x")


# ------------------------------------------------------------------------------------------------------ train
def test_train_is_refused_while_another_command_writes_its_folder(tmp_path, capsys):
    """A stage stopped at iteration 4, its folder held by another command: neither a plain re-run (which would
    call the other's checkpoint an interrupted run) nor --resume (which would continue it) touches it; after the
    other ends, --resume finishes it."""
    recipe = _recipe(tmp_path)
    assert main(["train", str(recipe), "--no-progress", "teacher.train.max_iterations=4"]) == 0
    run_dir = tmp_path / "out" / "teacher"
    with run_lock(run_dir, command=OTHER):
        before = _snapshot(tmp_path / "out")
        for extra in ([], ["--resume"], ["--force"]):
            _refused(["train", str(recipe), "--no-progress", *extra], capsys, run_dir)
        assert _snapshot(tmp_path / "out") == before
    assert main(["train", str(recipe), "--no-progress", "--resume"]) == 0
    assert (run_dir / "model.pt").is_file()
    assert f'"pid": {os.getpid()}' in (run_dir / LOCK_NAME).read_text()  # the last holder said who it was


def test_a_fresh_folder_gets_nothing_before_the_recipe_is_valid(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    assert main(["train", str(recipe), "--no-progress", "teacher.train.lr=-1"]) == 2
    assert main(["train", str(recipe), "--no-progress", "data.dataset.name=nope"]) == 2
    assert not (tmp_path / "out").exists()
    run_dir = tmp_path / "out" / "teacher"
    with run_lock(run_dir, command=OTHER):
        _refused(["train", str(recipe), "--no-progress"], capsys, run_dir)
        assert [p.name for p in run_dir.iterdir()] == [LOCK_NAME]  # the holder's file, nothing of the refused


def test_the_lock_covers_the_run_folder_above_and_the_stage_folders_below(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    out = tmp_path / "out"
    with run_lock(out, command=OTHER):  # `ddkit run` writes <out>: `ddkit train` may not write <out>/teacher
        err = _fails_in_one_line(["train", str(recipe), "--no-progress"], capsys, OTHER, f"the folder {out}")
        assert "is in use by another ddkit command" in err
    assert not (out / "teacher").exists()
    path = run_recipe_file(tmp_path)
    with run_lock(out / "teacher", command=OTHER):  # `ddkit train` writes <out>/teacher: `ddkit run` may not
        before = _snapshot(out)
        _fails_in_one_line(["run", str(path), "--no-progress"], capsys, f"{out} is in use", OTHER,
                           f"its folder {out / 'teacher'}")
        assert _snapshot(out) == before


def test_train_removes_the_stale_temp_files_under_its_stage_folder_and_nothing_else(tmp_path):
    recipe = _recipe(tmp_path)
    assert main(["train", str(recipe), "--no-progress", "teacher.train.max_iterations=4"]) == 0
    run_dir = tmp_path / "out" / "teacher"
    _plant(run_dir, STALE + USER)
    _plant(tmp_path / "out", [".config.yaml.x1y2z3_a.tmp"])  # outside the stage folder: not this command's
    assert main(["train", str(recipe), "--no-progress", "--resume"]) == 0
    assert not [p for p in run_dir.rglob("*") if is_atomic_temp(p.name)]
    assert all((run_dir / name).is_file() for name in USER)
    assert (tmp_path / "out" / ".config.yaml.x1y2z3_a.tmp").is_file()


# -------------------------------------------------------------------------------------------------------- run
def test_run_is_refused_while_held_and_cleans_stale_temp_files_once_it_holds_the_folder(tmp_path, capsys):
    path = run_recipe_file(tmp_path)
    out = tmp_path / "out"
    cheap = ["kd=null", "evaluate.tta=false", "baselines.fully_labeled=false", "--no-progress"]
    assert main(["run", str(path), *cheap]) == 0
    _plant(out, STALE + USER)
    _plant(out / "label", [".pseudo_labels.json.qq11zz_9.tmp", "shards/.shard-00000-of-00001.pt.a1b2c3d4.tmp"])
    _plant(out / "teacher", [".model.pt.yy22xx_8.tmp"])
    with run_lock(out, command=OTHER):
        before = _snapshot(out)
        _refused(["run", str(path), *cheap], capsys, out)
        assert _snapshot(out) == before
    assert main(["run", str(path), *cheap]) == 0  # every stage done earlier: skipped
    assert not [p for p in out.rglob("*") if is_atomic_temp(p.name)]
    assert all((out / name).is_file() for name in USER)


# ------------------------------------------------------------------------------------------------------ label
def test_label_is_refused_while_held_shard_workers_share_it_and_stale_temp_files_go(tmp_path, teacher, capsys):
    path = label_recipe(tmp_path, teacher)
    folder = tmp_path / "run" / "label"
    with run_lock(folder, command=OTHER):
        _refused(["label", str(path), "--no-progress"], capsys, folder)
        _refused(["label", str(path), "--no-progress", "--shard", "0/2"], capsys, folder)
        assert [p.name for p in folder.iterdir()] == [LOCK_NAME]
    with run_lock(folder, shared=True, command=OTHER):  # a `--shard 1/2` worker labelling beside this one
        _refused(["label", str(path), "--no-progress"], capsys, folder)  # the whole stage must wait
        assert main(["label", str(path), "--no-progress", "--shard", "0/2"]) == 0
        _plant(folder, ["shards/.shard-00000-of-00002.pt.w0rk3r_1.tmp"])  # the other worker's, being written
        assert main(["label", str(path), "--no-progress", "--shard", "0/2"]) == 0
        assert (folder / "shards/.shard-00000-of-00002.pt.w0rk3r_1.tmp").is_file()  # shared: none removed
    _plant(folder, [".pseudo_labels.json.abc12345.tmp", "notes.tmp", ".notes.tmp"])
    assert main(["label", str(path), "--no-progress"]) == 0
    assert (folder / "pseudo_labels.json").is_file()
    assert not [p for p in folder.rglob("*") if is_atomic_temp(p.name)]
    assert (folder / "notes.tmp").is_file() and (folder / ".notes.tmp").is_file()


# ---------------------------------------------------------------------------------------------- the temp names
def test_the_temp_name_pattern_is_the_atomic_writers_own(tmp_path, monkeypatch):
    """The name matched is the very name ``ddkit.io`` writes to (seen mid-write), and no user's name."""
    seen = []
    real = os.replace

    def replace(src, dst):
        seen.append(Path(src).name)
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    atomic_write_text(tmp_path / "pseudo_labels.json", "{}")
    atomic_write_text(tmp_path / ".hidden.yaml", "a: 1")
    assert len(seen) == 2 and all(is_atomic_temp(n) for n in seen), seen
    assert not any(is_atomic_temp(n) for n in USER)


def test_a_second_acquire_in_one_process_is_refused_and_release_frees_it(tmp_path):
    from ddkit.errors import ConfigError

    with run_lock(tmp_path / "f", command=OTHER):
        with pytest.raises(ConfigError, match="in use by another ddkit command"):
            with run_lock(tmp_path / "f"):
                pass
    with run_lock(tmp_path / "f"):
        pass
