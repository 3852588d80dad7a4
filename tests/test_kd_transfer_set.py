"""A KD variant's ``transfer_set``: the student distils on the unlabeled part too (Hinton et al. 2015's transfer set),
the hard-label term reading only the labeled items."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ddkit import ConfigError, DataError
from ddkit.config import load_config
from ddkit.engine.data import TransferOnly
from ddkit.engine.run import Runner, run_recipe
from ddkit.plugin_manager import get_registry

RECIPE = """
run: {{name: tiny_kd, out_dir: "{out}", seed: 0, device: cpu}}
task: {{name: classification}}
data:
  dataset: {{name: digits}}
  split: {{labeled: 0.1, unlabeled: 0.5, test: 0.2, seed: 0}}
teacher:
  model: {{name: mlp, hidden: [32]}}
  train: {{iterations: 40, batch_size: 32, lr: 0.1, log_every: 20}}
student:
  model: {{name: mlp, hidden: [32]}}
  train: {{iterations: 30, batch_size: 32, lr: 0.1, ratio: [6, 4], log_every: 10}}
kd:
  variants:
    alone: {{losses: [{{name: hard_label}}]}}
    labeled: {{losses: [{{name: hard_label, weight: 0.1}}, {{name: soft_target, weight: 0.9}}]}}
    transfer:
      transfer_set: [labeled, unlabeled]
      losses: [{{name: hard_label, weight: 0.1}}, {{name: soft_target, weight: 0.9}}]
      train: {{teacher_cache: true}}
"""


@pytest.fixture
def recipe(tmp_path) -> Path:
    path = tmp_path / "tiny_kd.yaml"
    path.write_text(RECIPE.format(out=tmp_path / "out"))
    return path


def _batch(task, labels: list[int], marked: list[bool]) -> dict:
    images = torch.rand(len(labels), 1, 8, 8)
    targets = [({"label": y} if y >= 0 else {}) | ({"unlabeled": True} if m else {}) for y, m in zip(labels, marked)]
    return task.collate(list(zip(images, targets)))


@pytest.fixture
def task():
    return get_registry().build("tasks", {"name": "classification"})


def test_the_classification_loss_reads_only_the_labeled_items_of_a_transfer_batch(task):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    labels = [3, -1, 7, -1, -1, 0]
    batch = _batch(task, labels, [y < 0 for y in labels])
    out = task.training_forward(model, batch)
    logits = model(batch["images"])
    known = torch.tensor([0, 2, 5])
    reference = F.cross_entropy(logits[known], torch.tensor([3, 7, 0]))  # the mean over the labeled items alone
    assert torch.allclose(out.losses["ce"], reference)
    assert torch.equal(out.logits, logits)  # every item's logits, for the terms that read the teacher


def test_a_batch_of_unlabeled_transfer_items_has_no_hard_loss_but_keeps_its_graph(task):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    out = task.training_forward(model, _batch(task, [-1, -1], [True, True]))
    assert out.losses["ce"].item() == 0.0
    out.losses["ce"].backward()  # a zero that reaches every parameter (DDP needs each to get a gradient)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_an_item_without_a_label_outside_a_transfer_set_is_still_refused(task):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with pytest.raises(DataError, match="samples without a 'label'"):
        task.training_forward(model, _batch(task, [3, -1, -1], [False, True, False]))


def test_a_transfer_variant_trains_on_both_parts_each_item_equally_often(recipe, train_calls):
    """The variant gets the labeled part and the unlabeled one (marked), mixed by their sizes (not the student's
    labeled : pseudo ratio); the labeled-only variants get the labeled part alone. The run finishes."""
    summary = run_recipe(load_config(recipe), source=str(recipe), progress=False)
    sets, train = train_calls["kd_transfer"]
    assert len(sets) == 2 and isinstance(sets[1], TransferOnly)
    assert all(sets[1].get_target(i).get("unlabeled") and "label" not in sets[1].get_target(i)
               for i in range(len(sets[1])))
    assert train["ratio"] == [len(sets[0]), len(sets[1])] and len(sets[1]) > 4 * len(sets[0])
    assert [len(train_calls[v][0]) for v in ("kd_alone", "kd_labeled")] == [1, 1]
    assert {r["stage"] for r in summary["rows"]} >= {"kd_alone", "kd_labeled", "kd_transfer"}


def test_a_transfer_variant_takes_its_own_ratio(recipe, train_calls):
    run_recipe(load_config(recipe, ["kd.variants.transfer.train.ratio=[1, 1]", "kd.variants.alone=null",
                                    "kd.variants.labeled=null"]), source=str(recipe), progress=False)
    assert train_calls["kd_transfer"][1]["ratio"] == [1, 1]


@pytest.mark.parametrize("override, message", [
    ("kd.variants.transfer.transfer_set=[unlabeled]", r"kd.variants.transfer.transfer_set: \['unlabeled'\] is not "
                                                      r"a list of data parts with 'labeled' in it; the parts are "
                                                      r"labeled, unlabeled"),
    ("kd.variants.transfer.transfer_set=[labeled, labeled]", r"transfer_set: \['labeled', 'labeled'\] is not"),
    ("kd.variants.transfer.transfer_set=[labeled, test]", r"transfer_set: \['labeled', 'test'\] is not"),
    ("kd.variants.transfer.transfer_set=labeled", r"transfer_set: 'labeled' is not a list"),
    ("data.split.unlabeled=0.0", r"kd.variants.transfer.transfer_set names the unlabeled part, but the data has "
                                 r"none; give data.split.unlabeled a fraction"),
    ("kd.variants.transfer.losses=[{name: hard_label}]", r"kd.variants.transfer.transfer_set: no loss term of the "
                                                          r"variant reads the teacher"),
])
def test_a_transfer_set_that_cannot_work_is_refused_before_anything_is_written(recipe, tmp_path, override, message):
    out = tmp_path / "refused"
    with pytest.raises(ConfigError, match=message):
        Runner(load_config(recipe, [f"run.out_dir={out}", override]))
    assert not out.exists()


def test_a_task_whose_loss_cannot_leave_items_out_is_asked_and_refuses(recipe, tmp_path, monkeypatch):
    """The core asks the task plugin (``trains_on_unlabeled``), as it would a detector's (whose loss reads an image
    without boxes as background), and never names the task."""
    task_class = type(get_registry().build("tasks", {"name": "classification"}))
    monkeypatch.setattr(task_class, "trains_on_unlabeled", False)
    out = tmp_path / "refused"
    with pytest.raises(ConfigError, match=r"kd.variants.transfer.transfer_set: the classification task's loss "
                                          r"cannot leave out images without labels"):
        Runner(load_config(recipe, [f"run.out_dir={out}"]))
    assert not out.exists()
    assert not getattr(get_registry().build("tasks", {"name": "detection"}), "trains_on_unlabeled", False)
