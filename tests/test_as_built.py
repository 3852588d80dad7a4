"""``train.iterations: 0``: a model used as built from its weights (e.g. a pretrained teacher that labels without
training), refused when its weights leave part of it random."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from ddkit import ConfigError
from ddkit.config import load_config
from ddkit.engine.as_built import check_as_built, random_tensors
from ddkit.engine.run import Runner, run_recipe
from ddkit.engine.train import run_train

from test_run import RECIPE

pytestmark = pytest.mark.usefixtures("one_thread")


def _loaded(state: dict[str, torch.Tensor], head: bool) -> nn.Module:
    """A two-layer net whose first layer (and the head, if ``head``) comes from ``state``."""
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    keep = {k: v for k, v in state.items() if head or not k.startswith("2.")}
    net.load_state_dict(keep, strict=False)
    return net


def test_random_tensors_are_those_the_weights_do_not_set():
    state = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).state_dict()
    assert random_tensors(lambda: _loaded(state, head=True)) == []
    assert random_tensors(lambda: _loaded(state, head=False)) == ["2.weight", "2.bias"]
    # a constant init (BN's ones and zeros) is not random; its running stats are not either
    assert random_tensors(lambda: nn.BatchNorm1d(3)) == []
    before = torch.random.get_rng_state()
    random_tensors(lambda: nn.Linear(2, 2))
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's random stream is untouched


def test_check_as_built_names_the_section_the_tensors_and_the_fix():
    with pytest.raises(ConfigError) as err:
        check_as_built(lambda: nn.Linear(2, 2), "r.yaml: teacher")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("r.yaml: teacher.train.iterations: 0")
    assert "2 of its tensors are random" in message and "weight, bias" in message
    assert "teacher.model.pretrained" in message and "train at least 1 iteration" in message


# the tiny run of test_run.py with a teacher alone, its iterations and weights as each test sets
AS_BUILT = ["kd=null", "evaluate=null", "baselines.labeled_only=false", "baselines.fully_labeled=false",
            "student.train.iterations=30"]


def _recipe(tmp: Path, name: str, iterations: int, pretrained: str | None = None) -> tuple[Path, list[str]]:
    path = tmp / f"{name}.yaml"
    path.write_text(RECIPE.format(out=tmp / name))
    weights = [f"teacher.model.pretrained={pretrained}"] if pretrained else []
    return path, [*AS_BUILT, f"teacher.train.iterations={iterations}", *weights]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A teacher trained elsewhere (60 iterations): its model.pt is the weights file of the tests below."""
    tmp = tmp_path_factory.mktemp("asb")
    path, overrides = _recipe(tmp, "trained", 60)
    return run_train(load_config(path, overrides), "teacher", source=str(path), progress=False)


def test_a_teacher_trained_for_0_iterations_is_its_weights_file_as_it_is(trained, tmp_path):
    path, overrides = _recipe(tmp_path, "zero", 0, pretrained=trained["model_path"])
    out = run_train(load_config(path, overrides), "teacher", source=str(path), progress=False)
    assert out["finished"] and out["iterations"] == 0
    assert out["metrics"]["accuracy"] == pytest.approx(trained["metrics"]["accuracy"])
    mine = torch.load(out["model_path"], weights_only=True)["model"]
    theirs = torch.load(trained["model_path"], weights_only=True)["model"]
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


@pytest.mark.parametrize("command", ["train", "run"])
def test_0_iterations_of_a_random_model_is_refused_before_anything_is_written(tmp_path, command):
    path, overrides = _recipe(tmp_path, "random", 0)
    with pytest.raises(ConfigError, match=r"teacher\.train\.iterations: 0 uses the model as built.*"
                                          r"teacher\.model\.pretrained"):
        if command == "train":
            run_train(load_config(path, overrides), "teacher", source=str(path), progress=False)
        else:
            run_recipe(load_config(path, overrides), source=str(path), progress=False)
    assert not (tmp_path / "random").exists()


def test_a_run_labels_with_a_pretrained_teacher_it_does_not_train(trained, tmp_path):
    """The teacher is its file; the labeled-only baseline, which has no teacher's schedule to share, trains the
    student's model with the student's schedule (not 0 iterations of a random model)."""
    path, overrides = _recipe(tmp_path, "dd", 0, pretrained=trained["model_path"])
    result = run_recipe(load_config(path, [*overrides, "baselines.labeled_only=true"]), source=str(path),
                        progress=False)
    rows = {r["stage"]: r for r in result["rows"]}
    assert rows["teacher"]["accuracy %"] == pytest.approx(100 * trained["metrics"]["accuracy"], abs=0.01)
    stages = {s: json.loads((tmp_path / "dd" / s / "stage.json").read_text())["result"]
              for s in ("teacher", "baseline_labeled", "student")}
    assert stages["teacher"]["iterations"] == 0
    assert stages["baseline_labeled"]["iterations"] == stages["student"]["iterations"] == 30
    assert (tmp_path / "dd" / "label" / "pseudo_labels.json").is_file()


@pytest.mark.parametrize("given_as", ["pretrained", "checkpoint"])
@pytest.mark.parametrize("init, warned", [("scratch", True), ("teacher", False)])
def test_a_student_given_the_teachers_weights_file_is_warned_about(trained, tmp_path, caplog, init, warned,
                                                                   given_as):
    """``student.model: ${teacher.model}`` with a teacher's own weights file (its ``pretrained``, or the
    ``teacher.checkpoint`` of a teacher trained before) starts the student as the teacher: one warning line (logged
    and in the results), unless ``student.train.init: teacher`` asks for it."""
    weights = trained["model_path"]
    path, overrides = _recipe(tmp_path, "same", 0, pretrained=weights if given_as == "pretrained" else None)
    if given_as == "checkpoint":
        overrides.append(f"teacher.checkpoint={weights}")
    overrides += [f"student.model.pretrained={weights}", f"student.train.init={init}"]
    with caplog.at_level(logging.WARNING):
        runner = Runner(load_config(path, overrides), source=str(path))
    said = (f"student.model.pretrained is the teacher's weights file ({weights}): the student starts as the "
            f"teacher; set its own pretrained or none")
    assert any(said in w for w in runner.splits.warnings) == warned
    assert (said in caplog.text) == warned
    assert not (tmp_path / "same").exists()
