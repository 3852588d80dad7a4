"""``ddkit run`` never reports a degenerate outcome as a success, and a failed command changes nothing it had
finished."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ddkit.cli import main
from ddkit.config import load_config
from ddkit.engine.run import run_recipe
from ddkit.errors import DegenerateResultError

from test_run import RECIPE


def _recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(RECIPE.format(out=tmp_path / "out"))
    return path


def test_zero_pseudo_labels_stop_the_run_and_say_so(tmp_path):
    path = _recipe(tmp_path)
    # no class probability reaches 1.0: nothing is selected
    cfg = load_config(path, ["label.selector={name: score_threshold, threshold: 1.0}", "kd=null",
                             "evaluate.tta=false"])
    with pytest.raises(DegenerateResultError) as err:
        run_recipe(cfg, source=str(path), progress=False)
    assert "selected 0 pseudo-labels" in str(err.value)
    out = tmp_path / "out"
    assert not (out / "student" / "stage.json").exists()  # no student row pretends to be distilled
    summary = json.loads((out / "results.json").read_text())
    assert "0 pseudo-labels" in summary["stopped"]
    assert [r["stage"] for r in summary["rows"]] == ["teacher"]
    assert (out / "results.md").read_text().startswith("**STOPPED, not a result:**")
    assert "this is not a result" in (out / "report.html").read_text()


def test_a_bad_override_leaves_a_finished_run_folder_untouched(tmp_path, capsys):
    path = _recipe(tmp_path)
    out = tmp_path / "out"
    assert main(["run", str(path), "kd=null", "evaluate.tta=false", "baselines.fully_labeled=false",
                 "--no-progress"]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for bad in ("teacher.train.lr=-1", "label.selector.name=count_mach", "run.sed=3", "run.device=gpu"):
        assert main(["run", str(path), "kd=null", "evaluate.tta=false", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "Traceback" not in err, err
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
