"""One recipe validation for every command and section, defaults written out, strategy blocks replaced when their
name changes, options anywhere on the command line, devices and plugin names checked."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from ddkit import ConfigError, get_registry
from ddkit.cli import _parse, main
from ddkit.config import load_config
from ddkit.engine.recipe import validate_recipe, with_defaults
from ddkit.engine.run import Runner
from ddkit.runtime import resolve_device

REPO = Path(__file__).resolve().parents[1]
DD = REPO / "configs" / "mnist_dd.yaml"


@pytest.mark.parametrize("override, words", [
    ("teacher.train.itrations=5", ["teacher.train", "unknown key 'itrations'", "Did you mean 'iterations'"]),
    ("student.train.lr=fast", ["student.train", "'lr' = 'fast'", "float"]),
    ("student.train.batch_size=0", ["student.train", "batch_size must be >= 1"]),
    ("run.sed=1", ["run", "unknown key 'sed'", "Did you mean 'seed'"]),
    ("label.batch_sise=8", ["label", "unknown key 'batch_sise'", "Did you mean 'batch_size'"]),
    ("baselines.fully=true", ["baselines", "unknown key 'fully'", "fully_labeled"]),
    ("evaluate.ttta=true", ["evaluate", "unknown key 'ttta'", "Did you mean 'tta'"]),
    ("kd.variants.a.los=[]", ["kd.variants.a", "unknown key 'los'", "losses"]),
    ("teacher.modle={name: mlp}", ["teacher", "unknown key 'modle'", "Did you mean 'model'"]),
    ("rounds=0", ["rounds must be an integer >= 1"]),
])
def test_config_show_and_run_reject_a_bad_key_in_any_section_with_the_same_line(override, words, capsys, tmp_path):
    assert main(["config", "show", str(DD), override]) == 2
    shown = capsys.readouterr().err.strip()
    assert "\n" not in shown and "Traceback" not in shown
    for word in words:
        assert word in shown, shown
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        Runner(load_config(DD, [override, f"run.out_dir={out}"]), source=str(DD))
    # the very same message; the command line also names the override (the Python API is given a config)
    assert str(err.value).replace(str(DD), f"{DD} with the override {override}", 1) in shown
    assert not out.exists()  # nothing written before the recipe is known good


def test_validate_recipe_accepts_every_shipped_recipe():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        validate_recipe(load_config(path), get_registry(), source=str(path))


def test_defaults_are_written_out(capsys):
    assert main(["config", "show", str(DD), "--defaults"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["teacher"]["train"]["warmup_factor"] == 0.001  # a train default the recipe does not set
    assert cfg["teacher"]["train"]["iterations"] == 1500  # the recipe's own value wins
    assert cfg["task"] == {"name": "classification", "label_smoothing": 0.1}  # the recipe's own
    assert cfg["label"]["selector"]["name"] == "count_match" and len(cfg["label"]["selector"]) > 1
    assert cfg["run"]["device"] == "auto"
    assert cfg["label"]["shard_size"] == 256 and cfg["label"]["format"] == "coco"  # the label section's own keys
    assert cfg["label"]["batch_size"] == 256  # the recipe's own value wins
    # the filled recipe is itself valid and means the same
    again = with_defaults(load_config(DD), get_registry())
    validate_recipe(again, get_registry())


@pytest.mark.parametrize("override", ["student.model.name=lenet", "student.model={name: lenet}"])
def test_a_renamed_strategy_block_drops_the_old_strategys_keys(override):
    cfg = load_config(REPO / "configs" / "mnist_kd.yaml", [override])
    assert dict(cfg.student.model) == {"name": "lenet"}  # not 'hidden' of the old mlp block
    validate_recipe(cfg, get_registry())
    same = load_config(REPO / "configs" / "mnist_kd.yaml", ["student.model.hidden=[10]"])
    assert same.student.model.name == "mlp" and list(same.student.model.hidden) == [10]  # same name: merged


def test_a_defaults_include_with_another_strategy_replaces_the_block(tmp_path):
    (tmp_path / "base.yaml").write_text("teacher:\n  model: {name: mlp, hidden: [8]}\n  train: {lr: 0.5}\n")
    (tmp_path / "child.yaml").write_text("defaults: [base]\nteacher:\n  model: {name: lenet}\n")
    (tmp_path / "same.yaml").write_text("defaults: [base]\nteacher:\n  model: {name: mlp, dropout: 0.1}\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert dict(cfg.teacher.model) == {"name": "lenet"} and cfg.teacher.train.lr == 0.5
    same = load_config(tmp_path / "same.yaml")
    assert dict(same.teacher.model) == {"name": "mlp", "hidden": [8], "dropout": 0.1}


def test_options_may_stand_anywhere_among_overrides():
    args = _parse(["train", "r.yaml", "a=1", "--no-progress", "b=2", "--resume"])
    assert args.recipe == "r.yaml" and args.overrides == ["a=1", "b=2"] and args.no_progress and args.resume
    args = _parse(["run", "r.yaml", "--force", "teacher", "x=1", "--force", "label", "y=2"])
    assert args.overrides == ["x=1", "y=2"] and args.force == ["teacher", "label"]


@pytest.mark.parametrize("device", ["gpu", "cuda:99", "tpu"])
def test_a_device_this_machine_lacks_is_one_line_with_the_valid_names(device):
    with pytest.raises(ConfigError) as err:
        resolve_device(device)
    msg = str(err.value)
    assert f"run.device={device!r}" in msg and "valid: auto, cpu" in msg and "\n" not in msg


def test_resolve_device_accepts_the_cpu():
    assert resolve_device("cpu").type == "cpu" and resolve_device("auto").type in ("cpu", "cuda")


def test_a_misspelt_disabled_plugin_is_named_with_the_installed_ones(monkeypatch, caplog):
    from ddkit.plugin_manager import make_plugin_manager

    monkeypatch.setenv("DDKIT_DISABLE_PLUGINS", "builtin_transfroms,builtin_selectors")
    with caplog.at_level(logging.WARNING, logger="ddkit"):
        pm = make_plugin_manager()
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "'builtin_transfroms'" in warned[0] and "builtin_transforms" in warned[0]
    assert pm.is_blocked("builtin_selectors")


@pytest.mark.parametrize("command", [["train"], ["label"], ["bench"], ["run"], ["config", "show"]])
def test_every_command_rejects_a_typo_in_the_run_section_alike(command, capsys):
    assert main([*command, str(DD), "run.sed=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("run: unknown key 'sed'. Did you mean 'seed'? Valid keys: name, out_dir, seed, device"), err


def test_a_full_disk_is_one_line_naming_the_file_and_the_free_space(tmp_path, monkeypatch, capsys):
    import errno

    import ddkit.commands.config as config_command

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "model.pt"))

    monkeypatch.setattr(config_command, "run", full)
    assert main(["config", "show", str(DD)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no space left" in err and str(tmp_path / "run" / "model.pt") in err
    assert f"MiB free in {tmp_path}" in err and "re-run the same command to resume" in err


def test_a_broken_pipe_is_still_not_an_error(monkeypatch):
    import ddkit.commands.config as config_command

    def gone(args):
        raise BrokenPipeError()

    monkeypatch.setattr(config_command, "run", gone)
    assert main(["config", "show", str(DD)]) == 0


def test_train_saves_the_full_recipe_with_every_default(tmp_path):
    recipe = tmp_path / "t.yaml"
    recipe.write_text(f"""
run: {{out_dir: "{tmp_path / 'out'}", device: cpu}}
task: {{name: classification}}
data: {{dataset: {{name: digits}}, split: {{labeled: 0.3, test: 0.1}}}}
teacher:
  model: {{name: mlp, hidden: [8]}}
  train: {{iterations: 2, batch_size: 8}}
""")
    assert main(["train", str(recipe), "--no-progress"]) == 0
    saved = yaml.safe_load((tmp_path / "out" / "teacher" / "config.yaml").read_text())
    assert saved["teacher"]["train"]["warmup_factor"] == 0.001 and saved["teacher"]["train"]["iterations"] == 2
    assert saved["teacher"]["model"]["dropout"] == 0.0 and saved["run"]["seed"] == 0


@pytest.mark.parametrize("recipe, cfg", [("yolo_det_dd.yaml", "yolov8n.yaml"),
                                         ("yolo_pose_dd.yaml", "yolov8n-pose.yaml")])
def test_the_yolo_recipes_student_does_not_start_from_the_teachers_weights(recipe, cfg):
    """README's "A teacher you already have" changes the teacher's model block only: its best.pt must not become the
    student's ``pretrained`` too (the "distilled" student would be the teacher), the rest is as before."""
    given = load_config(REPO / "configs" / recipe, ["teacher.train.iterations=0", "teacher.model.pretrained=best.pt",
                                                     "teacher.model.trust_checkpoint=true"])
    assert given.teacher.model.pretrained == "best.pt"
    assert "pretrained" not in given.student.model and "trust_checkpoint" not in given.student.model
    assert dict(given.student.model) == {"name": "yolo", "cfg": cfg, "imgsz": 320, "conf": 0.0, "max_det": 100}
