"""The README's bring-your-own-data recipes, run as written (tiny schedules, small images) on the real fixtures in
../shared/data, with "pretrained" weights found in a torch hub cache this test fills (never the network). The
detection recipe's YOLO-format pseudo-labels are read back by ddkit's own YOLO reader."""
from __future__ import annotations

import json
import re
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from ddkit.cli import main
from ddkit.engine.data import get_target
from ddkit_plugins.datasets import YoloDataset
from ddkit_plugins.pretrained import torch_hub_cache_file

REPO = Path(__file__).resolve().parents[1]
TINY = ["teacher.train.iterations=2", "student.train.iterations=2", "teacher.train.batch_size=2",
        "student.train.batch_size=2", "teacher.model.min_size=64", "teacher.model.max_size=96",
        "student.model.min_size=64", "student.model.max_size=96", "label.transforms=[{name: identity}, {name: hflip}]",
        "label.selector={name: top_k, k: 3}", "teacher.model.score_thresh=0.001",  # a 2-iteration teacher
        *(f"{who}.model.{k}" for who in ("teacher", "student")
          for k in ("rpn_post_nms_top_n_train=100", "rpn_post_nms_top_n_test=30", "box_batch_size_per_image=32",
                    "representation_size=64")),
        "--no-progress"]
SMALL_KEYPOINT_HEAD = ["teacher.model.keypoint_head=[32]", "student.model.keypoint_head=[32]"]


def readme_recipes() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Bring your own data"):text.index("## Results")]
    return re.findall(r"```yaml\n(.*?)```", section, re.S)


@pytest.fixture
def torch_cache(tmp_path, monkeypatch):
    """The torch hub cache holding (random) weights under the file names torchvision downloads."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("offline (test)")))
    models = torchvision.models
    torch.manual_seed(0)
    for weights, model in [
            (models.detection.FasterRCNN_MobileNet_V3_Large_FPN_Weights.DEFAULT,
             models.detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None)),
            (models.MobileNet_V3_Large_Weights.DEFAULT, models.mobilenet_v3_large(weights=None)),
            (models.ResNet18_Weights.DEFAULT, models.resnet18(weights=None))]:
        path = torch_hub_cache_file(weights.url)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)


def _run(tmp_path: Path, index: int, monkeypatch, *extra: str) -> Path:
    recipe = tmp_path / f"byod{index}.yaml"
    recipe.write_text(readme_recipes()[index])
    assert len(recipe.read_text().splitlines()) < 20  # the README promises short recipes
    monkeypatch.chdir(REPO)  # the recipes name ../shared/data relative to the repository
    out = tmp_path / "run"
    assert main(["run", str(recipe), f"run.out_dir={out}", *TINY, *extra]) == 0
    assert (out / "results.md").is_file() and (out / "report.html").is_file()
    return out


@pytest.mark.slow
def test_readme_detection_recipe_writes_coco_and_yolo_pseudo_labels(tmp_path, torch_cache, monkeypatch):
    out = _run(tmp_path, 0, monkeypatch)
    teacher = torch.load(out / "teacher" / "model.pt", weights_only=True)
    assert teacher["model_cfg"]["pretrained"] is True
    pseudo = json.loads((out / "label" / "pseudo_labels.json").read_text())
    assert pseudo["annotations"]
    back = YoloDataset(str(out / "label" / "yolo"), split="pseudo")
    by_file = {Path(im["file_name"]).name: im["id"] for im in pseudo["images"]}
    anns: dict[int, list] = {}
    for a in pseudo["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    assert len(back) == len(pseudo["images"])
    for i in range(len(back)):
        target = get_target(back, i)
        mine = sorted(anns.get(by_file[Path(back.files[i]).name], []), key=lambda a: a["bbox"])
        boxes = sorted(target["boxes"].tolist())
        assert len(boxes) == len(mine)
        for (x0, y0, x1, y1), a in zip(boxes, mine):
            assert [x0, y0, x1 - x0, y1 - y0] == pytest.approx(a["bbox"], abs=0.05)  # txt rounding
        assert sorted(target["labels"].tolist()) == sorted(a["category_id"] for a in mine)


@pytest.mark.slow
def test_readme_keypoint_recipe_runs(tmp_path, torch_cache, monkeypatch):
    out = _run(tmp_path, 1, monkeypatch, *SMALL_KEYPOINT_HEAD)
    pseudo = json.loads((out / "label" / "pseudo_labels.json").read_text())
    assert pseudo["annotations"] and all(len(a["keypoints"]) == 17 * 3 for a in pseudo["annotations"])


@pytest.fixture
def timm_cache(tmp_path, monkeypatch):
    """timm's Hugging Face cache holding (random) weights of the recipe's student, in the hub's own layout."""
    import safetensors.torch as safetensors_torch
    import timm
    from huggingface_hub import constants

    hub = tmp_path / "hf"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    name, commit = "mobilenetv3_small_050.lamb_in1k", "0123456789abcdef0123456789abcdef01234567"
    repo = hub / f"models--timm--{name}"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    state = timm.create_model(name, pretrained=False).state_dict()
    safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()},
                                repo / "snapshots" / commit / "model.safetensors")


@pytest.mark.slow
def test_readme_classification_recipe_runs_on_class_folders(tmp_path, torch_cache, timm_cache, monkeypatch):
    """Class folders of real coco8 photos (different sizes); the test folder holds one class of the two."""
    import shutil

    coco8 = REPO.parent / "shared" / "data" / "coco8" / "images"
    data = tmp_path / "my_data"
    photos = sorted((coco8 / "train").glob("*.jpg")) + sorted((coco8 / "val").glob("*.jpg"))
    for i, photo in enumerate(photos[:6]):
        (data / "train" / ("animal", "thing")[i % 2]).mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, data / "train" / ("animal", "thing")[i % 2])
    (data / "val" / "thing").mkdir(parents=True)
    shutil.copy(photos[6], data / "val" / "thing")
    overrides = [f"data.train.dataset.root={data / 'train'}", f"data.test.dataset.root={data / 'val'}",
                 "data.train.dataset.image_size=[32, 32]", "data.test.dataset.image_size=[32, 32]",
                 "label.images=../shared/data/coco8-pose/images/train", "teacher.train.iterations=2",
                 "student.train.iterations=2", "teacher.train.batch_size=2", "student.train.batch_size=2",
                 "--no-progress"]
    recipe = tmp_path / "byod2.yaml"
    recipe.write_text(readme_recipes()[2])
    assert len(recipe.read_text().splitlines()) < 20
    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    assert main(["run", str(recipe), f"run.out_dir={out}", *overrides]) == 0
    assert (out / "results.md").is_file()
    student = torch.load(out / "student" / "model.pt", weights_only=True)
    assert student["model_cfg"]["name"] == "timm" and student["model_cfg"]["pretrained"] is True
    pseudo = json.loads((out / "label" / "pseudo_labels.json").read_text())
    assert len(pseudo["images"]) == 4 and {c["name"] for c in pseudo["categories"]} == {"animal", "thing"}
