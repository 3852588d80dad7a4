"""YOLO-format pseudo-labels (ddkit.engine.yolo_export): the written dataset read back by ddkit's own YOLO reader (and by
Ultralytics' when installed) gives the same instances; images linked or copied; data.yaml with names, kpt_shape,
flip_idx and the stated ratio; a failed write leaves nothing half-written."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import ddkit
from ddkit.engine.data import get_target
from ddkit.engine.yolo_export import MARKER, write_yolo_dataset, yolo_rows
from ddkit.errors import ConfigError, DataError
from ddkit.types import DatasetInfo

DATA = Path(__file__).parents[1].parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not (DATA / "coco8").is_dir(), reason="shared/data fixtures are not here")


def _as_pseudo(ds, keypoints: bool) -> tuple[dict, dict]:
    """The COCO pseudo-label dict ``ddkit label`` would write for ``ds``'s targets, and its image paths."""
    images, anns, paths = [], [], {}
    for i in range(len(ds)):
        t = get_target(ds, i)
        h, w = t["size"]
        iid = 100 + i
        images.append({"id": iid, "file_name": ds.files[i].name, "height": h, "width": w, "ddkit_index": i})
        paths[iid] = ds.files[i]
        for j, (b, c) in enumerate(zip(t["boxes"].tolist(), t["labels"].tolist())):
            ann = {"id": len(anns) + 1, "image_id": iid, "category_id": int(c), "score": 0.9,
                   "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]}
            if keypoints:
                ann["keypoints"] = [round(v, 3) for v in t["keypoints"][j].reshape(-1).tolist()]
            anns.append(ann)
    cats = [dict(c) for c in ds.info.categories]
    return {"info": {}, "categories": cats, "images": images, "annotations": anns}, paths


def _same_instances(src, out, keypoints: bool) -> None:
    assert sorted(f.name for f in out.files) == sorted(f.name for f in src.files)
    for i, f in enumerate(src.files):
        j = [g.name for g in out.files].index(f.name)
        a, b = get_target(src, i), get_target(out, j)
        assert a["size"] == b["size"]
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(b["boxes"], a["boxes"], atol=2e-3, rtol=0)
        if keypoints:
            torch.testing.assert_close(b["keypoints"][..., 2], a["keypoints"][..., 2])
            torch.testing.assert_close(b["keypoints"][..., :2], a["keypoints"][..., :2], atol=2e-3, rtol=0)


@pytest.mark.parametrize("root,keypoints", [("coco8", False), ("coco8-pose", True)])
def test_round_trip_through_ddkits_yolo_reader(tmp_path, root, keypoints):
    src = ddkit.build("datasets", {"name": "yolo", "root": str(DATA / root), "split": "train"})
    pseudo, paths = _as_pseudo(src, keypoints)
    data_yaml = write_yolo_dataset(pseudo, paths, tmp_path / "yolo", info=src.info)
    out = ddkit.build("datasets", {"name": "yolo", "root": str(tmp_path / "yolo"), "split": "pseudo"})
    _same_instances(src, out, keypoints)
    assert out.info.categories == src.info.categories
    assert out.info.num_keypoints == src.info.num_keypoints and out.info.flip_indices == src.info.flip_indices
    text = data_yaml.read_text()
    assert text.startswith(MARKER) and "pseudo: 4 images" in text
    assert all((tmp_path / "yolo" / "images" / "pseudo" / f.name).is_symlink() for f in src.files)


def test_labeled_merge_copies_and_states_the_ratio(tmp_path):
    import yaml

    lab_ds = ddkit.build("datasets", {"name": "yolo", "root": str(DATA / "coco8-pose"), "split": "train"})
    unl_ds = ddkit.build("datasets", {"name": "yolo", "root": str(DATA / "coco8-pose"), "split": "val"})
    labeled, lab_paths = _as_pseudo(lab_ds, True)
    pseudo, paths = _as_pseudo(unl_ds, True)
    pseudo["annotations"] = pseudo["annotations"][:3]  # the teacher found fewer people
    path = write_yolo_dataset(pseudo, paths, tmp_path / "y", info=lab_ds.info, images="copy", labeled=labeled,
                              labeled_paths=lab_paths, mix_ratio=0.6)
    meta = yaml.safe_load(path.read_text())
    assert meta["train"] == ["images/labeled", "images/pseudo"] and meta["val"] == "images/labeled"
    assert meta["kpt_shape"] == [17, 3] and meta["flip_idx"] == lab_ds.info.flip_indices
    assert meta["names"] == {0: "person"} and meta["ddkit_category_ids"] == [0]
    text = path.read_text()
    assert "labeled : pseudo-labeled = 0.50 : 0.50" in text and "labeled : pseudo = 0.6 : 0.4 per batch" in text
    files = list((tmp_path / "y" / "images").rglob("*.jpg"))
    assert len(files) == 8 and not any(f.is_symlink() for f in files)
    back = ddkit.build("datasets", {"name": "yolo", "root": str(tmp_path / "y"), "split": "labeled"})
    _same_instances(lab_ds, back, True)
    unl = ddkit.build("datasets", {"name": "yolo", "root": str(tmp_path / "y"), "split": "pseudo"})
    assert sum(len(get_target(unl, i)["boxes"]) for i in range(len(unl))) == 3  # empty images stay as background
    skip = write_yolo_dataset(pseudo, paths, tmp_path / "y", info=lab_ds.info, skip_empty=True)  # rewrite in place
    assert not (tmp_path / "y" / "images" / "labeled").exists()
    n = len(list((tmp_path / "y" / "labels" / "pseudo").glob("*.txt")))
    assert n == len({a["image_id"] for a in pseudo["annotations"]}) and skip.is_file()


def test_yolo_rows_by_hand():
    anns = [{"category_id": 7, "bbox": [10, 20, 30, 40], "keypoints": [25, 40, 2, 0, 0, 0]}]
    rows = yolo_rows(anns, (200, 100), {7: 3}, 2)
    assert rows == ["3 0.250000 0.200000 0.300000 0.200000 0.250000 0.200000 2 0 0 0"]
    assert yolo_rows(anns, (200, 100), {7: 0}, None) == ["0 0.250000 0.200000 0.300000 0.200000"]


def test_category_ids_map_to_class_indices(tmp_path):
    from PIL import Image

    Image.new("RGB", (50, 40)).save(tmp_path / "a.png")
    info = DatasetInfo(categories=[{"id": 3, "name": "cat"}, {"id": 17, "name": "dog"}])
    pseudo = {"categories": info.categories, "images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 50}],
              "annotations": [{"id": 1, "image_id": 1, "category_id": 17, "bbox": [5, 5, 10, 10], "score": 0.5}]}
    path = write_yolo_dataset(pseudo, {1: tmp_path / "a.png"}, tmp_path / "out", info=info)
    assert (tmp_path / "out" / "labels" / "pseudo" / "a.txt").read_text().split()[0] == "1"
    assert "names:\n  0: cat\n  1: dog" in path.read_text() and "ddkit_category_ids:\n- 3\n- 17" in path.read_text()


def test_failures_leave_nothing_half_written(tmp_path):
    from PIL import Image

    Image.new("RGB", (50, 40)).save(tmp_path / "a.png")
    info = DatasetInfo(categories=[{"id": 1, "name": "a"}])
    pseudo = {"categories": info.categories,
              "images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 50},
                         {"id": 2, "file_name": "b.png", "height": 40, "width": 50}], "annotations": []}
    with pytest.raises(DataError, match="b.png: image not found"):
        write_yolo_dataset(pseudo, {1: tmp_path / "a.png", 2: tmp_path / "b.png"}, tmp_path / "out", info=info)
    assert sorted(os.listdir(tmp_path)) == ["a.png"]
    with pytest.raises(ConfigError, match="image_paths lacks it"):
        write_yolo_dataset(pseudo, {1: tmp_path / "a.png"}, tmp_path / "out", info=info)
    bad = {**pseudo, "annotations": [{"id": 1, "image_id": 1, "category_id": 9, "bbox": [1, 1, 2, 2]}],
           "categories": [{"id": 9, "name": "x"}]}
    with pytest.raises(DataError, match=r"category ids \[9\]"):
        write_yolo_dataset(bad, {1: tmp_path / "a.png", 2: tmp_path / "a.png"}, tmp_path / "out", info=info)
    with pytest.raises(ConfigError, match="'move' is not one of"):
        write_yolo_dataset(pseudo, {}, tmp_path / "out", info=info, images="move")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a YOLO dataset written by ddkit"):
        write_yolo_dataset({**pseudo, "images": pseudo["images"][:1]}, {1: tmp_path / "a.png"}, tmp_path / "mine",
                           info=info)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["a.png", "mine"]


def test_ultralytics_reads_the_same_labels(tmp_path, monkeypatch):
    """Parity with the public reader the dataset is for (Ultralytics' YOLODataset label parsing)."""
    pytest.importorskip("ultralytics")
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    from ultralytics.data.dataset import YOLODataset

    src = ddkit.build("datasets", {"name": "yolo", "root": str(DATA / "coco8-pose"), "split": "train"})
    pseudo, paths = _as_pseudo(src, True)
    path = write_yolo_dataset(pseudo, paths, tmp_path / "yolo", info=src.info, images="copy")
    import yaml

    meta = yaml.safe_load(path.read_text())
    ds = YOLODataset(img_path=str(tmp_path / "yolo" / "images" / "pseudo"), data=meta, task="pose", augment=False)
    assert len(ds.labels) == 4 and sum(len(lab["cls"]) for lab in ds.labels) == sum(
        len(get_target(src, i)["boxes"]) for i in range(len(src)))
    for lab in ds.labels:
        i = [f.name for f in src.files].index(Path(lab["im_file"]).name)
        t = get_target(src, i)
        h, w = t["size"]
        xyxy = torch.tensor(lab["bboxes"]) * torch.tensor([w, h, w, h])
        xyxy = torch.cat([xyxy[:, :2] - xyxy[:, 2:] / 2, xyxy[:, :2] + xyxy[:, 2:] / 2], 1)
        torch.testing.assert_close(xyxy.float(), t["boxes"], atol=2e-3, rtol=0)
        kp = torch.tensor(lab["keypoints"]) * torch.tensor([w, h, 1])
        torch.testing.assert_close(kp.float(), t["keypoints"], atol=2e-3, rtol=0)


def test_image_paths_default_to_the_pseudo_files_names(tmp_path):
    from PIL import Image

    from ddkit.engine.yolo_export import pseudo_image_paths

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (50, 40)).save(tmp_path / "imgs" / "a.png")
    Image.new("RGB", (50, 40)).save(tmp_path / "b.png")
    info = DatasetInfo(categories=[{"id": 1, "name": "a"}])
    pseudo = {"info": {"image_root": str(tmp_path / "imgs")}, "categories": info.categories,
              "images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 50},
                         {"id": 2, "file_name": str(tmp_path / "b.png"), "height": 40, "width": 50}],
              "annotations": [{"id": 1, "image_id": 2, "category_id": 1, "bbox": [5, 5, 10, 10]}]}
    assert pseudo_image_paths(pseudo) == {1: tmp_path / "imgs" / "a.png", 2: tmp_path / "b.png"}
    write_yolo_dataset(pseudo, None, tmp_path / "out", info=info)
    assert (tmp_path / "out" / "images" / "pseudo" / "a.png").resolve() == (tmp_path / "imgs" / "a.png").resolve()
    assert (tmp_path / "out" / "labels" / "pseudo" / "b.txt").read_text() == "0 0.200000 0.250000 0.200000 0.250000\n"
    with pytest.raises(DataError, match="no image_root"):
        pseudo_image_paths({**pseudo, "info": {}})


def test_label_yolo_labeled_merges_the_labeled_ground_truth(tmp_path):
    """``label.yolo_labeled: true`` (what the select stage writes): the labeled part holds the labeled images and
    their ground truth, read back by ddkit's own YOLO reader (it crashed: the records had no ``file_name``)."""
    from ddkit.engine.label.config import parse_label_config
    from ddkit.engine.label.runner import write_pseudo_yolo

    lab_ds = ddkit.build("datasets", {"name": "yolo", "root": str(DATA / "coco8"), "split": "train"})
    unl_ds = ddkit.build("datasets", {"name": "yolo", "root": str(DATA / "coco8"), "split": "val"})
    pseudo, _ = _as_pseudo(unl_ds, False)
    pseudo["info"]["image_root"] = str(DATA / "coco8" / "images" / "val")
    pseudo_path = tmp_path / "pseudo_labels.json"
    pseudo_path.write_text(json.dumps(pseudo))
    cfg = parse_label_config({"format": "both", "yolo_labeled": True})
    data_yaml = write_pseudo_yolo(pseudo_path, tmp_path / "yolo", lab_ds.info, cfg, lab_ds)
    assert "labeled: 4 images" in data_yaml.read_text()
    back = ddkit.build("datasets", {"name": "yolo", "root": str(tmp_path / "yolo"), "split": "labeled"})
    _same_instances(lab_ds, back, False)
    assert all((tmp_path / "yolo" / "images" / "labeled" / f.name).is_symlink() for f in lab_ds.files)


def test_label_yolo_labeled_without_a_yolo_output_is_refused():
    from ddkit.engine.label.config import parse_label_config

    with pytest.raises(ConfigError, match=r"yolo_labeled: true needs .*format: both"):
        parse_label_config({"format": "coco", "yolo_labeled": True})


def test_crowd_regions_are_left_out_of_the_yolo_labels(tmp_path):
    """A COCO crowd region (``iscrowd: 1``) is not an object to detect: no YOLO row, as Ultralytics' converter."""
    ds = ddkit.build("datasets", {"name": "yolo", "root": str(DATA / "coco8"), "split": "val"})
    pseudo, paths = _as_pseudo(ds, False)
    first = pseudo["images"][0]
    plain = sum(a["image_id"] == first["id"] for a in pseudo["annotations"])
    pseudo["annotations"].append({"id": 999, "image_id": first["id"], "category_id": pseudo["annotations"][0][
        "category_id"], "score": 1.0, "bbox": [1.0, 1.0, 20.0, 20.0], "iscrowd": 1})
    write_yolo_dataset(pseudo, paths, tmp_path / "yolo", info=ds.info)
    rows = (tmp_path / "yolo" / "labels" / "pseudo" / f"{Path(first['file_name']).stem}.txt").read_text().splitlines()
    assert len(rows) == plain > 0
