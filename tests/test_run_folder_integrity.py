"""A run folder is self-contained and says what happened to it: a copy uses its own files, a cut-short marker or
output is redone, a refused command leaves the recipe files as they were, and a teacher at chance is flagged."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from ddkit.cli import main
from ddkit.config import load_config
from ddkit.engine.run import run_recipe
from ddkit.errors import ConfigError

from test_run import RECIPE

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = ["kd=null", "evaluate.tta=false", "baselines.fully_labeled=false", "baselines.labeled_only=false"]


def _run(tmp_path: Path, out: str, *overrides: str) -> dict:
    path = tmp_path / "tiny.yaml"
    path.write_text(RECIPE.format(out=tmp_path / out))
    return run_recipe(load_config(path, [*SMALL, *overrides]), source=str(path), progress=False)


def _pseudo_count(path: Path) -> int:
    return len(json.loads(path.read_text())["annotations"])


def _sources(train_log: Path) -> str:
    return next(line for line in train_log.read_text().splitlines() if "sources" in line)


def test_a_copied_run_folder_trains_on_its_own_pseudo_labels(tmp_path):
    """``cp -r run copy`` then a student change in the copy: the student reads the copy's pseudo-labels, not the
    original's (whose selection changed since), and a copy whose original is gone still runs."""
    _run(tmp_path, "src", "label.selector.keep=0.5")
    shutil.copytree(tmp_path / "src", tmp_path / "copy")
    _run(tmp_path, "src", "label.selector.keep=0.9")  # the original now holds other pseudo-labels
    own = _pseudo_count(tmp_path / "copy" / "label" / "pseudo_labels.json")
    assert own != _pseudo_count(tmp_path / "src" / "label" / "pseudo_labels.json")
    _run(tmp_path, "copy", "label.selector.keep=0.5", "student.train.iterations=41")
    assert f"[{len(_labeled(tmp_path))}, {own}]" in _sources(tmp_path / "copy" / "student" / "train.log")
    shutil.rmtree(tmp_path / "src")
    _run(tmp_path, "copy", "label.selector.keep=0.5", "student.train.iterations=42")
    marker = json.loads((tmp_path / "copy" / "student" / "stage.json").read_text())
    assert marker["run_dir"] == str((tmp_path / "copy").resolve())


def _labeled(tmp_path: Path):
    from ddkit.engine.data import build_data

    path = tmp_path / "tiny.yaml"
    return build_data(load_config(path).data).labeled


def test_a_truncated_marker_or_output_is_redone_not_a_traceback_nor_done(tmp_path, capsys):
    first = _run(tmp_path, "out")
    out = tmp_path / "out"
    (out / "student" / "stage.json").write_text('{"stage": "student", "inputs": "x')  # a copy cut short
    model = out / "teacher" / "model.pt"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    capsys.readouterr()
    again = _run(tmp_path, "out")
    printed = capsys.readouterr().out
    assert "student: its stage.json could not be read (truncated?); the stage runs again" in printed
    assert "teacher: running" in printed  # its model.pt changed size since its marker: redone, not 'done earlier'
    assert again["rows"] == first["rows"]  # the same recipe and seed: the same figures
    torch.load(model, weights_only=True)  # whole again


def test_eval_names_an_unreadable_marker(tmp_path, capsys):
    _run(tmp_path, "out")
    (tmp_path / "out" / "student" / "stage.json").write_text("{")
    assert main(["eval", str(tmp_path / "out")]) == 2
    assert "unreadable stage.json in student" in capsys.readouterr().err


def test_a_refused_run_leaves_the_recipe_files_as_they_were(tmp_path, capsys):
    """An interrupted teacher, then a command of another lr: the resume check refuses it, and config.yaml /
    environment.json still describe the recipe that trained the checkpoint."""
    path = tmp_path / "tiny.yaml"
    path.write_text(RECIPE.format(out=tmp_path / "out"))
    stop = ["teacher.train.max_iterations=20", "teacher.train.checkpoint_every=10"]
    with pytest.raises(ConfigError, match="stopped before the end of its schedule"):
        run_recipe(load_config(path, [*SMALL, *stop]), source=str(path), progress=False)
    files = {name: (tmp_path / "out" / name).read_bytes() for name in ("config.yaml", "environment.json")}
    assert main(["run", str(path), *SMALL, "teacher.train.lr=0.05", "--no-progress"]) == 2
    assert "cannot resume" in capsys.readouterr().err
    assert {name: (tmp_path / "out" / name).read_bytes() for name in files} == files


def test_an_out_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "tiny.yaml"
    path.write_text(RECIPE.format(out=tmp_path / "out"))
    (tmp_path / "afile").write_text("keep me")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        assert main(["run", str(path), f"run.out_dir={out}"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"{tmp_path / 'afile'} is a file, not a folder" in err, err
    assert (tmp_path / "afile").read_text() == "keep me"


def test_a_teacher_at_chance_is_flagged_in_the_results(tmp_path):
    summary = _run(tmp_path, "out", "teacher.train.iterations=1", "teacher.train.lr=1e-9")
    assert summary["warnings"][0].startswith("the teacher is at chance level (error % ")
    assert "**WARNING:** the teacher is at chance level" in (tmp_path / "out" / "results.md").read_text()
    trained = _run(tmp_path, "ok")
    assert not any("chance" in w for w in trained.get("warnings") or [])


def test_a_model_from_an_unfinished_checkpoint_is_said_to_be_unfinished(tmp_path, caplog):
    from ddkit.engine.checkpoint import load_model
    from ddkit.engine.train import run_train

    path = tmp_path / "tiny.yaml"
    path.write_text(RECIPE.format(out=tmp_path / "out"))
    cfg = load_config(path, ["teacher.train.max_iterations=20", "teacher.train.checkpoint_every=10"])
    run_train(cfg, "teacher", source=str(path), progress=False)
    with caplog.at_level(logging.WARNING, logger="ddkit.checkpoint"):
        load_model(tmp_path / "out" / "teacher")  # no model.pt yet: checkpoints/last.pt
    assert "an unfinished training checkpoint (iteration 20 of 40)" in caplog.text
