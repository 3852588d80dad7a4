"""Recipes (defaults, overrides, validation, saving) and the CLI's user-facing behaviour."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from ddkit import ConfigError, get_registry
from ddkit.cli import _say_error, main
from ddkit.config import load_config, save_config, validate_config
from ddkit.errors import StageError

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def recipe(tmp_path) -> Path:
    _write(tmp_path / "base.yaml", "run: {seed: 0, name: base}\nlabel:\n  aggregator: {name: prob_mean}\n")
    return _write(tmp_path / "child.yaml", "defaults: [base]\nrun: {name: child}\n")


def test_defaults_are_merged_then_overrides(recipe):
    cfg = load_config(recipe, ["run.seed=3", "label.batch_size=8"])
    assert cfg.run.name == "child" and cfg.run.seed == 3 and cfg.label.batch_size == 8
    assert cfg.label.aggregator.name == "prob_mean" and "defaults" not in cfg


def test_save_config_round_trips(recipe, tmp_path):
    cfg = load_config(recipe, ["run.seed=5"])
    path = save_config(cfg, tmp_path / "run")
    assert yaml.safe_load(path.read_text())["run"] == {"seed": 5, "name": "child"}
    assert not list((tmp_path / "run").glob(".*tmp"))


@pytest.mark.parametrize("text, words", [
    ("run: {seed: 0}\nlable: {}\n", ["unknown section 'lable'", "Did you mean 'label'"]),
    ("fuse: {method: wbf}\n", ["unknown section 'fuse'"]),  # was accepted and ignored: fusing is `ddkit fuse`
    ("label:\n  aggregator: {name: prob_meen}\n", ["label.aggregator", "Did you mean 'prob_mean'"]),
    ("label:\n  selector: {name: score_threshold, thr: 0.5}\n", ["label.selector", "unknown key 'thr'",
                                                                 "Valid keys: threshold"]),
    ("label:\n  selector: {name: score_threshold, threshold: high}\n", ["'threshold' = 'high'", "float"]),
    ("label:\n  selector: {name: score_threshold, threshold: 2.0}\n", ["threshold must be in [0, 1]"]),
    ("label:\n  transforms: [{name: identity}, {name: nope}]\n", ["label.transforms[1]", "Unknown transform 'nope'"]),
])
def test_validation_errors_name_file_field_and_fix(tmp_path, text, words):
    path = _write(tmp_path / "r.yaml", text)
    with pytest.raises(ConfigError) as err:
        validate_config(load_config(path), get_registry(), source=str(path))
    msg = str(err.value)
    assert msg.startswith(str(path))
    for word in words:
        assert word in msg, msg


def test_load_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path / "bad.yaml", "run: {seed: [1, 2\n"))
    with pytest.raises(ConfigError, match="key=value"):
        load_config(_write(tmp_path / "ok.yaml", "run: {seed: 0}\n"), ["run.seed"])
    a = _write(tmp_path / "a.yaml", "defaults: [b]\n")
    _write(tmp_path / "b.yaml", "defaults: [a]\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_config(a)


def test_cli_config_show_prints_resolved_yaml(recipe, capsys):
    assert main(["config", "show", str(recipe), "run.seed=7"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["run"] == {"seed": 7, "name": "child"}


@pytest.mark.parametrize("text, override, word", [
    ("label:\n  selector: {name: score_threshold, thrsh: 1}\n", None, "unknown key 'thrsh'"),
    ("label:\n  selector: {name: score_threshold}\n", "label.selector.threshold=abc", "'threshold' = 'abc'"),
    ("label:\n  aggregator: {name: wfb}\n", None, "Unknown aggregator 'wfb'"),
])
def test_cli_user_errors_are_one_line_without_traceback(tmp_path, text, override, word):
    path = _write(tmp_path / "r.yaml", text)
    args = [sys.executable, "-m", "ddkit", "config", "show", str(path)] + ([override] if override else [])
    proc = subprocess.run(args, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddkit config: error:") and word in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("rank, says", [("0", True), ("1", False)])
def test_under_torchrun_a_recipe_error_is_said_once_by_rank_0(tmp_path, rank, says):
    """Every rank validates the same recipe: one line from rank 0, not one per process."""
    path = _write(tmp_path / "r.yaml", "label:\n  aggregator: {name: wfb}\n")
    proc = subprocess.run([sys.executable, "-m", "ddkit", "config", "show", str(path)], capture_output=True,
                          text=True, env={**os.environ, "RANK": rank})
    assert proc.returncode == 2 and ("Unknown aggregator 'wfb'" in proc.stderr) == says, proc.stderr
    assert "Traceback" not in proc.stderr


def test_another_ranks_own_failure_is_said_with_its_rank(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    _say_error("run", StageError("stage student: out of memory"))
    assert capsys.readouterr().err == "ddkit run [rank 3]: error: stage student: out of memory\n"


def test_cli_version_and_help():
    out = subprocess.run([sys.executable, "-m", "ddkit", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("ddkit ")
    out = subprocess.run([sys.executable, "-m", "ddkit", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "plugins" in out.stdout and "config" in out.stdout


def test_help_and_version_do_not_import_torch():
    """Every command's parser is built for ``--help`` and ``--version``: no command module, and not ``import ddkit``,
    imports torch at module level (torch and torchvision took 5-7 s of ``ddkit --help`` on 2 cores)."""
    code = ("import sys, ddkit.cli; ddkit.cli.build_parser(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision', 'numpy', 'ultralytics'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_packages_lazy_names_are_their_modules_objects():
    """What ``import ddkit`` loads on first use (``ddkit.Instances`` ...) is the defining module's object; that it
    loads lazily at all is the test above."""
    import ddkit
    import ddkit.hookspecs
    import ddkit.plugin_manager
    import ddkit.types

    assert (ddkit.hookimpl, ddkit.build, ddkit.get_registry, ddkit.Instances, ddkit.DatasetInfo) == (
        ddkit.hookspecs.hookimpl, ddkit.plugin_manager.build, ddkit.plugin_manager.get_registry,
        ddkit.types.Instances, ddkit.types.DatasetInfo)
    with pytest.raises(AttributeError, match="no attribute 'Instance'"):
        ddkit.Instance


def test_cli_plugins_lists_every_kind_with_provider(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for kind in ("transforms", "aggregators", "selectors", "losses", "tasks", "datasets", "models"):
        assert f"\n{kind} (" in "\n" + out
    assert "[ddkit]" in out


def test_cli_plugins_json_includes_third_party(with_example_plugin, monkeypatch):
    monkeypatch.setenv("DDKIT_DISABLE_PLUGINS", "example_clash")
    proc = subprocess.run([sys.executable, "-m", "ddkit", "plugins", "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    mine = [r for r in rows if r["name"] == "best_per_class"]
    assert mine == [{"kind": "aggregators", "name": "best_per_class", "provider": "ddkit-example-plugin",
                     "plugin": "example", "summary": mine[0]["summary"], "params": ["min_score"]}]


def test_cli_reports_a_plugin_clash_as_a_user_error(with_example_plugin):
    proc = subprocess.run([sys.executable, "-m", "ddkit", "plugins"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Two plugins register the transform 'identity'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("recipe", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_resolves_and_validates(recipe):
    cfg = load_config(recipe)
    validate_config(cfg, get_registry(), source=str(recipe))


@pytest.mark.parametrize("override, changed", [("student.model.width=0.25", ("model", "width")),
                                                ("student.model.layers.1=5", ("model", "layers")),
                                                ("student.train.lr=0.5", ("train", "lr"))])
def test_an_override_under_an_interpolated_block_changes_that_block_only(tmp_path, override, changed):
    """``student.model: ${teacher.model}``: overriding a key of the student's copy must leave the teacher alone."""
    path = _write(tmp_path / "r.yaml", "run: {seed: 3}\n"
                  "teacher:\n  model: {name: m, width: 1.0, layers: [1, 2], seed: '${run.seed}'}\n  train: {lr: 0.1}\n"
                  "student:\n  model: ${teacher.model}\n  train: ${teacher.train}\n")
    cfg = load_config(path, [override])
    block, key = changed
    assert cfg.teacher[block][key] == {"width": 1.0, "layers": [1, 2], "lr": 0.1}[key]
    assert cfg.student[block][key] == {"width": 0.25, "layers": [1, 5], "lr": 0.5}[key]
    assert cfg.student.model.seed == 3 and cfg.teacher.model.seed == 3  # interpolations inside the copy still work
    untouched = "train" if block == "model" else "model"
    assert cfg.student[untouched] == cfg.teacher[untouched]



def test_a_saved_recipe_names_existing_files_by_absolute_paths(tmp_path, monkeypatch):
    """The run folder's config.yaml works from any directory: relative paths of files and folders that exist
    become absolute; strategy names and strings that are not paths stay."""
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "train.json").write_text("{}")
    (tmp_path / "coco8").mkdir()  # a folder named like a dataset: a bare name is not taken for it
    monkeypatch.chdir(tmp_path)
    dataset = {"name": "coco8", "root": "data/images", "annotations": "data/train.json", "missing": "data/none.json",
               "split": "train"}
    cfg = OmegaConf.create({"data": {"dataset": dataset},
                            "label": {"transforms": [{"name": "identity"}], "images": "./data/images"}})
    save_config(cfg, tmp_path / "run")
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    ds = saved["data"]["dataset"]
    assert ds["root"] == str(tmp_path / "data" / "images")
    assert ds["annotations"] == str(tmp_path / "data" / "train.json")
    assert saved["label"]["images"] == str(tmp_path / "data" / "images")
    assert ds["name"] == "coco8" and ds["missing"] == "data/none.json" and ds["split"] == "train"
    assert saved["label"]["transforms"] == [{"name": "identity"}]


def test_run_name_override_keeps_the_rest_of_the_run_block(tmp_path):
    """``run`` is not a strategy block: ``run.name=x`` renames the run, it does not empty the block (out_dir, seed)."""
    path = _write(tmp_path / "r.yaml", "run: {name: a, seed: 3, out_dir: 'runs/${run.name}/s${run.seed}'}\n"
                  "student:\n  model: {name: lenet, channels: [8, 16]}\n")
    cfg = load_config(path, ["run.name=b"])
    assert cfg.run == {"name": "b", "seed": 3, "out_dir": "runs/b/s3"}
    swapped = load_config(path, ["student.model.name=mlp"])  # a strategy block still drops the old one's keys
    assert swapped.student.model == {"name": "mlp"}


@pytest.mark.parametrize("text, value", [("1e-3", 0.001), ("-2.5E+2", -250.0), (".5e1", 5.0), ("0.01", 0.01),
                                         ("3", 3), ("1e3x", "1e3x"), ("'1e-3'", "1e-3")])
def test_override_numbers_read_like_the_recipe_file(tmp_path, text, value):
    """PyYAML reads ``1e-3`` as a string (YAML 1.1); in a recipe file OmegaConf reads it as a float."""
    path = _write(tmp_path / "r.yaml", "student:\n  train: {lr: 1e-3}\n")
    assert load_config(path).student.train.lr == 0.001
    got = load_config(path, [f"student.train.lr={text}"]).student.train.lr
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("override, words", [("student.train.ratio=[0, 0]", "with a positive sum"),
                                             ("student.train.ratio=6:4", "a YAML list, e.g. [6, 4]"),
                                             ("data.split.labeled=0.0001", "data.split.labeled = 0.0001")])
def test_recipe_value_errors_say_how_to_write_the_value(override, words):
    from ddkit.engine.run import Runner

    recipe = REPO / "configs" / "mnist_dd.yaml"
    with pytest.raises(ConfigError, match=re.escape(words)):
        Runner(load_config(recipe, [override, "run.out_dir=/nonexistent/never"]), source=str(recipe))


def test_config_show_takes_its_options_anywhere_among_the_overrides(capsys):
    """As every command: ``ddkit config show R --defaults k=v`` (the README says options may stand anywhere)."""
    recipe = str(REPO / "configs" / "mnist_dd.yaml")
    assert main(["config", "show", recipe, "--defaults", "run.seed=3"]) == 0
    first = capsys.readouterr().out
    assert main(["config", "show", recipe, "run.seed=3", "--defaults"]) == 0
    assert capsys.readouterr().out == first and "seed: 3" in first and "warmup_factor" in first  # a default


@pytest.mark.parametrize("command", ["config show", "run", "train", "label"])
def test_an_error_that_an_override_causes_names_the_override_not_only_the_file(command, tmp_path, capsys):
    """A valid recipe made invalid on the command line: the error says which override (the file is fine); an error
    in the file itself names the file alone, whatever the overrides."""
    good = str(REPO / "configs" / "mnist_dd.yaml")
    out = f"run.out_dir={tmp_path / 'never'}"
    assert main([*command.split(), good, "run.seed=3", "teacher.train.lr=-1", out]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{good} with the override teacher.train.lr=-1: teacher.train: lr must be > 0" in err, err
    bad = _write(tmp_path / "bad.yaml", Path(good).read_text().replace("lr: ", "lrr: ", 1))
    assert main([*command.split(), str(bad), "run.seed=3", out]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{bad}: " in err and "with the override" not in err and "unknown key 'lrr'" in err, err
    # both wrong: the file's own mistake is said (before, the override's was, blamed on the file)
    assert main([*command.split(), str(bad), "run.sed=3", out]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown key 'lrr'" in err and "'sed'" not in err, err
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("override, want", [
    ("data.train={dataset: {name: coco, annotations: a.json}}", {"name": "coco", "annotations": "a.json"}),
    ("data={train: {dataset: {name: coco, annotations: a.json}}}", {"name": "coco", "annotations": "a.json"}),
    ("data.train={dataset: {split: val}}", {"name": "yolo", "root": "d", "split": "val"}),  # same strategy: merged
])
def test_overriding_a_blocks_parent_drops_the_old_strategys_keys_when_its_name_changes(tmp_path, override, want):
    """pass 22 label L5: ``data.train={dataset: {name: coco, ...}}`` kept the yolo block's ``root``."""
    path = _write(tmp_path / "r.yaml", "data:\n  train: {dataset: {name: yolo, root: d, split: train}, shuffle: 1}\n"
                  "teacher:\n  model: {name: m, width: 2}\nstudent:\n  model: ${teacher.model}\n")
    cfg = load_config(path, [override])
    assert OmegaConf.to_container(cfg.data.train.dataset) == want
    assert cfg.data.train.shuffle == 1  # keys outside a renamed strategy block merge as before
    cfg = load_config(path, ["student={model: {name: n}}"])  # an interpolated block: the student's only
    assert cfg.student.model == {"name": "n"} and cfg.teacher.model == {"name": "m", "width": 2}
