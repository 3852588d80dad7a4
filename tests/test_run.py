"""``ddkit run``: stages in order, skipped when complete, redone with --force or when their inputs change."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddkit import ConfigError
from ddkit.config import load_config
from ddkit.engine.run import Runner, run_recipe
from ddkit.engine.run_folder import read_marker

RECIPE = """
run: {{name: tiny, out_dir: "{out}", seed: 0, device: cpu}}
task: {{name: classification}}
data:
  dataset: {{name: digits}}
  split: {{labeled: 0.1, unlabeled: 0.5, test: 0.2, seed: 0}}
teacher:
  model: {{name: mlp, hidden: [32]}}
  train: {{iterations: 40, batch_size: 32, lr: 0.1, log_every: 20}}
label:
  transforms: [{{name: identity}}, {{name: translate, shifts: [[1, 0], [-1, 0]]}}]
  aggregator: {{name: prob_mean}}
  selector: {{name: count_match}}
  batch_size: 64
student:
  model: {{name: mlp, hidden: [32]}}
  train: {{iterations: 40, batch_size: 32, lr: 0.1, ratio: [6, 4], log_every: 20}}
baselines: {{labeled_only: true, fully_labeled: true}}
kd:
  variants:
    alone: {{losses: [{{name: hard_label}}]}}
    soft: {{losses: [{{name: hard_label}}, {{name: soft_target, temperature: 2.0}}]}}
evaluate: {{tta: true}}
"""


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("run")
    path = tmp / "tiny.yaml"
    path.write_text(RECIPE.format(out=tmp / "out"))
    return path


@pytest.fixture(scope="module")
def first_run(recipe):
    return run_recipe(load_config(recipe), source=str(recipe), progress=False)


def test_every_stage_runs_and_writes_its_artifacts(first_run, recipe):
    out = Path(first_run["run_dir"])
    stages = ["teacher", "label", "student", "baseline_labeled", "baseline_full", "kd_alone", "kd_soft",
              "tta_teacher", "tta_student"]
    for stage in stages:
        assert (out / stage / "stage.json").is_file(), stage
    assert (out / "config.yaml").is_file() and (out / "report.html").is_file()
    env = json.loads((out / "environment.json").read_text())  # what it ran on, beside the recipe
    assert env["packages"]["torch"] == torch.__version__.split("+")[0] and env["strategies"]["models.mlp"].startswith("ddkit ")
    assert json.loads((out / "results.json").read_text()) == first_run
    rows = {r["stage"]: r for r in first_run["rows"]}
    assert set(rows) >= {"teacher", "student", "baseline_labeled", "baseline_full", "kd_alone", "kd_soft"}
    for r in rows.values():
        assert 0 <= r["error %"] <= 100 and abs(r["error %"] + r["accuracy %"] - 100) < 0.02
    base, dd, full = (rows[s]["error %"] for s in ("baseline_labeled", "student", "baseline_full"))
    if full < base:
        assert first_run["gap_closed"] == pytest.approx((base - dd) / (base - full), abs=1e-3)
    else:  # nothing to close: no share of it is reported
        assert "gap_closed" not in first_run
    # the baseline is the teacher's training (same model, same schedule): reused, not repeated
    assert rows["baseline_labeled"]["error %"] == rows["teacher"]["error %"]
    # test-time augmentation is reported beside the single view, from the tta stage's quality report
    tta = json.loads((out / "tta_student" / "stage.json").read_text())["result"]
    assert rows["student"]["accuracy TTA"] == round(100 * tta["ensemble"]["accuracy"], 2)
    assert rows["student"]["accuracy 1 view"] == round(100 * tta["single"]["accuracy"], 2)
    assert rows["baseline_labeled"]["accuracy TTA"] == rows["teacher"]["accuracy TTA"]
    # the student trained on labeled + pseudo-labeled data read back from the label stage
    pseudo = json.loads((out / "label" / "pseudo_labels.json").read_text())
    assert pseudo and (out / "student" / "model.pt").is_file()


def test_rerun_skips_complete_stages(first_run, recipe, capsys):
    out = Path(first_run["run_dir"])
    mtime = (out / "student" / "model.pt").stat().st_mtime_ns
    again = run_recipe(load_config(recipe), source=str(recipe), progress=False)
    printed = capsys.readouterr().out
    stages = len(list(out.glob("*/stage.json")))
    assert stages == 13  # 7 trainings/labellings, the select stage + a tta evaluation of each of the 5 distinct models
    assert not (out / "tta_baseline_labeled").exists()  # the baseline is the teacher: evaluated once
    assert printed.count("done earlier, skipped") == stages and "running" not in printed
    assert (out / "student" / "model.pt").stat().st_mtime_ns == mtime
    assert again["rows"] == first_run["rows"]


def test_force_redoes_a_stage_and_what_follows(first_run, recipe, capsys):
    out = Path(first_run["run_dir"])
    teacher_mtime = (out / "teacher" / "model.pt").stat().st_mtime_ns
    again = run_recipe(load_config(recipe), source=str(recipe), force=["baseline_full"], progress=False)
    printed = capsys.readouterr().out
    assert "baseline_full: running" in printed and "kd_alone: running" in printed
    assert "teacher: done earlier" in printed and "student: done earlier" in printed
    assert (out / "teacher" / "model.pt").stat().st_mtime_ns == teacher_mtime
    # same seed, same data: the redone stage reproduces its result
    assert {r["stage"]: r for r in again["rows"]}["baseline_full"] == \
        {r["stage"]: r for r in first_run["rows"]}["baseline_full"]


def test_logging_and_checkpoint_cadence_redo_nothing(first_run, recipe, capsys):
    """The keys `ddkit train --resume` accepts as harmless do not change what a stage produces: no stage re-runs."""
    cfg = load_config(recipe, ["teacher.train.log_every=7", "student.train.checkpoint_every=3",
                               "student.train.eval_every=5", "label.num_workers=0"])
    run_recipe(cfg, source=str(recipe), progress=False)
    printed = capsys.readouterr().out
    assert "running" not in printed and "teacher: done earlier" in printed and "label: done earlier" in printed


@pytest.mark.parametrize("deleted", ["student/model.pt", "label/pseudo_labels.json"])
def test_a_deleted_output_file_redoes_its_stage(first_run, recipe, capsys, deleted):
    """A stage whose model / pseudo-label file was deleted is not "done": it runs again, to the same result."""
    out = Path(first_run["run_dir"])
    (out / deleted).unlink()
    again = run_recipe(load_config(recipe), source=str(recipe), progress=False)
    printed = capsys.readouterr().out
    stage = deleted.split("/")[0]
    assert f"{stage}: running" in printed and "teacher: done earlier" in printed
    assert (out / deleted).is_file() and again["rows"] == first_run["rows"]


@pytest.mark.parametrize("base, full, student, gap", [(0.2, 0.1, 0.15, 0.5), (0.1, 0.2, 0.3, None),
                                                       (0.1, 0.1, 0.05, None)])
def test_gap_closed_is_reported_only_when_the_fully_labeled_model_is_better(recipe, base, full, student, gap):
    """A fully labeled model worse than the baseline leaves no gap: a student worse than both once read as closing
    a large share of it (the ratio of two negative numbers)."""
    runner = Runner(load_config(recipe), source=str(recipe), progress=False)
    runner.results = {s: {"metrics": {"error": e, "accuracy": 1 - e}}
                      for s, e in (("baseline_labeled", base), ("student", student), ("baseline_full", full))}
    summary = runner.summarize()
    assert summary.get("gap_closed") == gap
    assert (gap is None) == any("no gap for data distillation to close" in w for w in summary.get("warnings", []))
    two = Runner(load_config(recipe, ["rounds=2"]), source=str(recipe), progress=False)
    two.results = {**runner.results, "student_r2": {"metrics": {"error": 0.12, "accuracy": 0.88}}}
    summary = two.summarize()  # the headline is the last round's student; each round is listed
    assert summary.get("gap_closed") == (None if gap is None else 0.8)
    assert summary.get("gap_closed_by_round") == (None if gap is None else {"student": gap, "student_r2": 0.8})


def test_a_null_kd_variant_is_dropped(first_run, recipe, capsys):
    """``kd.variants.soft: null`` removes that variant (it trained a hard-label student named after it)."""
    summary = run_recipe(load_config(recipe, ["kd.variants.soft=null"]), source=str(recipe), progress=False)
    stages = {r["stage"] for r in summary["rows"]}
    assert "kd_soft" not in stages and "kd_alone" in stages
    assert "kd_soft" not in capsys.readouterr().out


def test_changed_inputs_redo_only_the_stages_that_read_them(first_run, recipe, capsys):
    cfg = load_config(recipe, ["kd.variants.soft.losses.1.temperature=3.0"])
    run_recipe(cfg, source=str(recipe), progress=False)
    printed = capsys.readouterr().out
    assert "kd_soft: running" in printed and "kd_alone: done earlier" in printed  # each reads its own variant
    assert "student: done earlier" in printed and "label: done earlier" in printed
    # a TTA row reads its own model and the views: the new kd_soft model's row is redone, no other
    assert "tta_kd_soft: running" in printed
    for stage in ("tta_teacher", "tta_student", "tta_baseline_full", "tta_kd_alone"):
        assert f"{stage}: done earlier" in printed, stage


def test_a_tta_row_is_redone_when_its_views_change_not_the_selection(first_run, recipe, capsys):
    run_recipe(load_config(recipe), source=str(recipe), progress=False)  # whatever earlier tests changed, settled
    capsys.readouterr()
    run_recipe(load_config(recipe, ["label.selector.keep=0.5"]), source=str(recipe), progress=False)
    printed = capsys.readouterr().out
    assert "select: running" in printed and "tta_teacher: done earlier" in printed
    run_recipe(load_config(recipe, ["label.transforms.1.shifts=[[2, 0]]"]), source=str(recipe), progress=False)
    printed = capsys.readouterr().out
    assert "tta_teacher: running" in printed and "tta_kd_alone: running" in printed


def test_a_plugins_changed_default_redoes_the_stages_it_decides(first_run, recipe, tmp_path, capsys):
    """A new version of a plugin whose default changed (here ``soft_target``'s ``weight``, which the recipe does not
    state) redoes the stages that use it and no other; a marker written before markers held the strategies'
    defaults is judged on the recipe's text alone, as it was then."""
    import dataclasses
    import shutil

    from ddkit.plugin_manager import make_plugin_manager, registry_from_plugin_manager
    from ddkit.registry import Registry

    out = tmp_path / "out"
    shutil.copytree(first_run["run_dir"], out)
    cfg = load_config(recipe, [f"run.out_dir={out}"])
    run_recipe(cfg, source=str(recipe), progress=False)  # whatever earlier tests changed in the folder, settled
    entries = registry_from_plugin_manager(make_plugin_manager()).entries()
    soft = next(e for e in entries if e.spec.kind == "losses" and e.spec.name == "soft_target")

    @dataclasses.dataclass
    class LighterSoftTarget(soft.spec.params):
        weight: float = 0.5

    upgraded = Registry(dataclasses.replace(e, spec=dataclasses.replace(e.spec, params=LighterSoftTarget))
                        if e is soft else e for e in entries)
    capsys.readouterr()
    run_recipe(cfg, source=str(recipe), progress=False, registry=upgraded)
    printed = capsys.readouterr().out
    assert "kd_soft: running" in printed
    for stage in ("teacher", "label", "student", "baseline_full", "kd_alone"):
        assert f"{stage}: done earlier" in printed, stage
    marker = out / "kd_soft" / "stage.json"
    record = read_marker(marker)
    assert set(record) >= {"inputs", "defaults"}
    del record["defaults"]  # as an older ddkit wrote it
    marker.write_text(json.dumps(record))
    run_recipe(cfg, source=str(recipe), progress=False)
    assert "kd_soft: done earlier" in capsys.readouterr().out


def test_a_trained_teacher_is_used_as_it_is(first_run, recipe, tmp_path, capsys):
    """``teacher.checkpoint``: no teacher training, the file is evaluated for the table and teaches the rest."""
    teacher = Path(first_run["run_dir"]) / "teacher" / "model.pt"
    cfg = load_config(recipe, [f"run.out_dir={tmp_path}", f"teacher.checkpoint={teacher}"])
    summary = run_recipe(cfg, source=str(recipe), progress=False)
    rows = {r["stage"]: r for r in summary["rows"]}
    assert rows["teacher"]["error %"] == {r["stage"]: r for r in first_run["rows"]}["teacher"]["error %"]
    assert rows["teacher"]["iterations"] == 0 and not (tmp_path / "teacher" / "model.pt").exists()
    # a teacher from elsewhere is not the labeled-only baseline, though its recipe block is the student's model:
    # the baseline trains the student's model on the labeled part with the student's schedule, and the gap uses it
    assert rows["baseline_labeled"]["iterations"] == 40 and (tmp_path / "baseline_labeled" / "model.pt").is_file()
    assert "same_as" not in read_marker(tmp_path / "baseline_labeled" / "stage.json")["result"]
    assert (tmp_path / "tta_baseline_labeled" / "stage.json").is_file()
    base, dd, full = (rows[s]["error %"] for s in ("baseline_labeled", "student", "baseline_full"))
    assert summary.get("gap_closed") == (round((base - dd) / (base - full), 3) if full < base else None)
    label = json.loads((tmp_path / "label" / "stage.json").read_text())["result"]
    assert Path(label["teacher"]) == teacher.resolve()
    # the same file named by a relative path is the same teacher: nothing is redone (or deleted)
    capsys.readouterr()
    run_recipe(load_config(recipe, [f"run.out_dir={tmp_path}", f"teacher.checkpoint={os.path.relpath(teacher)}"]),
               source=str(recipe), progress=False)
    printed = capsys.readouterr().out
    assert "running" not in printed and "label: done earlier" in printed
    with pytest.raises(ConfigError, match="teacher.checkpoint 'nope.pt' is not a file"):
        run_recipe(load_config(recipe, [f"run.out_dir={tmp_path / 'b'}", "teacher.checkpoint=nope.pt"]),
                   source=str(recipe), progress=False)
    assert not (tmp_path / "b").exists()  # refused before anything is written
    with pytest.raises(ConfigError, match="lies in this run's own teacher folder"):  # it would be deleted
        Runner(load_config(recipe, [f"teacher.checkpoint={teacher}"]), source=str(recipe))
    assert teacher.is_file()


@pytest.mark.parametrize("force", [[], ["--force", "teacher"], ["--force", "label", "--force", "student"]])
def test_an_interrupted_run_says_how_to_resume_without_losing_work(recipe, tmp_path, monkeypatch, capsys, force):
    """Ctrl-C: re-running the same command resumes, unless it had --force, which would start the forced stages
    over (deleting their shards or checkpoints): then the advice is to re-run it without --force."""
    from ddkit.cli import main

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Runner, "_train_teacher", interrupted)
    assert main(["run", str(recipe), f"run.out_dir={tmp_path}", "--no-progress", *force]) == 130
    err = capsys.readouterr().err
    assert "ddkit run: interrupted; re-run" in err and "finished stages are skipped" in err
    if force:
        assert f"re-run it without {' '.join(force)} to resume" in err and "the same command" not in err
    else:
        assert "re-run the same command to resume" in err


def test_bad_recipes_fail_before_any_work(tmp_path, recipe):
    with pytest.raises(ConfigError, match="--force 'studnet': no such stage"):
        Runner(load_config(recipe), force=["studnet"])
    with pytest.raises(ConfigError, match="baselines: unknown key 'labelled_only'"):
        Runner(load_config(recipe, ["baselines.labelled_only=true"]))
    with pytest.raises(ConfigError, match="unknown key 'iters'"):
        Runner(load_config(recipe, ["student.train.iters=3"]))
    dotted = load_config(recipe)
    dotted.kd.variants["soft.2"] = {"losses": [{"name": "hard_label"}]}
    with pytest.raises(ConfigError, match="the name 'soft.2' has a '.'"):
        Runner(dotted)


@pytest.mark.parametrize("override, message", [
    ("label.images={tmp}/none", r"label.images: .*none is not a folder"),
    ("label.images={tmp}", r"label: nothing to label, .* holds no images"),
    ("student.train.ratio=[6]", r"student.train.ratio \[6\] needs an entry for each of the student's two sources"),
    ("student.train.ratio=[6, 0]", r"student.train.ratio \[6, 0\] never samples the pseudo-labels"),
    ("student.model={{name: timm, model_name: resnt18}}", r"student.model: unknown timm model 'resnt18'"),
    ("teacher.model={{name: timm, model_name: resnt18}}", r"teacher.model: unknown timm model 'resnt18'"),
    ("kd.variants.soft.model={{name: timm, model_name: resnt18}}",
     r"kd.variants.soft.model: unknown timm model 'resnt18'"),
    ("label.aggregator.name=wbf", r"label.aggregator: 'wbf' ensembles instances, but the task 'classification' "
                                  r"predicts probs; use one of: .*prob_mean"),
    ("label.aggregator.name=heatmap_mean", r"label.aggregator: 'heatmap_mean' ensembles heatmaps"),
    ("label.format=yolo", r"label.format='yolo': a YOLO dataset holds boxes; probs pseudo-labels are one label"),
    ("evaluate.aggregator={{name: wbf}}", r"evaluate.aggregator: 'wbf' ensembles instances"),
    ("student.losses=[{{name: hard_label}}, {{name: hint, teacher_layer: '1', student_layer: blocks.9}}]",
     r"student.losses\[1\]: hint student_layer: student has no module 'blocks.9'; closest: "),
    ("kd.variants.soft.losses=[{{name: hint, teacher_layer: '9', student_layer: '1'}}]",
     r"kd.variants.soft.losses\[0\]: hint teacher_layer: teacher has no module '9'"),
])
def test_what_a_later_stage_reads_is_checked_before_anything_is_written(tmp_path, recipe, override, message):
    """The teacher would train for nothing: the unlabeled images, the mixing ratio and the models are checked
    first, and the run folder is not created."""
    out = tmp_path / "out"
    cfg = load_config(recipe, [f"run.out_dir={out}", override.format(tmp=tmp_path)])
    with pytest.raises(ConfigError, match=message):
        Runner(cfg)
    assert not out.exists()


def test_a_strategy_that_does_not_fit_the_task_stops_the_cli_in_one_line(tmp_path, recipe, capsys):
    from ddkit.cli import main

    out = tmp_path / "out"
    assert main(["run", str(recipe), f"run.out_dir={out}", "label.aggregator.name=wbf", "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "label.aggregator: 'wbf' ensembles instances" in captured.err
    assert "[ddkit run]" not in captured.out and not out.exists()


def test_a_hint_layer_missing_from_a_given_teacher_checkpoint_is_found_first(first_run, recipe, tmp_path):
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes((Path(first_run["run_dir"]) / "teacher" / "model.pt").read_bytes())
    out = tmp_path / "out"
    cfg = load_config(recipe, [f"run.out_dir={out}", f"teacher.checkpoint={teacher}",
                               "kd.variants.soft.losses=[{name: hint, teacher_layer: layer9, student_layer: '1'}]"])
    with pytest.raises(ConfigError, match=r"kd.variants.soft.losses\[0\]: hint teacher_layer: teacher has no "
                                          r"module 'layer9'"):
        Runner(cfg)
    assert not out.exists()


@pytest.mark.parametrize("overrides, words", [
    (["kd.variants.soft.losses=[{name: hint, teacher_layer: '1', student_layer: '1', distance: channel_kl}]"],
     r"kd.variants.soft.losses\[0\]: hint: distance channel_kl needs \[B, C, H, W\] maps; student layer '1'"),
    (["kd.variants.soft.train={teacher_cache: true, translate: 1}"],
     r"kd.variants.soft.train: train.teacher_cache is only valid without random augmentation"),
])
def test_loss_terms_that_do_not_fit_are_refused_before_anything_is_written(recipe, tmp_path, overrides, words):
    """Shapes a term learns only from a forward (its setup on a dry batch) and a teacher cache beside random
    augmentation: refused when the recipe is checked, not after the teacher and the earlier variants trained."""
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=words):
        Runner(load_config(recipe, [f"run.out_dir={out}", *overrides]))
    assert not out.exists()


def test_cli_prints_the_results_table(first_run, recipe):
    proc = subprocess.run([sys.executable, "-m", "ddkit", "run", str(recipe), "--no-progress"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "| model | error % |" in proc.stdout and "student (data distillation)" in proc.stdout


def test_rounds_the_student_labels_for_the_next_round(first_run, recipe, capsys):
    """``rounds: 2``: round 1 is reused; the round-1 student labels the unlabeled part for a second student."""
    out = Path(first_run["run_dir"])
    summary = run_recipe(load_config(recipe, ["rounds=2"]), source=str(recipe), progress=False)
    printed = capsys.readouterr().out
    assert "label: done earlier" in printed and "student: done earlier" in printed
    assert "label_r2: running" in printed and "student_r2: running" in printed
    label_r2 = json.loads((out / "label_r2" / "stage.json").read_text())["result"]
    assert Path(label_r2["teacher"]) == out / "student" / "model.pt"  # labelled by the round-1 student
    pseudo_r1 = json.loads((out / "label" / "pseudo_labels.json").read_text())
    pseudo_r2 = json.loads(Path(label_r2["pseudo_labels"]).read_text())
    assert pseudo_r2["info"]["teacher_sha256"] != pseudo_r1["info"]["teacher_sha256"]
    rows = {r["stage"]: r for r in summary["rows"]}
    assert rows["student"]["model"] == "student round 1" and rows["student_r2"]["model"] == "student round 2"
    base, full, r1, r2 = (rows[s]["error %"] for s in ("baseline_labeled", "baseline_full", "student", "student_r2"))
    if full < base:  # the headline is the last round's student; each round is listed (also tested below)
        assert summary["gap_closed"] == pytest.approx((base - r2) / (base - full), abs=1e-3)
        assert summary["gap_closed_by_round"]["student"] == pytest.approx((base - r1) / (base - full), abs=1e-3)
    with pytest.raises(ConfigError, match="rounds must be an integer >= 1, got 0"):
        Runner(load_config(recipe, ["rounds=0"]))


def test_teacher_ensemble_trains_more_teachers_and_labels_with_all(first_run, recipe, tmp_path, capsys):
    """``teacher.ensemble: 2``: a second teacher at another seed; both label; the stages that read one teacher
    (the first teacher, the baselines, KD) are re-used, not redone."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(first_run["run_dir"], out)
    capsys.readouterr()
    summary = run_recipe(load_config(recipe, [f"run.out_dir={out}", "teacher.ensemble=2"]), source=str(recipe),
                         progress=False)
    printed = capsys.readouterr().out
    for stage in ("teacher", "baseline_full", "kd_alone", "tta_teacher"):
        assert f"{stage}: done earlier" in printed, stage
    for stage in ("teacher_2", "label", "student", "tta_teacher_2"):
        assert f"{stage}: running" in printed, stage
    first, second = (torch.load(out / s / "model.pt", weights_only=True)["model"] for s in ("teacher", "teacher_2"))
    assert any(not torch.equal(first[k], second[k]) for k in first)  # another seed: another model
    label = json.loads((out / "label" / "stage.json").read_text())["result"]
    models = [read_marker(out / s / "stage.json")["result"]["model"] for s in ("teacher", "teacher_2")]
    # the copied folder's own teachers, not those of the run it was copied from
    assert label["teacher"] == models == [str(out.resolve() / s / "model.pt") for s in ("teacher", "teacher_2")]
    info = json.loads((out / "label" / "pseudo_labels.json").read_text())["info"]
    assert info["teacher_checkpoint"] == label["teacher"]
    rows = {r["stage"]: r for r in summary["rows"]}
    assert rows["teacher_2"]["model"] == "teacher 2 (ensemble)"
    assert rows["baseline_labeled"]["error %"] == rows["teacher"]["error %"]  # the baseline is the first teacher
    with pytest.raises(ConfigError, match="teacher.ensemble must be an integer >= 1 \\(the number of teachers\\)"):
        Runner(load_config(recipe, ["teacher.ensemble=0"]))
    with pytest.raises(ConfigError, match="teacher.ensemble: 2 teachers are trained by the run; remove teacher"):
        Runner(load_config(recipe, ["teacher.ensemble=2", f"teacher.checkpoint={out / 'teacher' / 'model.pt'}"]))
    with pytest.raises(ConfigError, match=r"teacher.ensemble: 2 teachers used as built from the same weights \(train"
                                          r"\.iterations: 0\) are one model; set ensemble: 1"):
        Runner(load_config(recipe, ["teacher.ensemble=2", "teacher.train.iterations=0"]))


def test_stale_stages_are_removed_before_anything_runs(recipe, tmp_path, monkeypatch, capsys):
    """A changed teacher makes every later stage stale: its outputs go before the teacher retrains, so a run
    interrupted then leaves no old student for export / predict, nor an old results table."""
    from ddkit.engine.run_folder import completed_stages

    small = ["baselines.labeled_only=false", "baselines.fully_labeled=false", "kd=null", "evaluate=null"]
    run_recipe(load_config(recipe, [f"run.out_dir={tmp_path}", *small]), source=str(recipe), progress=False)
    assert {"teacher", "label", "select", "student"} <= set(completed_stages(tmp_path))
    assert (tmp_path / "results.md").is_file()

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Runner, "_train_teacher", interrupted)
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        run_recipe(load_config(recipe, [f"run.out_dir={tmp_path}", *small, "teacher.train.lr=0.2"]),
                   source=str(recipe), progress=False)
    printed = capsys.readouterr().out
    assert "teacher, label, select, student: inputs changed, forced or an output file deleted" in printed
    assert completed_stages(tmp_path) == {}
    assert not (tmp_path / "student").exists() and not (tmp_path / "results.md").exists()
