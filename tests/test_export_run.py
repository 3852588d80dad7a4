"""``ddkit export RUN``: the folder ``ddkit run`` wrote exports its final student and says which one."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ddkit import ConfigError
from ddkit.cli import main
from ddkit.config import load_config
from ddkit.engine.checkpoint import load_model
from ddkit.engine.run import run_recipe
from ddkit.engine.run_folder import final_student, stage_model

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = """
run: {{name: tiny, out_dir: "{out}", seed: 0, device: cpu}}
task: {{name: classification}}
data:
  dataset: {{name: digits}}
  split: {{labeled: 0.1, unlabeled: 0.3, test: 0.2, seed: 0}}
teacher:
  model: {{name: mlp, hidden: [16]}}
  train: {{iterations: 20, batch_size: 32, lr: 0.1, log_every: 20}}
label:
  transforms: [{{name: identity}}]
  aggregator: {{name: prob_mean}}
  selector: {{name: count_match}}
  batch_size: 64
student:
  model: {{name: mlp, hidden: [16]}}
  train: {{iterations: 20, batch_size: 32, lr: 0.1, ratio: [6, 4], log_every: 20}}
rounds: 2
"""


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("export_run")
    recipe = tmp / "tiny.yaml"
    recipe.write_text(RECIPE.format(out=tmp / "out"))
    return Path(run_recipe(load_config(recipe), source=str(recipe), progress=False)["run_dir"])


def _same_weights(a: Path, b: Path) -> bool:
    sa, sb = load_model(a)[1].state_dict(), load_model(b)[1].state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_export_run_takes_the_last_rounds_student_and_names_it(two_rounds, capsys):
    assert main(["export", str(two_rounds)]) == 0
    printed = capsys.readouterr().out
    assert "exported the round 2 student (stage student_r2" in printed
    assert str(two_rounds / "model.pt") in printed
    assert _same_weights(two_rounds / "model.pt", two_rounds / "student_r2" / "model.pt")
    assert not _same_weights(two_rounds / "model.pt", two_rounds / "student" / "model.pt")
    record = torch.load(two_rounds / "model.pt", weights_only=True)
    assert set(record) == {"format", "task", "model_cfg", "info", "model"}
    # exporting again (RUN/model.pt now exists) still reads the run's stages, not its own output
    assert main(["export", str(two_rounds), "-o", str(two_rounds / "again.pt")]) == 0
    assert "stage student_r2" in capsys.readouterr().out


def test_export_of_a_stage_folder_or_file_is_unchanged(two_rounds, tmp_path, capsys):
    assert main(["export", str(two_rounds / "student"), "-o", str(tmp_path / "s.pt")]) == 0
    assert _same_weights(tmp_path / "s.pt", two_rounds / "student" / "model.pt")
    assert main(["export", str(two_rounds / "teacher" / "checkpoints" / "last.pt"), "-o",
                 str(tmp_path / "t.pt")]) == 0
    assert _same_weights(tmp_path / "t.pt", two_rounds / "teacher" / "model.pt")


def test_an_unfinished_later_round_is_said(two_rounds, tmp_path):
    (two_rounds / "student_r3").mkdir(exist_ok=True)  # started, no stage.json
    try:
        path, stage, note = final_student(two_rounds)
        assert stage == "student_r2" and note == "stage student_r3 is not finished"
    finally:
        (two_rounds / "student_r3").rmdir()


def _fake_stage(run: Path, stage: str) -> None:
    (run / stage).mkdir(parents=True)
    (run / stage / "stage.json").write_text(json.dumps({"stage": stage, "result": {}}))


def test_a_run_without_one_final_student_asks_for_a_stage(tmp_path, capsys):
    _fake_stage(tmp_path, "teacher")
    with pytest.raises(ConfigError, match="no finished student .*stages done: teacher.*teacher"):
        final_student(tmp_path)
    _fake_stage(tmp_path, "kd_alone")
    _fake_stage(tmp_path, "kd_soft")
    with pytest.raises(ConfigError, match=r"several KD students \(kd_alone, kd_soft\); pass one stage folder"):
        final_student(tmp_path)
    assert main(["export", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "several KD students" in err


def test_a_copied_run_folder_uses_its_own_models(tmp_path):
    """stage.json records absolute paths; a copy of the run (or a moved one) must not read the original's files."""
    import shutil

    original = tmp_path / "run"
    (original / "student").mkdir(parents=True)
    (original / "student" / "model.pt").write_bytes(b"original")
    (original / "student" / "stage.json").write_text(json.dumps(
        {"stage": "student", "result": {"model": str((original / "student" / "model.pt").resolve())}}))
    outside = tmp_path / "elsewhere" / "teacher.pt"  # teacher.checkpoint: recorded, not in the run folder
    outside.parent.mkdir()
    outside.write_bytes(b"teacher")
    (original / "teacher").mkdir()
    (original / "teacher" / "stage.json").write_text(
        json.dumps({"stage": "teacher", "result": {"model": str(outside)}}))
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    (copy / "student" / "model.pt").write_bytes(b"copy")
    assert final_student(copy)[0].read_bytes() == b"copy"
    assert stage_model(copy, "teacher") == outside


def _bytes(run: Path) -> dict:
    return {p: p.read_bytes() for p in run.rglob("*.pt")}


@pytest.mark.parametrize("src,out,text", [
    ("teacher", "student/model.pt", "is stage student's model.pt; writing over it"),
    ("student", "teacher/checkpoints/last.pt", "is stage teacher's checkpoints/last.pt"),
    ("teacher/checkpoints/last.pt", "teacher/checkpoints/last.pt", "is the checkpoint being exported"),
    ("teacher", "teacher/model.pt", "is the checkpoint being exported"),
    ("student", "teacher", "is a folder; give a file name"),
])
def test_export_never_writes_over_a_stage_model_the_input_or_a_folder(two_rounds, capsys, src, out, text):
    """pass 22 L7 / M4: `export RUN/teacher -o RUN/student/model.pt` replaced the student with the teacher; `-o
    FOLDER` was a traceback."""
    before = _bytes(two_rounds)
    assert main(["export", str(two_rounds / src), "-o", str(two_rounds / out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and text in err, err
    assert _bytes(two_rounds) == before


def test_export_of_a_stage_checkpoint_by_default_keeps_the_stage_model(two_rounds, capsys):
    model = two_rounds / "teacher" / "model.pt"
    before = model.read_bytes()
    try:
        assert main(["export", str(two_rounds / "teacher" / "checkpoints" / "last.pt")]) == 0
        assert str(two_rounds / "teacher" / "model_export.pt") in capsys.readouterr().out
        assert model.read_bytes() == before
    finally:
        (two_rounds / "teacher" / "model_export.pt").unlink(missing_ok=True)


def test_export_of_an_unfinished_checkpoint_warns_and_keeps_its_counts(two_rounds, tmp_path, capsys, caplog):
    """pass 22 M6: export turned an unfinished checkpoint into a file that eval took for a finished model."""
    record = torch.load(two_rounds / "teacher" / "checkpoints" / "last.pt", weights_only=True)
    assert record["iteration"] == record["total_iterations"] == 20
    record["iteration"] = 10  # as a `ddkit train` stopped half way leaves it
    src = tmp_path / "checkpoints" / "last.pt"
    src.parent.mkdir()
    torch.save(record, src)
    with caplog.at_level("WARNING", logger="ddkit.checkpoint"):
        assert main(["export", str(src), "-o", str(tmp_path / "x.pt")]) == 0
    assert len(caplog.records) == 1, caplog.text  # once, naming the checkpoint (not again by the verification)
    assert f"{src}: an unfinished training checkpoint (iteration 10 of 20)" in caplog.text
    out = torch.load(tmp_path / "x.pt", weights_only=True)
    assert out["iteration"] == 10 and out["total_iterations"] == 20 and "optimizer" not in out
    caplog.clear()
    with caplog.at_level("WARNING", logger="ddkit.checkpoint"):
        load_model(tmp_path / "x.pt")  # what eval / predict call: the exported file still says it
    assert "x.pt: an unfinished training checkpoint (iteration 10 of 20)" in caplog.text
