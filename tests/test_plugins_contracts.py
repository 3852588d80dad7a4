"""What a plugin's strategy returns is checked where ddkit calls it, and what it lacks is refused when the recipe
is validated: one line naming the strategy and what was wrong, not an IndexError three stages later."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ddkit import ConfigError, PluginError, hookimpl
from ddkit.config import load_config
from ddkit.engine.prediction_kinds import PROBS
from ddkit.errors import PluginContractError
from ddkit.plugin_manager import make_plugin_manager, registry_from_plugin_manager
from ddkit.types import AggregatorSpec, LossSpec, ModelSpec

RECIPE = """
run: {{name: tiny, out_dir: "{out}", seed: 0, device: cpu}}
task: {{name: classification}}
data:
  dataset: {{name: digits}}
  split: {{labeled: 0.1, unlabeled: 0.2, test: 0.2, seed: 0}}
teacher:
  model: {{name: mlp, hidden: [16]}}
  train: {{iterations: 4, batch_size: 16, lr: 0.1}}
label:
  transforms: [{{name: identity}}]
  aggregator: {{name: prob_mean}}
  selector: {{name: count_match}}
student:
  model: {{name: mlp, hidden: [16]}}
  train: {{iterations: 4, batch_size: 16, lr: 0.1, ratio: [6, 4]}}
baselines: {{labeled_only: false, fully_labeled: false}}
"""


class _Plugin:
    """A third-party plugin with strategies that break the contract (registered in-process)."""

    class NoCall:
        pass

    class LossNoCompute:
        weight = 1.0

    class LossMinimal:  # what the README's plugin section used to describe: compute() alone
        def compute(self, ctx):
            return ctx.student_logits.float().pow(2).mean()

    class LossBadOutputs:
        weight = 1.0

        def compute(self, ctx):
            return ctx.student_logits.float().sum(-1)  # [B], not a scalar

    class ThreeWay(torch.nn.Module):  # a head hard-coded to 3 classes
        def __init__(self, *, info):
            super().__init__()
            c, h, w = info.extra["image_shape"]
            self.fc = torch.nn.Linear(c * h * w, 3)

        def forward(self, x):
            return self.fc(x.flatten(1))

    @hookimpl
    def ddkit_models(self):
        yield ModelSpec(name="zz_three_way", factory=_Plugin.ThreeWay, task="classification", summary="3 outputs")

    @hookimpl
    def ddkit_aggregators(self):
        yield AggregatorSpec(name="zz_agg_nocall", factory=_Plugin.NoCall, input="probs", summary="no __call__")

    class LossRaises:
        weight = 1.0

        def compute(self, ctx):
            raise RuntimeError("boom from zz_loss_raises")

    @hookimpl
    def ddkit_losses(self):
        yield LossSpec(name="zz_loss_raises", factory=_Plugin.LossRaises, summary="raises in compute")
        yield LossSpec(name="zz_loss_nocompute", factory=_Plugin.LossNoCompute, summary="no compute")
        yield LossSpec(name="zz_loss_minimal", factory=_Plugin.LossMinimal, summary="no weight")


@pytest.fixture
def with_plugin(monkeypatch):
    registry = registry_from_plugin_manager(make_plugin_manager([_Plugin()]))
    monkeypatch.setattr("ddkit.plugin_manager._registry", registry)  # what get_registry() returns, everywhere
    return registry


@pytest.fixture
def recipe(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(RECIPE.format(out=tmp_path / "out"))
    return path


def _refused(recipe: Path, overrides: list[str], message: str) -> None:
    """The recipe is refused at validation with one line matching ``message``, and nothing is written."""
    from ddkit.engine.run import Runner

    with pytest.raises(ConfigError, match=message) as err:
        Runner(load_config(recipe, overrides))
    assert "\n" not in str(err.value)
    assert not (recipe.parent / "out").exists()


def _views(n: int = 5, c: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.rand(n, c, generator=g).softmax(-1) for _ in range(3)]  # 3 views of [N, C]


@pytest.mark.parametrize("returns, message", [
    (lambda p: (p.mean(0).argmax(-1)[:-1], p.mean(0).max(-1).values[:-1]),
     r"\(labels \[N\] int, scores \[N\] finite float\) for 5 images, got labels \(4,\)"),
    (lambda p: (torch.full((p.shape[1],), 99), torch.ones(p.shape[1])), r"got labels 99\.\.99 for 4 classes"),
    (lambda p: (torch.zeros(p.shape[1], dtype=torch.long), torch.full((p.shape[1],), float("nan"))),
     "got non-finite scores"),
    (lambda p: (p.mean(0), p.mean(0)), r"got labels \(5, 4\)"),
    (lambda p: (torch.zeros(p.shape[1]), torch.ones(p.shape[1])), "got labels of dtype torch.float32"),
    (lambda p: None, "got NoneType"),
    (lambda p: (torch.zeros(p.shape[1], dtype=torch.long), torch.ones(p.shape[1]), None), "got 3 values"),
])
def test_a_probs_aggregators_output_is_checked_naming_it(returns, message):
    with pytest.raises(PluginContractError, match=r"^aggregator 'agg_x' must return .*" + message):
        PROBS.aggregate(returns, _views(), [(8, 8)] * 5, [10, 11, 12, 13], who="aggregator 'agg_x'")


def test_a_good_probs_aggregator_maps_columns_to_category_ids():
    out = PROBS.aggregate(lambda p: p.mean(0).max(-1)[::-1], _views(), [(8, 8)] * 5, [10, 11, 12, 13])
    assert len(out) == 5 and all(int(labels[0]) in (10, 11, 12, 13) for labels, _ in out)


def test_contract_errors_are_plugin_errors_and_type_errors():
    assert issubclass(PluginContractError, PluginError) and issubclass(PluginContractError, TypeError)


def test_an_aggregator_that_is_not_callable_is_refused_at_validation(recipe, with_plugin):
    _refused(recipe, ["label.aggregator.name=zz_agg_nocall"],
             r"label.aggregator: 'zz_agg_nocall' \(\w+\) built a NoCall, which is not callable")


@pytest.mark.parametrize("override, message", [
    ("student.losses=[{name: hard_label}, {name: zz_loss_nocompute}]",
     r"student.losses\[1\]: loss 'zz_loss_nocompute' \(\w+\) has no compute\(ctx\) method"),
    ("student.losses=[{name: zz_loss_minimal}]",
     r"student.losses\[0\]: loss 'zz_loss_minimal' \(\w+\) needs a number 'weight' attribute"),
    ("student.losses=[{name: hard_label}, {name: detector_kd}]",
     r"student.losses\[1\]: loss 'detector_kd' \(ddkit\) supports the tasks detection, keypoints, not this "
     r"recipe's 'classification'; losses for classification: .*hard_label"),
    ("student.losses=[]", r"^recipe: student.losses is empty: give at least one loss block"),
    ("student.losses=hard_label", r"^recipe: student.losses must be a list of loss blocks, e.g. "
                                  r"\[\{name: hard_label\}\]; got 'hard_label'"),
    ("label.transforms=hflip", r"label.transforms must be a list of transform blocks"),
])
def test_a_loss_that_breaks_the_contract_is_refused_at_validation(recipe, with_plugin, override, message):
    _refused(recipe, [override], message)


def test_a_loss_value_that_is_not_a_scalar_names_the_loss_on_the_first_step(tmp_path):
    import ddkit
    from ddkit.engine.data import split_dataset
    from ddkit.engine.train import train_model

    splits = split_dataset(ddkit.build("datasets", "digits"), labeled=0.1, test=0.1, seed=0)
    task = ddkit.build("tasks", "classification")
    model = task.build_model({"name": "mlp", "hidden": [8]}, splits.info)
    with pytest.raises(PluginContractError, match=r"^loss 'lossbadoutputs'.compute must return a scalar "
                                                  r"floating-point tensor, got torch.float32 \(8,\)"):
        train_model(task, model, splits.labeled, {"iterations": 2, "batch_size": 8}, tmp_path,
                    losses=[_Plugin.LossBadOutputs()], device="cpu", progress=False)


def test_a_model_with_the_wrong_number_of_outputs_is_refused_at_validation(recipe, with_plugin):
    _refused(recipe, ["student.model={name: zz_three_way}"],
             r"^recipe: student.model: the model gives \(3,\) outputs per image, but the data has 10 classes")


def test_the_reusable_model_contract_check_catches_a_hard_coded_head(with_plugin):
    from ddkit.testing.models import check_model

    with pytest.raises(AssertionError, match=r"model 'zz_three_way': logits \(2, 3\) != \(2, C\)"):
        check_model(with_plugin.get("models", "zz_three_way"), registry=with_plugin)
    check_model(with_plugin.get("models", "mlp"), registry=with_plugin)  # a head sized from info passes


def test_an_exception_inside_a_stage_is_one_line_naming_the_stage(recipe, with_plugin, capsys, monkeypatch):
    from ddkit.cli import main

    args = ["run", str(recipe), "teacher.losses=[{name: zz_loss_raises}]", "--no-progress"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ddkit run: error: stage teacher: RuntimeError: boom from "
                                                    "zz_loss_raises (raised at ")
    assert "test_plugins_contracts.py:" in err and "in compute); DDKIT_DEBUG=1 shows the traceback" in err
    monkeypatch.setenv("DDKIT_DEBUG", "1")  # the original exception, with its traceback
    with pytest.raises(RuntimeError, match="^boom from zz_loss_raises$"):
        main(args)
