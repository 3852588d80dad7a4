"""Datasets: the real fixtures (COCO, YOLO, MNIST, digits), validation errors, unreadable images, synthetic data,
splits and hidden labels; the contract over every registered dataset."""
from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

import ddkit
from ddkit.engine.data import (ClassesByName, HiddenLabels, build_data, check_images, get_target, item_file,
                               split_dataset)
from ddkit.errors import ConfigError, DataError
from ddkit.testing import example_blocks, registered
from ddkit.testing.datasets import check_dataset

from test_readers_yolo import _copy, _first_label

DATA = Path(__file__).parents[1].parent / "shared" / "data"
COCO_JSON = DATA / "coco-val2017-mini" / "test_coco.json"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="shared/data fixtures are not beside the repository")


@pytest.mark.parametrize("entry", registered("datasets"), ids=lambda e: e.spec.name)
def test_every_registered_dataset_meets_the_contract(entry):
    blocks = example_blocks(entry)
    if not blocks:
        pytest.skip(f"{entry.spec.name} needs files (tested below with a temporary folder)")
    for block in blocks:
        for value in block.values():
            if isinstance(value, str) and "/" in value and not Path(value).exists():
                pytest.skip(f"example path {value} is not here")
        ds = ddkit.build("datasets", {"name": entry.spec.name, **block})
        check_dataset(ds)


# ---------------------------------------------------------------------------------------------------------- COCO
@needs_data
def test_coco_fixture_loads_boxes_and_keypoints():
    ds = ddkit.build("datasets", {"name": "coco", "annotations": str(COCO_JSON)})
    assert len(ds) == 4 and ds.skipped == []
    assert ds.info.num_keypoints == 17 and ds.info.categories == [{"id": 1, "name": "person"}]
    assert ds.info.flip_indices == [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]
    assert ds.info.keypoint_sigmas[0] == pytest.approx(0.026)
    assert sum(len(get_target(ds, i)["boxes"]) for i in range(4)) == 14
    raw = json.loads(COCO_JSON.read_text())
    ann = raw["annotations"][0]
    idx = sorted(im["id"] for im in raw["images"]).index(ann["image_id"])
    t = get_target(ds, idx)
    x, y, w, h = ann["bbox"]
    j = [round(b[0].item(), 2) for b in t["boxes"]].index(round(x, 2))
    torch.testing.assert_close(t["boxes"][j], torch.tensor([x, y, x + w, y + h]))
    torch.testing.assert_close(t["keypoints"][j].reshape(-1), torch.tensor(ann["keypoints"], dtype=torch.float32))
    image, _ = ds[idx]
    assert image.shape[0] == 3 and tuple(image.shape[1:]) == t["size"]


def _bad_coco(tmp_path: Path, mutate) -> Path:
    data = json.loads(COCO_JSON.read_text())
    mutate(data)
    for im in data["images"]:
        src = COCO_JSON.parent / im["file_name"]
        if src.exists():
            shutil.copy(src, tmp_path / im["file_name"])
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return path


@needs_data
@pytest.mark.parametrize("mutate,field", [
    (lambda d: d["annotations"][2].__setitem__("bbox", [10, 10, -5, 20]), "bbox"),
    (lambda d: d["annotations"][2].__setitem__("bbox", [10, 10, 5]), "bbox"),
    (lambda d: d["annotations"][2].__setitem__("category_id", 99), "category_id"),
    (lambda d: d["annotations"][2].__setitem__("keypoints", [0] * 50), "keypoints"),
    (lambda d: d["annotations"][2].__setitem__("image_id", 12345), "image_id"),
])
def test_coco_validation_names_file_annotation_and_field(tmp_path, mutate, field):
    path = _bad_coco(tmp_path, mutate)
    ann_id = json.loads(COCO_JSON.read_text())["annotations"][2]["id"]
    with pytest.raises(DataError) as err:
        ddkit.build("datasets", {"name": "coco", "annotations": str(path)})
    msg = str(err.value)
    assert str(path) in msg and f"annotation id {ann_id}" in msg and field in msg


@needs_data
def test_unreadable_and_missing_images_are_skipped_and_reported(tmp_path, caplog):
    path = _bad_coco(tmp_path, lambda d: None)
    data = json.loads(path.read_text())
    broken, missing = data["images"][0]["file_name"], data["images"][1]["file_name"]
    (tmp_path / broken).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / missing).unlink()
    with caplog.at_level("WARNING"):
        ds = ddkit.build("datasets", {"name": "coco", "annotations": str(path)})
    assert len(ds) == 2
    assert sorted(Path(p).name for p, _ in ds.skipped) == sorted([broken, missing])
    assert "skipped 2 unreadable" in caplog.text
    assert [Path(p).name for p, _ in check_images([tmp_path / broken, tmp_path / data["images"][2]["file_name"]])] \
        == [broken]
    check_dataset(ds)


# ---------------------------------------------------------------------------------------------------------- YOLO
@needs_data
def test_yolo_boxes_and_pose():
    det = ddkit.build("datasets", {"name": "yolo", "root": str(DATA / "coco8"), "split": "train"})
    assert len(det) == 4 and det.info.num_classes == 80 and det.info.num_keypoints is None
    pose = ddkit.build("datasets", {"name": "yolo", "root": str(DATA / "coco8-pose"), "split": "train"})
    assert pose.info.num_keypoints == 17 and pose.info.flip_indices[1] == 2
    first = sorted((DATA / "coco8-pose" / "labels" / "train").glob("*.txt"))[0]
    row = [float(v) for v in first.read_text().split()]
    i = [f.stem for f in pose.files].index(first.stem)
    image, t = pose[i]
    h, w = image.shape[-2:]
    cx, cy, bw, bh = row[1] * w, row[2] * h, row[3] * w, row[4] * h
    torch.testing.assert_close(t["boxes"][0], torch.tensor([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]))
    torch.testing.assert_close(t["keypoints"][0, 0], torch.tensor([row[5] * w, row[6] * h, row[7]]))
    assert sum(len(get_target(pose, k)["boxes"]) for k in range(len(pose))) >= 4


@needs_data
def test_yolo_label_with_wrong_length_is_an_error(tmp_path):
    root = _copy(tmp_path)
    label = _first_label(root)
    label.write_text("0 0.5 0.5 0.2\n")
    with pytest.raises(DataError, match=rf"{label.name}: line 1: 4 values, expected 5"):
        ddkit.build("datasets", {"name": "yolo", "root": str(root)})


@needs_data
def test_the_data_yaml_is_chosen_over_other_yaml_files_and_a_guess_is_refused(tmp_path, caplog):
    """An args.yaml (sorted before data.yaml / coco8.yaml) once replaced the 80 names by numbers, silently."""
    root = _copy(tmp_path)
    (root / "args.yaml").write_text("lr0: 0.01\nmosaic: 1.0\n")
    names = lambda: [c["name"] for c in ddkit.build("datasets", {"name": "yolo", "root": str(root)}).info.categories]
    assert names()[:2] == ["person", "bicycle"]  # the one yaml with names
    (root / "data.yaml").write_text("names: [a, b]\n")
    (root / "labels" / "train").rename(root / "unused")  # background images: any class index is fine
    assert names() == ["a", "b"]  # data.yaml first
    (root / "data.yaml").rename(root / "other.yaml")
    with pytest.raises(DataError, match=r"2 yaml files could be the data yaml \(coco8.yaml, other.yaml\); set the "
                                        r"dataset's data_yaml"):
        names()
    for f in ("coco8.yaml", "other.yaml", "args.yaml"):
        (root / f).unlink()
    with caplog.at_level("WARNING"):
        names()
    assert "no class names" in caplog.text


def _roboflow(tmp_path: Path) -> Path:
    """A Roboflow export: train/images, valid/images, and data.yaml with ``train: ../train/images``."""
    root = tmp_path / "rf"
    for split, part in (("train", "train"), ("val", "valid")):
        shutil.copytree(DATA / "coco8" / "images" / split, root / part / "images")
        shutil.copytree(DATA / "coco8" / "labels" / split, root / part / "labels")
    (root / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\nnc: 80\nnames: "
                                    + json.dumps([f"c{i}" for i in range(80)]) + "\n")
    return root


@needs_data
def test_yolo_splits_follow_the_data_yaml_as_ultralytics_resolves_them(tmp_path):
    root = _roboflow(tmp_path)
    for block in ({"root": str(root)}, {"data_yaml": str(root / "data.yaml")}):
        val = ddkit.build("datasets", {"name": "yolo", "split": "val", **block})
        assert [f.parent for f in val.files] == [root / "valid" / "images"] * 4
        ref = ddkit.build("datasets", {"name": "yolo", "root": str(DATA / "coco8"), "split": "val"})
        assert [len(t["boxes"]) for t in val.targets] == [len(t["boxes"]) for t in ref.targets] \
            and sum(len(t["boxes"]) for t in val.targets) > 0
        assert val.info.categories[1]["name"] == "c1"
    # an image list (paths ./ relative to the list), and path: relative to the yaml's folder
    (root / "sub").mkdir()
    (root / "sub" / "list.txt").write_text("".join(f"./../train/images/{f.name}\n"
                                                    for f in sorted((root / "train" / "images").iterdir())[:2]))
    (root / "other.yaml").write_text("path: sub\ntrain: list.txt\nnames: " + json.dumps(list(range(80))) + "\n")
    listed = ddkit.build("datasets", {"name": "yolo", "data_yaml": str(root / "other.yaml"), "check_images": False})
    assert len(listed) == 2 and all(len(t["boxes"]) for t in listed.targets)
    with pytest.raises(DataError, match=r"data.yaml: field test: .* does not exist; fix 'test:'"):
        (root / "data.yaml").write_text((root / "data.yaml").read_text() + "test: ../test/images\n")
        ddkit.build("datasets", {"name": "yolo", "data_yaml": str(root / "data.yaml"), "split": "test"})
    with pytest.raises(ConfigError, match="set root .* or data_yaml"):
        ddkit.build("datasets", {"name": "yolo", "split": "val"})


@needs_data
def test_yolo_polygon_rows_are_their_enclosing_boxes(tmp_path):
    """YOLO-seg / Roboflow polygon rows in a detect dataset, as Ultralytics' segments2boxes reads them."""
    root = _copy(tmp_path)
    label = _first_label(root)
    label.write_text("3 0.1 0.1 0.3 0.1 0.3 0.4 0.1 0.4\n0 0.5 0.5 0.2 0.2\n")
    ds = ddkit.build("datasets", {"name": "yolo", "root": str(root)})
    i = [f.stem for f in ds.files].index(label.stem)
    h, w = ds.targets[i]["size"]
    torch.testing.assert_close(ds.targets[i]["boxes"][0], torch.tensor([0.1 * w, 0.1 * h, 0.3 * w, 0.4 * h]))
    assert ds.targets[i]["labels"].tolist() == [3, 0]
    label.write_text("0 0.1 0.1 0.3 0.1 0.3 0.4 0.1\n")
    with pytest.raises(DataError, match=rf"{label.name}: line 1: polygon row with an odd count of coordinates \(7\)"):
        ddkit.build("datasets", {"name": "yolo", "root": str(root)})
    label.write_text("0 0.1 0.1 0.3 0.1 0.3\n")
    with pytest.raises(DataError, match=rf"{label.name}: line 1: 6 values, expected 5"):
        ddkit.build("datasets", {"name": "yolo", "root": str(root)})


# ------------------------------------------------------------------------------------------------- image folder
def test_image_folder(tmp_path, caplog):
    from PIL import Image

    for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        for k in range(3):
            Image.new("RGB", (10 + k, 8), color).save(tmp_path / cls / f"{k}.png")
    (tmp_path / "dog" / "broken.png").write_bytes(b"nope")
    ds = ddkit.build("datasets", {"name": "image_folder", "root": str(tmp_path), "image_size": [8, 8]})
    assert len(ds) == 6 and len(ds.skipped) == 1
    assert [c["name"] for c in ds.info.categories] == ["cat", "dog"]
    check_dataset(ds)
    image, target = ds[5]
    assert target["label"] == 1 and image.shape == (3, 8, 8) and image[2].mean() > 0.9
    with caplog.at_level("INFO", logger="ddkit.data"):  # no size given: the first image's, said once
        first = ddkit.build("datasets", {"name": "image_folder", "root": str(tmp_path)})
    assert first[5][0].shape == (3, 8, 10) and "resized to the first one's, 8 x 10" in caplog.text



def _class_folders(root: Path, classes: dict[str, int]) -> None:
    """``root/<class>/<k>.png``, ``classes[name]`` small images each (an empty folder for 0)."""
    from PIL import Image

    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for k in range(count):
            Image.new("RGB", (4, 4), (40 * k, 0, 0)).save(root / name / f"{k}.png")


def _folder_part(root: Path) -> dict:
    return {"dataset": {"name": "image_folder", "root": str(root)}}


def test_test_folder_classes_follow_class_names_not_positions(tmp_path):
    _class_folders(tmp_path / "train", {"cat": 2, "dog": 2, "eight": 2, "zebra": 2})
    _class_folders(tmp_path / "val", {"cat": 1, "dog": 2, "zebra": 3})  # no 'eight': a subset, mapped by name
    splits = build_data({"train": _folder_part(tmp_path / "train"), "test": _folder_part(tmp_path / "val"),
                         "unlabeled": _folder_part(tmp_path / "val")})
    names = {c["id"]: c["name"] for c in splits.info.categories}
    for part in (splits.test, splits.unlabeled.ground_truth):
        assert part.info.categories == splits.info.categories
        folders = [Path(f).parent.name for f in part.dataset.files]
        assert [names[get_target(part, i)["label"]] for i in range(len(part))] == folders
        assert [names[part[i][1]["label"]] for i in range(len(part))] == folders
    same = build_data({"train": _folder_part(tmp_path / "train"), "test": _folder_part(tmp_path / "train")})
    assert not isinstance(same.test, ClassesByName)  # the same classes under the same ids: read as it is


def test_test_folder_with_a_class_the_training_lacks_is_refused(tmp_path):
    _class_folders(tmp_path / "train", {"cat": 2, "dog": 2})
    _class_folders(tmp_path / "val", {"cat": 1, "cow": 1, "dog": 1})
    with pytest.raises(ConfigError) as err:
        build_data({"train": _folder_part(tmp_path / "train"), "test": _folder_part(tmp_path / "val")})
    message = str(err.value)
    assert "\n" not in message and message.startswith("data.test.dataset")
    assert "'cow'" in message and "train part's classes (cat, dog)" in message


def _sized_folders(root: Path, sizes: dict[str, list[tuple[int, int]]], mode: str = "RGB") -> None:
    """``root/<class>/<k>.png`` of the ``(width, height)`` sizes given per class, of noise (a resize shows)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, whs in sizes.items():
        (root / name).mkdir(parents=True)
        for k, (w, h) in enumerate(whs):
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).convert(mode).save(root / name / f"{k}.png")


def test_test_and_unlabeled_folders_are_read_once_at_the_train_folders_shape(tmp_path, caplog):
    """The train folder is grey 6 x 6; the test folder is RGB and its first image is 20 x 12, so on its own it reads
    at [3, 12, 20]: it is read at [1, 6, 6] instead, each file resized once (as adapt_image does the train ones)."""
    from ddkit.engine.data import adapt_image, read_image

    _sized_folders(tmp_path / "train", {"cat": [(6, 6)] * 2, "dog": [(6, 6)] * 2}, mode="L")
    _sized_folders(tmp_path / "val", {"cat": [(20, 12), (9, 7)], "dog": [(5, 11)]})
    train = {"dataset": {"name": "image_folder", "root": str(tmp_path / "train"), "grayscale": True}}
    shutil.copytree(tmp_path / "val", tmp_path / "unl")
    splits = build_data({"train": train, "test": _folder_part(tmp_path / "val"),
                         "unlabeled": _folder_part(tmp_path / "unl")})
    assert splits.info.extra["image_shape"] == [1, 6, 6] and not any("ignored" in w for w in splits.warnings)
    assert "resized to the first one's" not in caplog.text  # no first image's size: the train part's
    for part in (splits.test, splits.unlabeled.ground_truth, splits.unlabeled):
        assert part.info.extra["image_shape"] == [1, 6, 6]
        for i in range(3):
            assert torch.equal(part[i][0], adapt_image(read_image(item_file(part, i)), [1, 6, 6]))
    explicit = {"dataset": {**_folder_part(tmp_path / "val")["dataset"], "image_size": [12, 20], "grayscale": False}}
    with caplog.at_level("WARNING", logger="ddkit.data"):
        said = build_data({"train": train, "test": explicit}, where="r.yaml: data")
    assert said.test[0][0].shape == (1, 6, 6)  # a model is scored at its training input, as the warning says
    assert said.warnings[0] == ("r.yaml: data.test.dataset: image_size: [12, 20], grayscale: false ignored; its "
                                "images are read at the train part's image shape [1, 6, 6] (C, H, W), as the "
                                "model sees them in training; remove image_size, grayscale there to silence this")
    assert said.warnings[0] in caplog.text


def test_a_test_part_that_cannot_be_read_at_a_shape_is_converted_to_the_train_parts(tmp_path):
    """The bundled 8 x 8 digits (no ``read_at``) as the test part of a 12 x 12 RGB folder: its items are converted."""
    from ddkit.engine.data import adapt_image

    _sized_folders(tmp_path / "train", {str(d): [(12, 12)] for d in range(10)})
    splits = build_data({"train": _folder_part(tmp_path / "train"), "test": {"dataset": {"name": "digits"}}})
    digits = ddkit.build("datasets", {"name": "digits"})
    assert splits.test.info.extra["image_shape"] == [3, 12, 12]
    assert torch.equal(splits.test[5][0], adapt_image(digits[5][0], [3, 12, 12]))
    assert get_target(splits.test, 5) == get_target(digits, 5)


def test_a_folder_of_mixed_sizes_without_image_size_warns_once(tmp_path, caplog):
    _sized_folders(tmp_path / "same", {"cat": [(7, 5)] * 3})
    _sized_folders(tmp_path / "mixed", {"cat": [(7, 5), (7, 5)], "dog": [(7, 5), (9, 9), (3, 3)]})
    with caplog.at_level("INFO", logger="ddkit.data"):
        same = ddkit.build("datasets", {"name": "image_folder", "root": str(tmp_path / "same")})
    assert same[0][0].shape == (3, 5, 7)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="ddkit.data"):
        ddkit.build("datasets", {"name": "image_folder", "root": str(tmp_path / "mixed")})
        ddkit.build("datasets", {"name": "image_folder", "root": str(tmp_path / "mixed"), "image_size": [5, 7]})
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "resized to the first one's, 5 x 7 (H x W; dog/1.png is 9 x 9)" in caplog.text


def test_image_folder_skips_hidden_folders_and_refuses_empty_class_folders(tmp_path):
    _class_folders(tmp_path / "a", {"cat": 2, "dog": 1, ".ipynb_checkpoints": 0})
    ds = ddkit.build("datasets", {"name": "image_folder", "root": str(tmp_path / "a")})
    assert [c["name"] for c in ds.info.categories] == ["cat", "dog"] and len(ds) == 3
    _class_folders(tmp_path / "b", {"cat": 2, "dog": 0})
    (tmp_path / "b" / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=rf"class folder {tmp_path / 'b' / 'dog'} has no images"):
        ddkit.build("datasets", {"name": "image_folder", "root": str(tmp_path / "b")})


def test_data_folder_errors_name_the_recipe_field(tmp_path):
    (tmp_path / "emptyd").mkdir()
    _class_folders(tmp_path / "train", {"cat": 1, "dog": 1})
    for key, root, says in (("train", tmp_path / "emptyd", "no class sub-folders"),
                            ("test", tmp_path / "nowhere", "no such folder")):
        parts = {"train": _folder_part(tmp_path / "train"), key: _folder_part(root)}
        with pytest.raises(DataError) as err:
            build_data(parts)
        assert str(err.value).startswith(f"data.{key}.dataset: root {root}: {says}"), str(err.value)
    with pytest.raises(DataError, match=rf"^data.dataset: root {tmp_path / 'emptyd'}: no class sub-folders"):
        build_data({"dataset": {"name": "image_folder", "root": str(tmp_path / "emptyd")}})

# ----------------------------------------------------------------------------------------------- bundled digits
def test_mnist5k_is_the_real_digits_with_a_stratified_split():
    ds = ddkit.build("datasets", {"name": "mnist5k"})
    assert len(ds) == 5000 and ds[0][0].shape == (1, 28, 28)
    assert Counter(get_target(ds, i)["label"] for i in range(5000)) == Counter({c: 500 for c in range(10)})
    train = ddkit.build("datasets", {"name": "mnist5k", "split": "train"})
    test = ddkit.build("datasets", {"name": "mnist5k", "split": "test"})
    assert len(train) == 4000 and len(test) == 1000
    assert Counter(get_target(test, i)["label"] for i in range(1000)) == Counter({c: 100 for c in range(10)})
    assert not {get_target(train, i)["image_id"] for i in range(4000)} & \
        {get_target(test, i)["image_id"] for i in range(1000)}
    # a real digit: ink in the middle, blank corners
    img = ds[2500][0][0]
    assert img[10:18, 10:18].mean() > img[:4, :4].mean() + 0.05


def test_digits():
    ds = ddkit.build("datasets", {"name": "digits"})
    assert len(ds) == 1797 and ds[0][0].shape == (1, 8, 8) and float(ds[0][0].max()) <= 1.0


# -------------------------------------------------------------------------------------------------- synthetic
def test_synthetic_shapes_are_deterministic_and_boxes_enclose_the_shapes():
    a = ddkit.build("datasets", {"name": "synthetic_shapes", "num_images": 5, "image_size": 64, "max_object": 30})
    b = ddkit.build("datasets", {"name": "synthetic_shapes", "num_images": 5, "image_size": 64, "max_object": 30})
    for i in range(5):
        ia, ta = a[i]
        ib, tb = b[i]
        assert torch.equal(ia, ib) and torch.equal(ta["boxes"], tb["boxes"])
        bg = ia[:, 0, 0]
        for box in ta["boxes"].long():
            x0, y0, x1, y1 = box.tolist()
            inside = ia[:, y0:y1, x0:x1]
            assert (inside - bg[:, None, None]).abs().amax() > 0.2  # the shape's colour is there
    c = ddkit.build("datasets", {"name": "synthetic_shapes", "num_images": 5, "seed": 1})
    assert not torch.equal(c[0][0], ddkit.build("datasets", {"name": "synthetic_shapes", "num_images": 5})[0][0])


def test_synthetic_figures_keypoints_flip_consistently():
    ds = ddkit.build("datasets", {"name": "synthetic_figures", "num_images": 3})
    task = ddkit.build("tasks", "keypoints")
    image, t = ds[0]
    kps = t["keypoints"][0]
    assert kps[2, 0] > kps[3, 0]  # the figure's left hand is on the image's right
    flipped, ft = task.hflip(image, t, ds.info)
    fk = ft["keypoints"][0]
    assert fk[2, 0] > fk[3, 0]  # still true after a flip: left/right labels were swapped
    torch.testing.assert_close(fk[3, 0], image.shape[-1] - kps[2, 0])
    torch.testing.assert_close(ft["boxes"][0, 0], image.shape[-1] - t["boxes"][0, 2])


# ------------------------------------------------------------------------------------------------------ splits
def test_split_is_stratified_deterministic_and_hides_unlabeled_labels():
    ds = ddkit.build("datasets", {"name": "digits"})
    a = split_dataset(ds, labeled=0.1, unlabeled=0.7, test=0.2, seed=0)
    b = split_dataset(ds, labeled=0.1, unlabeled=0.7, test=0.2, seed=0)
    c = split_dataset(ds, labeled=0.1, unlabeled=0.7, test=0.2, seed=1)
    assert a.labeled.indices == b.labeled.indices and a.labeled.indices != c.labeled.indices
    parts = [set(a.labeled.indices), set(a.unlabeled.ground_truth.indices), set(a.test.indices)]
    assert sum(map(len, parts)) == len(ds) and not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    per_class = Counter(get_target(a.labeled, i)["label"] for i in range(len(a.labeled)))
    full = Counter(get_target(ds, i)["label"] for i in range(len(ds)))
    for cls, n in full.items():
        assert abs(per_class[cls] - 0.1 * n) <= 1
    assert isinstance(a.unlabeled, HiddenLabels)
    image, target = a.unlabeled[0]
    assert set(target) == {"image_id"} and "label" in a.unlabeled.ground_truth[0][1]


def test_build_data_layouts_and_errors():
    s = build_data({"dataset": {"name": "digits"}, "split": {"labeled": 0.5, "test": 0.5}})
    assert s.unlabeled is None and len(s.labeled) + len(s.test) == 1797
    t = build_data({"train": {"dataset": {"name": "digits", "split": "train"}},
                    "test": {"dataset": {"name": "digits", "split": "test"}}})
    assert len(t.labeled) + len(t.test) == 1797
    with pytest.raises(ConfigError, match="unknown key 'labelled'"):
        build_data({"dataset": {"name": "digits"}, "split": {"labelled": 0.5}})
    with pytest.raises(ConfigError, match="sum to at most 1"):
        build_data({"dataset": {"name": "digits"}, "split": {"labeled": 0.8, "test": 0.5}})


# ------------------------------------------------------------------------------------------------ image reading
@pytest.mark.parametrize("wide", ["png16", "tif32"])
def test_wide_grey_images_read_as_their_8_bit_copy(tmp_path, wide):
    import numpy as np
    from PIL import Image

    from ddkit.engine.data import read_image

    pixels = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    Image.fromarray(pixels).save(tmp_path / "a8.png")
    if wide == "png16":
        Image.fromarray(pixels.astype(np.uint16) * 257).save(tmp_path / "wide.png")  # mode I;16
    else:
        Image.fromarray(pixels.astype(np.int32) * 257).save(tmp_path / "wide.tif")  # mode I (32-bit)
    path = next(tmp_path.glob("wide.*"))
    assert Image.open(path).mode == ("I;16" if wide == "png16" else "I")
    eight, image = read_image(tmp_path / "a8.png"), read_image(path)
    assert image.shape == eight.shape == (3, 6, 8) and image.dtype == torch.float32
    torch.testing.assert_close(image, eight, atol=1e-6, rtol=0)
    assert 0.4 < float(image.mean()) < 0.5  # not all white


def test_no_progress_hides_the_checking_images_bar_and_is_undone_after_the_command(tmp_path, monkeypatch):
    """``--no-progress`` reaches the bar that datasets draw deep below the command, for that command only."""
    from types import SimpleNamespace

    import tqdm.auto

    from ddkit.cli import main
    from ddkit.engine.data import NO_PROGRESS_ENV

    bars = []
    real = tqdm.auto.tqdm
    monkeypatch.setattr(tqdm.auto, "tqdm", lambda *a, **k: bars.append(k.get("desc")) or real(*a, **k))
    seen = {}

    def command(args):
        seen["env"] = os.environ.get(NO_PROGRESS_ENV)
        check_images([], progress=True)
        return 0

    monkeypatch.setattr("ddkit.cli._parse", lambda argv: SimpleNamespace(_run=command, command="x",
                                                                         no_progress="--no-progress" in argv))
    assert main(["x", "--no-progress"]) == 0 and seen["env"] == "1" and bars == []
    assert NO_PROGRESS_ENV not in os.environ
    assert main(["x"]) == 0 and seen["env"] is None and bars == ["checking images"]


@needs_data
def test_a_coco_width_that_is_not_the_files_is_refused_naming_both(tmp_path):
    """detectron2 refuses a JSON size that is not the image's: boxes would be clipped to the wrong frame."""
    path = _bad_coco(tmp_path, lambda d: d["images"][1].__setitem__("width", 100))
    name = json.loads(path.read_text())["images"][1]["file_name"]
    with pytest.raises(DataError, match=rf"1 image\(s\) .* {name} \(JSON 100x\d+, file \d+x\d+\).*'width'"):
        ddkit.build("datasets", {"name": "coco", "annotations": str(path)})
    assert len(ddkit.build("datasets", {"name": "coco", "annotations": str(_bad_coco(tmp_path, lambda d: None))})) == 4


# --------------------------------------------------------------------------------------------- EXIF orientation
def _exif_jpeg(path: Path, orientation: int = 6, size: tuple[int, int] = (40, 20)) -> Path:
    """A JPEG stored ``size`` (W x H) wide with an EXIF Orientation tag; the left half dark, the right half light."""
    import numpy as np
    from PIL import Image

    w, h = size
    pixels = np.zeros((h, w, 3), dtype=np.uint8)
    pixels[:, w // 2:] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif, quality=100)
    return path


def test_read_image_applies_the_exif_orientation(tmp_path):
    """Ultralytics, detectron2 and annotation tools use the displayed frame (ImageOps.exif_transpose)."""
    import numpy as np
    from PIL import Image, ImageOps

    from ddkit.engine.data import image_size, read_image

    for orientation in range(1, 9):
        p = _exif_jpeg(tmp_path / f"o{orientation}.jpg", orientation)
        want = np.asarray(ImageOps.exif_transpose(Image.open(p)).convert("RGB"))
        got = read_image(p)
        np.testing.assert_array_equal((got.permute(1, 2, 0) * 255).round().byte().numpy(), want)
        assert image_size(p) == (want.shape[1], want.shape[0])  # header only, same frame
    assert tuple(read_image(tmp_path / "o6.jpg").shape) == (3, 40, 20)


def test_yolo_labels_land_on_the_exif_transposed_frame(tmp_path):
    root = tmp_path / "y"
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    _exif_jpeg(root / "images" / "train" / "a.jpg", 6, (40, 20))  # displayed 20 wide, 40 high
    (root / "labels" / "train" / "a.txt").write_text("0 0.5 0.25 0.5 0.5\n")
    ds = ddkit.build("datasets", {"name": "yolo", "root": str(root)})
    image, t = ds[0]
    assert tuple(image.shape[1:]) == t["size"] == (40, 20)
    torch.testing.assert_close(t["boxes"][0], torch.tensor([5.0, 0.0, 15.0, 20.0]))


def test_a_coco_file_giving_the_exif_transposed_size_is_accepted(tmp_path):
    _exif_jpeg(tmp_path / "a.jpg", 6, (40, 20))
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 20, "height": 40}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 30, 10, 8], "area": 80,
                             "iscrowd": 0}],
            "categories": [{"id": 1, "name": "thing"}]}
    path = tmp_path / "a.json"
    path.write_text(json.dumps(coco))
    ds = ddkit.build("datasets", {"name": "coco", "annotations": str(path)})
    image, t = ds[0]
    assert tuple(image.shape[1:]) == (40, 20)
    torch.testing.assert_close(t["boxes"][0], torch.tensor([2.0, 30.0, 12.0, 38.0]))
    coco["images"][0].update(width=40, height=20)  # the stored frame: refused
    path.write_text(json.dumps(coco))
    with pytest.raises(DataError, match=r"a.jpg \(JSON 40x20, file 20x40\)"):
        ddkit.build("datasets", {"name": "coco", "annotations": str(path)})


def test_every_image_is_decoded_by_the_one_reader(tmp_path):
    """Predict, label sources, image folders and datasets all read through read_image / image_size (so all apply
    the EXIF orientation): no other module opens image files itself."""
    from ddkit.engine.label.sources import FolderSource

    repo = Path(__file__).parents[1]
    openers = sorted(str(p.relative_to(repo)) for d in ("ddkit", "plugins", "integrations")
                     for p in (repo / d).rglob("*.py") if "tests" not in p.parts
                     and any(s in p.read_text() for s in ("Image.open(", "cv2.imread", "decode_image(")))
    assert openers == ["ddkit/engine/data.py"]
    _exif_jpeg(tmp_path / "a.jpg", 6, (40, 20))
    assert tuple(FolderSource(tmp_path).load(0).image.shape) == (3, 40, 20)
