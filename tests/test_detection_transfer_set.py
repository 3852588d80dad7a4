"""A detection KD variant's ``transfer_set``: the unlabeled part's images take the teacher's confident detections as
their boxes (``teacher_targets``), so the detector's own loss and Chen et al.'s terms learn from them."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ddkit import ConfigError
from ddkit.config import load_config
from ddkit.engine.data import LABEL_KEYS, TransferOnly
from ddkit.engine.run import Runner, run_recipe
from ddkit.plugin_manager import build
from ddkit.testing.losses import toy_detection

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)

RECIPE = """
run: {{name: tiny_det_kd, out_dir: "{out}", seed: 0, device: cpu}}
task: {{name: detection}}
data:
  dataset: {{name: synthetic_shapes, num_images: 16, image_size: 64}}
  split: {{labeled: 0.25, unlabeled: 0.5, test: 0.25, seed: 0}}
teacher:
  model: {{name: fasterrcnn, backbone: tiny, min_size: 64, max_size: 64}}
  train: {{iterations: 3, batch_size: 2, log_every: 1}}
student:
  model: {{name: fasterrcnn, backbone: tiny, min_size: 64, max_size: 64}}
  train: {{iterations: 2, batch_size: 4, log_every: 1}}
kd:
  variants:
    boxes: {{transfer_set: [labeled, unlabeled], losses: [{{name: hard_label}}]}}
    detector_kd:
      transfer_set: [labeled, unlabeled]
      losses: [{{name: hard_label}}, {{name: detector_kd}}]
"""


def _marked(batch: dict, which: list[bool]) -> dict:
    """The batch with the items of ``which`` as a transfer set's unlabeled part gives them (labels hidden)."""
    targets = [{k: v for k, v in t.items() if k not in LABEL_KEYS} | {"unlabeled": True} if m else t
               for t, m in zip(batch["targets"], which)]
    return {**batch, "targets": targets}


def test_unlabeled_items_take_the_teachers_detections_above_the_score():
    task, _, teacher, batch = toy_detection()
    preds = [None, task.predict(teacher, batch["images"][1:])[0]]  # the marked image, predicted as the task will
    assert len(preds[1]) >= 2, "the untrained teacher should detect something to filter"
    threshold = float(preds[1].scores.median())
    task = build("tasks", {"name": "detection", "transfer_score": threshold})
    out = task.teacher_targets(teacher, _marked(batch, [False, True]))
    keep = preds[1].scores >= threshold
    assert 0 < int(keep.sum()) < len(preds[1])
    assert torch.equal(out["targets"][1]["boxes"], preds[1].boxes[keep])
    assert torch.equal(out["targets"][1]["labels"], preds[1].labels[keep])  # the dataset's category ids
    assert out["targets"][0] is batch["targets"][0]  # a labeled item keeps its ground truth
    assert out["images"] is batch["images"]


def test_a_batch_without_unlabeled_items_is_left_alone_and_the_teacher_not_run():
    task, _, teacher, batch = toy_detection()
    calls = []
    teacher.register_forward_pre_hook(lambda *a: calls.append(1))
    assert task.teacher_targets(teacher, batch) is batch and not calls


def test_an_image_where_the_teacher_finds_nothing_trains_as_background():
    task, student, teacher, batch = toy_detection()
    task = build("tasks", {"name": "detection", "transfer_score": 1.0})
    out = task.teacher_targets(teacher, _marked(batch, [True, True]))
    assert [len(t["boxes"]) for t in out["targets"]] == [0, 0]
    losses = task.training_forward(student.train(), out).losses
    assert losses["loss_box_reg"].item() == 0 and losses["loss_classifier"].item() > 0


@pytest.mark.parametrize("score", [-0.1, 1.5])
def test_a_transfer_score_outside_0_1_is_refused(score):
    with pytest.raises(ConfigError, match=r"task .detection.: transfer_score must be in \[0, 1\]"):
        build("tasks", {"name": "detection", "transfer_score": score})


@pytest.fixture
def recipe(tmp_path) -> Path:
    path = tmp_path / "tiny_det_kd.yaml"
    path.write_text(RECIPE.format(out=tmp_path / "out"))
    return path


def test_detection_variants_distil_on_the_transfer_set_with_the_teacher(recipe, train_calls, monkeypatch):
    """Both variants get the labeled part and the unlabeled one (marked) and the teacher, even the one whose only
    term is the hard loss (its unlabeled images' boxes are the teacher's); the teacher labels every unlabeled item
    the student draws."""
    from ddkit_plugins import tasks

    labelled: list[int] = []
    real = tasks.DetectionTask.teacher_targets

    def counting(self, teacher, batch):
        out = real(self, teacher, batch)
        labelled.extend(int("boxes" in t) for t in out["targets"] if t.get("unlabeled"))
        return out

    monkeypatch.setattr(tasks.DetectionTask, "teacher_targets", counting)
    summary = run_recipe(load_config(recipe), source=str(recipe), progress=False)
    for variant in ("kd_boxes", "kd_detector_kd"):
        sets, train = train_calls[variant]
        assert len(sets) == 2 and isinstance(sets[1], TransferOnly)
        assert train["ratio"] == [len(sets[0]), len(sets[1])]
    assert labelled and all(labelled)
    assert {r["stage"] for r in summary["rows"]} >= {"kd_boxes", "kd_detector_kd"}


def test_a_task_that_cannot_label_with_the_teacher_refuses_the_transfer_set(recipe, tmp_path, monkeypatch):
    """Asked of the task plugin (``teacher_targets``): without it, detection's loss would read an unlabeled image as
    background, and the run is refused before anything is written."""
    from ddkit_plugins import tasks

    monkeypatch.setattr(tasks.DetectionTask, "teacher_targets", None)
    out = tmp_path / "refused"
    with pytest.raises(ConfigError, match=r"kd.variants.boxes.transfer_set: the detection task's loss cannot leave "
                                          r"out images without labels"):
        Runner(load_config(recipe, [f"run.out_dir={out}"]))
    assert not out.exists()


def _transfer_sets(num_classes: int = 3):
    from ddkit.engine.data import HiddenLabels

    ds = build("datasets", {"name": "synthetic_shapes", "num_images": 6, "image_size": 64,
                            "num_classes": num_classes})
    return [ds, TransferOnly(HiddenLabels(ds), ds.info)]


def test_a_transfer_set_without_a_teacher_is_refused_before_training(tmp_path):
    from ddkit.engine.train import train_model

    task, student, _, _ = toy_detection()
    with pytest.raises(ConfigError, match="the transfer set's unlabeled images take the teacher's boxes; give a "
                                          "teacher checkpoint"):
        train_model(task, student, _transfer_sets(), {"iterations": 1, "batch_size": 2}, tmp_path / "run",
                    progress=False)


def test_a_teacher_of_other_classes_is_refused_for_a_transfer_set(tmp_path):
    """Its boxes would carry category ids the student does not have: refused before the first step, not at it."""
    from ddkit.engine.task import attach_model_info
    from ddkit.engine.train import train_model
    from ddkit.testing.losses import TINY_FASTERRCNN

    task, student, _, _ = toy_detection()
    other = build("datasets", {"name": "synthetic_shapes", "num_images": 2, "image_size": 64, "num_classes": 2})
    teacher = attach_model_info(task.build_model(TINY_FASTERRCNN, other.info), TINY_FASTERRCNN, other.info,
                                {"name": "detection"})
    with pytest.raises(ConfigError, match=r"the training data \(the transfer set's boxes\): its categories \(3\) are "
                                          r"not the model's \(2, the teacher\)"):
        train_model(task, student, _transfer_sets(), {"iterations": 1, "batch_size": 2}, tmp_path / "run",
                    teacher=teacher, progress=False)
