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
from ddkit.types import AggregatorSpec

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

    @hookimpl
    def ddkit_aggregators(self):
        yield AggregatorSpec(name="zz_agg_nocall", factory=_Plugin.NoCall, input="probs", summary="no __call__")


@pytest.fixture
def with_plugin(monkeypatch):
    registry = registry_from_plugin_manager(make_plugin_manager([_Plugin()]))
    monkeypatch.setattr("ddkit.plugin_manager.get_registry", lambda refresh=False: registry)
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
