"""Keypoint metadata never goes silently wrong: a flip of keypoints whose pairs are unknown is an error that asks for
``flip_indices`` (labelling views and training flips alike), never COCO's pairs or "no swap" by default."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ddkit import ConfigError, get_registry
from ddkit.engine.data import build_data
from ddkit.engine.label.config import build_strategies, parse_label_config

MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-val2017-mini"


@pytest.fixture
def unpaired(tmp_path):
    """The real COCO keypoint file with keypoint names that hold no left/right pair."""
    src = json.loads((MINI / "test_coco.json").read_text())
    src["categories"][0]["keypoints"] = [f"kp{i}" for i in range(17)]
    (tmp_path / "a.json").write_text(json.dumps(src))
    return {"name": "coco", "annotations": str(tmp_path / "a.json"), "images": str(MINI)}


def _info(block):
    return build_data({"dataset": block, "split": {"labeled": 1.0}}).info


@pytest.mark.parametrize("transform", [{"name": "hflip"}, {"name": "scale", "factors": [0.8], "flip": True}])
def test_a_flip_view_without_known_pairs_asks_for_flip_indices(unpaired, transform):
    info = _info(unpaired)
    assert info.flip_indices is None
    task = get_registry().build("tasks", "keypoints")
    with pytest.raises(ConfigError, match=r"label.transforms\[1\].*flips keypoints.*flip_indices"):
        build_strategies(parse_label_config({"transforms": [{"name": "identity"}, transform]}), task, info)
    # no flip: fine; the pairs given on the dataset: fine
    build_strategies(parse_label_config({"transforms": [{"name": "identity"}, {"name": "scale", "factors": [0.8]}]}),
                     task, info)
    given = _info({**unpaired, "flip_indices": list(range(17))})
    assert given.flip_indices == list(range(17))
    build_strategies(parse_label_config({"transforms": [{"name": "identity"}, transform]}), task, given)


def test_a_training_flip_without_known_pairs_asks_for_flip_indices(unpaired):
    info = _info(unpaired)
    task = get_registry().build("tasks", "keypoints")
    target = {"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0]]), "labels": torch.tensor([1]),
              "keypoints": torch.stack([torch.arange(17.0), torch.zeros(17), torch.full((17,), 2.0)], 1)[None]}
    with pytest.raises(ConfigError, match=r"train.hflip flips keypoints.*flip_indices"):
        task.hflip(torch.zeros(3, 8, 8), target, info)
    known = _info({"name": "coco", "annotations": str(MINI / "test_coco.json"), "images": str(MINI)})
    _, flipped = task.hflip(torch.zeros(3, 8, 8), target, known)
    assert flipped["keypoints"][0, 1, 0] == 8.0 - 2.0  # the new left eye is the mirrored right eye (x = 2)
    assert flipped["keypoints"][0, 0, 0] == 8.0  # the nose stays the nose


@pytest.mark.parametrize("transform", [{"name": "hflip"}, {"name": "scale", "factors": [0.8], "flip": True}])
def test_flip_pairs_of_another_keypoint_count_are_refused_when_the_recipe_is_checked(transform):
    """Explicit pairs for 17 keypoints on a 7-keypoint dataset: a one-line error naming the field when the views
    are built (before the teacher trains), not a traceback at the first labelled image."""
    info = _info({"name": "synthetic_figures", "num_images": 4, "image_size": 64, "min_height": 30, "max_height": 50})
    task = get_registry().build("tasks", "keypoints")
    views = [{"name": "identity"}, {**transform, "flip_indices": [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13,
                                                                    16, 15]}]
    with pytest.raises(ConfigError, match=r"label.transforms\[1\].flip_indices: .*17 entries .*K=7"):
        build_strategies(parse_label_config({"transforms": views}), task, info)


def test_a_recipe_written_with_every_default_labels_with_the_datasets_own_pairs():
    """``ddkit config show --defaults`` writes ``flip_indices: null`` (the dataset's pairs), not COCO's 17: the
    written recipe builds views with the 7-keypoint figures' own pairs."""
    from ddkit.config import load_config
    from ddkit.engine.recipe import with_defaults

    recipe = Path(__file__).resolve().parents[1] / "configs" / "synthetic_kpt_dd.yaml"
    full = with_defaults(load_config(recipe), get_registry())
    blocks = [t for t in full.label.transforms if "flip_indices" in t]
    assert blocks and all(t.flip_indices is None for t in blocks)
    info = build_data(full.data).info
    strategies = build_strategies(parse_label_config(full.label), get_registry().build("tasks", "keypoints"), info)
    flips = [v for v in strategies.views if getattr(v, "flip", False)]
    assert flips and all(v.flip_indices == info.flip_indices for v in flips) and len(info.flip_indices) == 7


KP_RECIPE = """
run: {{name: kp, out_dir: "{out}", seed: 0, device: cpu}}
task: {{name: keypoints}}
data:
  dataset: {dataset}
  split: {{labeled: 0.5, unlabeled: 0.0, test: 0.5, seed: 0}}
teacher:
  model: {{name: keypointrcnn, backbone: tiny, min_size: 64, max_size: 64, keypoint_head: [16, 16]}}
  train: {{iterations: 2, batch_size: 1, hflip: {teacher}}}
label:
  images: {images}
  transforms: [{{name: identity}}]
  aggregator: {{name: box_voting}}
  selector: {{name: count_match, keypoints: true}}
student:
  model: {{name: keypointrcnn, backbone: tiny, min_size: 64, max_size: 64, keypoint_head: [16, 16]}}
  train: {{iterations: 2, batch_size: 1, hflip: {student}, ratio: [1, 1]}}
"""


@pytest.mark.parametrize("teacher, student, block", [(0.5, 0.0, "teacher.train"), (0.0, 0.5, "student.train")])
@pytest.mark.parametrize("command", ["run", "train"])
def test_a_training_flip_without_known_pairs_is_refused_before_anything_is_written(unpaired, tmp_path, teacher,
                                                                                    student, block, command):
    """``train.hflip > 0`` on keypoints without pairs: one error naming the train block and where each kind of
    dataset takes the pairs, before a stage runs (not at the first flipped image, nor never if none was flipped)."""
    from ddkit.config import load_config
    from ddkit.engine.run import Runner
    from ddkit.engine.train import run_train

    path = tmp_path / "kp.yaml"
    path.write_text(KP_RECIPE.format(out=tmp_path / "out", dataset=json.dumps(unpaired), images=MINI,
                                     teacher=teacher, student=student))
    stage = block.split(".")[0]
    with pytest.raises(ConfigError) as err:
        if command == "run":
            Runner(load_config(path), source=str(path))
        else:
            run_train(load_config(path), stage, source=str(path), progress=False)
    message = str(err.value)
    assert f"{block}.hflip flips keypoints" in message and "\n" not in message
    assert "flip_idx: in a YOLO data.yaml" in message and "dataset option flip_indices" in message
    assert not (tmp_path / "out").exists()
