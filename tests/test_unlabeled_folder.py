"""A folder of images without class sub-folders is unlabeled images: a recipe's unlabeled part (a KD transfer set,
data distillation's images to label), never a part that trains or scores."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from ddkit import ConfigError
from ddkit.config import load_config
from ddkit.engine.run import Runner, run_recipe
from ddkit.plugin_manager import get_registry

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def _image(path: Path, colour: tuple[int, int, int], k: int, size: int = 12) -> None:
    g = torch.Generator().manual_seed(k)
    noise = torch.randint(-25, 26, (size, size, 3), generator=g)
    pixels = (torch.tensor(colour) + noise).clamp(0, 255).to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def folders(tmp_path) -> Path:
    """``train/<colour>/``, ``test/<colour>/`` and ``unlabeled/*.png`` (no sub-folders)."""
    k = 0
    for part, n in (("train", 4), ("test", 2)):
        for name, colour in COLOURS.items():
            for i in range(n):
                k += 1
                _image(tmp_path / part / name / f"{i}.png", colour, k)
    for i, colour in enumerate(list(COLOURS.values()) * 4):
        _image(tmp_path / "unlabeled" / f"u{i:02d}.png", colour, 100 + i, size=16)  # another size: read at train's
    return tmp_path


RECIPE = """
run: {{name: folders, out_dir: "{out}", seed: 0, device: cpu}}
task: {{name: classification}}
data:
  train: {{dataset: {{name: image_folder, root: "{root}/train"}}}}
  unlabeled: {{dataset: {{name: image_folder, root: "{root}/unlabeled"}}}}
  test: {{dataset: {{name: image_folder, root: "{root}/test"}}}}
teacher:
  model: {{name: mlp, hidden: [16]}}
  train: {{iterations: 10, batch_size: 6, lr: 0.05}}
student:
  model: {{name: mlp, hidden: [8]}}
  train: {{iterations: 6, batch_size: 6, lr: 0.05}}
kd:
  variants:
    alone: {{losses: [{{name: hard_label}}]}}
    transfer:
      transfer_set: [labeled, unlabeled]
      losses: [{{name: hard_label, weight: 0.1}}, {{name: soft_target, weight: 0.9}}]
      train: {{teacher_cache: true}}
"""


@pytest.fixture
def recipe(folders) -> Path:
    path = folders / "recipe.yaml"
    path.write_text(RECIPE.format(out=folders / "out", root=folders))
    return path


def test_a_folder_of_images_alone_reads_as_unlabeled_images(folders):
    data = get_registry().build("datasets", {"name": "image_folder", "root": str(folders / "unlabeled")})
    assert len(data) == 12 and data.info.categories == []
    image, target = data[0]
    assert "label" not in target and tuple(image.shape) == (3, 16, 16)


def test_a_kd_transfer_set_distils_on_a_folder_of_unlabeled_images(recipe, train_calls):
    summary = run_recipe(load_config(recipe), source=str(recipe), progress=False)
    labeled, unlabeled = train_calls["kd_transfer"][0]
    assert len(labeled) == 12 and len(unlabeled) == 12
    assert tuple(unlabeled[0][0].shape) == (3, 12, 12)  # read at the train images' size, the model's input
    assert {r["stage"] for r in summary["rows"]} >= {"teacher", "kd_alone", "kd_transfer"}


@pytest.mark.parametrize("override, field", [
    ("data.train.dataset.root={root}/unlabeled", r"data.train.dataset \(.*unlabeled\): its images have no labels"),
    ("data.test.dataset.root={root}/unlabeled", r"data.test.dataset \(.*unlabeled\): its images have no labels"),
    ("baselines.fully_labeled=true", r"baselines.fully_labeled trains on the unlabeled part's hidden labels, but it "
                                     r"has none; set it to false"),
])
def test_a_folder_without_labels_is_refused_where_labels_are_needed(recipe, folders, override, field):
    out = folders / "refused"
    with pytest.raises(ConfigError, match=field):
        Runner(load_config(recipe, [f"run.out_dir={out}", override.format(root=folders)]))
    assert not out.exists()


def test_eval_on_a_folder_without_labels_says_so_in_one_line(recipe, folders, capsys):
    from ddkit.cli import main

    assert main(["run", str(recipe), "kd.variants.transfer=null", "--no-progress"]) == 0
    model = folders / "out" / "kd_alone" / "model.pt"
    capsys.readouterr()
    assert main(["eval", str(model), "--data", str(folders / "unlabeled")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "its images have no labels" in err


def test_data_distillation_labels_a_folder_of_unlabeled_images(recipe):
    cfg = load_config(recipe, ["kd=null", "label={transforms: [{name: identity}], aggregator: {name: prob_mean}, "
                                          "selector: {name: count_match}}"])
    summary = run_recipe(cfg, source=str(recipe), progress=False)
    assert {r["stage"] for r in summary["rows"]} >= {"teacher", "student"}
    selected = json.loads((Path(summary["run_dir"]) / "label" / "summary.json").read_text())
    assert selected["pseudo_labels"] > 0


def test_an_upper_bound_on_a_coco_file_without_one_annotation_is_refused(tmp_path):
    """Its images have ``labels`` (none each): the fully labeled baseline would train on all of them as background."""
    mini = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-val2017-mini"
    coco = json.loads((mini / "test_coco.json").read_text())
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({**coco, "annotations": []}))
    coco8 = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco8"
    recipe = tmp_path / "det.yaml"
    recipe.write_text(f"""
run: {{name: det, out_dir: "{tmp_path / 'out'}", seed: 0, device: cpu}}
task: {{name: detection}}
data:
  train: {{dataset: {{name: yolo, root: "{coco8}", split: train}}}}
  unlabeled: {{dataset: {{name: coco, annotations: "{bare}", images: "{mini}"}}}}
  test: {{dataset: {{name: yolo, root: "{coco8}", split: val}}}}
teacher: {{model: {{name: fasterrcnn, backbone: mobilenet_v3_large}}, train: {{iterations: 1, batch_size: 2}}}}
student: {{model: {{name: fasterrcnn, backbone: mobilenet_v3_large}}, train: {{iterations: 1, batch_size: 2}}}}
baselines: {{fully_labeled: true}}
""")
    with pytest.raises(ConfigError, match=r"baselines.fully_labeled trains on the unlabeled part's hidden labels, but "
                                          r"it has none"):
        Runner(load_config(recipe))
    assert not (tmp_path / "out").exists()
    # with one annotation left it is an upper bound again: the check passes (the models are then built)
    bare.write_text(json.dumps({**coco, "annotations": coco["annotations"][:1]}))
    Runner(load_config(recipe))
