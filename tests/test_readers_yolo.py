"""The YOLO reader (plugins/datasets.py YoloDataset): one line per malformed label row (file, line number, what is
wrong), the shared box rule, bad yaml and empty folders named."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

import ddkit
from ddkit.engine.data import build_data, get_target
from ddkit.engine.keypoint_meta import COCO_SIGMAS
from ddkit.errors import ConfigError, DataError

DATA = Path(__file__).parents[1].parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not (DATA / "coco8").is_dir(), reason="shared/data fixtures are not here")


def _copy(tmp_path: Path, name: str = "coco8") -> Path:
    root = tmp_path / name
    shutil.copytree(DATA / name, root)
    return root


def _first_label(root: Path) -> Path:
    return sorted((root / "labels" / "train").glob("*.txt"))[0]


@pytest.mark.parametrize("line,what", [
    ("0 0.5 0.5 0.2", "4 values, expected 5"),
    ("0 0.5 0.5 0.2 0.1 0.3", "6 values, expected 5"),
    ("0 0.5 abc 0.2 0.1", "not numbers"),
    ("0 nan 0.5 0.2 0.1", "non-finite"),
    ("0 0.5 0.5 inf 0.1", "non-finite"),
    ("1.5 0.5 0.5 0.2 0.1", "not a class index"),
    ("-1 0.5 0.5 0.2 0.1", "not a class index"),
    ("80 0.5 0.5 0.2 0.1", "class 80 is not in the yaml's names"),
    ("0 0.5 0.5 -0.2 0.1", "negative box width or height"),
])
def test_malformed_label_lines_name_file_and_line(tmp_path, line, what):
    root = _copy(tmp_path)
    label = _first_label(root)
    label.write_text("0 0.5 0.5 0.2 0.1\n\n" + line + "\n")
    with pytest.raises(DataError) as err:
        ddkit.build("datasets", {"name": "yolo", "root": str(root)})
    msg = str(err.value)
    assert f"{label}: line 3: " in msg and what in msg and "\n" not in msg


@pytest.mark.parametrize("vis,what", [("3", "visibility must be 0, 1 or 2"), ("0.5", "visibility")])
def test_pose_rows_are_checked(tmp_path, vis, what):
    root = _copy(tmp_path, "coco8-pose")
    label = _first_label(root)
    rows = label.read_text().splitlines()
    vals = rows[0].split()
    vals[7] = vis
    label.write_text("\n".join([" ".join(vals)] + rows[1:]) + "\n")
    with pytest.raises(DataError, match=rf"{label}: line 1: .*{what}"):
        ddkit.build("datasets", {"name": "yolo", "root": str(root)})
    label.write_text("0 0.5 0.5 0.2 0.1\n")  # no keypoints in a pose dataset
    with pytest.raises(DataError, match=rf"{label}: line 1: 5 values, expected 56"):
        ddkit.build("datasets", {"name": "yolo", "root": str(root)})


@pytest.mark.parametrize("row,clipped,dropped", [
    ("0 1.5 0.5 0.2 0.2", 0, 1),        # wholly right of the image
    ("0 -0.5 -0.5 0.2 0.2", 0, 1),      # wholly above-left
    ("0 0.5 0.5 0 0.2", 0, 1),          # zero width
    ("0 0.95 0.5 0.2 0.2", 1, 0),       # sticks out on the right
    ("0 0.5 0.5 1.2 1.2", 1, 0),        # larger than the image
])
def test_box_rule_in_the_yolo_reader(tmp_path, caplog, row, clipped, dropped):
    root = _copy(tmp_path)
    label = _first_label(root)
    n_before = len([ln for ln in label.read_text().splitlines() if ln.strip()])
    label.write_text(label.read_text().rstrip("\n") + "\n" + row + "\n")
    with caplog.at_level(logging.WARNING):
        ds = ddkit.build("datasets", {"name": "yolo", "root": str(root)})
    i = [f.stem for f in ds.files].index(label.stem)
    t = get_target(ds, i)
    h, w = t["size"]
    assert len(t["boxes"]) == len(t["labels"]) == len(t["area"]) == n_before + 1 - dropped
    assert t["boxes"].dtype == torch.float32
    assert (t["boxes"] >= 0).all() and (t["boxes"][:, 2] <= w).all() and (t["boxes"][:, 3] <= h).all()
    assert (f"clipped {clipped}" in caplog.text) == bool(clipped)
    assert (f"dropped {dropped}" in caplog.text) == bool(dropped)
    assert f"{label}: line {n_before + 1}" in caplog.text


def test_yaml_problems_are_named(tmp_path):
    root = _copy(tmp_path)
    yaml_path = root / "coco8.yaml"
    yaml_path.write_text("names: [a, b\n")
    with pytest.raises(DataError, match=rf"{yaml_path}: not valid YAML"):
        ddkit.build("datasets", {"name": "yolo", "root": str(root)})
    yaml_path.write_text("names: 3\n")
    with pytest.raises(DataError, match="field names must be"):
        ddkit.build("datasets", {"name": "yolo", "root": str(root)})
    yaml_path.write_text("names: [a]\nkpt_shape: [17, 4]\n")
    with pytest.raises(DataError, match="kpt_shape must be"):
        ddkit.build("datasets", {"name": "yolo", "root": str(root)})
    with pytest.raises(DataError, match="data_yaml not found"):
        ddkit.build("datasets", {"name": "yolo", "root": str(root), "data_yaml": str(root / "nope.yaml")})


def test_empty_image_folders_are_named(tmp_path):
    root = _copy(tmp_path)
    for f in (root / "images" / "train").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=rf"{root / 'images' / 'train'}: no images"):
        ddkit.build("datasets", {"name": "yolo", "root": str(root)})
    with pytest.raises(DataError, match=rf"{root / 'images' / 'test'}: no such image folder"):
        ddkit.build("datasets", {"name": "yolo", "root": str(root), "split": "test"})
    folder = tmp_path / "folder"
    (folder / "cat").mkdir(parents=True)
    (folder / "dog").mkdir()
    with pytest.raises(DataError, match=rf"class folder {folder / 'cat'} has no images"):
        build_data({"train": {"dataset": {"name": "image_folder", "root": str(folder)}}})
    for name in ("cat", "dog"):
        (folder / name / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=rf"{folder}: no readable images"):
        build_data({"train": {"dataset": {"name": "image_folder", "root": str(folder)}}})


def test_every_image_unreadable_names_the_data_field(tmp_path):
    root = _copy(tmp_path)
    for f in (root / "images" / "val").iterdir():
        f.write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"data.test.dataset: .*coco8 has no \(readable\) images"):
        build_data({"train": {"dataset": {"name": "yolo", "root": str(root)}},
                    "test": {"dataset": {"name": "yolo", "root": str(root), "split": "val"}}})


@pytest.mark.parametrize("split,field", [
    ({"labeled": 0.8, "test": 0.5}, "labeled 0.8 + test 0.5 = 1.3"),
    ({"labeled": 0.5, "unlabeled": 0.4, "test": 0.2}, "= 1.1"),
    ({"labeled": -0.1}, "labeled = -0.1"),
    ({"labeled": 0.5, "test": 1.5}, "test = 1.5"),
    ({"labeled": "half"}, "'labeled'"),
])
def test_split_fractions_name_the_field(split, field):
    with pytest.raises(ConfigError) as err:
        build_data({"dataset": {"name": "digits"}, "split": split})
    assert str(err.value).startswith("data.split: ") and field in str(err.value)


def test_missing_label_files_are_counted_not_silent(tmp_path, caplog):
    root = _copy(tmp_path)
    labels = sorted((root / "labels" / "train").glob("*.txt"))
    labels[0].unlink()
    with caplog.at_level(logging.WARNING):
        ds = ddkit.build("datasets", {"name": "yolo", "root": str(root)})
    assert len(ds) == 4 and "1 of 4 images have no label file" in caplog.text and labels[0].stem in caplog.text
    caplog.clear()
    shutil.rmtree(root / "labels")
    with caplog.at_level(logging.WARNING):
        ds = ddkit.build("datasets", {"name": "yolo", "root": str(root)})
    assert sum(len(get_target(ds, i)["boxes"]) for i in range(4)) == 0
    assert "no label files for the 4 images" in caplog.text and "every image is background" in caplog.text


def test_area_is_the_box_area_and_for_pose_labels_ultralytics_053_of_it():
    """YOLO files carry no segment area. Boxes: the box area (COCO's size ranges). Pose: 0.53 x the box area, the
    OKS scale Ultralytics' pose validation uses (a person covers about 0.53 of its box in COCO), so keypoint AP on
    YOLO pose labels is not inflated by a scale about twice COCO's."""
    for name, share in (("coco8", 1.0), ("coco8-pose", 0.53)):
        ds = ddkit.build("datasets", {"name": "yolo", "root": str(DATA / name), "split": "train"})
        for i in range(len(ds)):
            t = get_target(ds, i)
            box = (t["boxes"][:, 2:] - t["boxes"][:, :2]).prod(1)
            assert len(box) and torch.allclose(t["area"].double(), share * box.double()), (name, i)


def test_a_data_yaml_path_found_nowhere_is_one_line_naming_where_it_was_looked_for(tmp_path, monkeypatch):
    """pass 23 #7: ``path: two`` (as Ultralytics' ``coco8.yaml`` has ``path: coco8``) neither next to the yaml nor in
    the working directory, Ultralytics not installed: one line naming both places and Ultralytics' datasets_dir."""
    import sys

    for name in ("ultralytics", "ultralytics.utils"):  # "not installed": its import fails (also once imported)
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ymls").mkdir()
    yml = tmp_path / "ymls" / "two.yaml"
    yml.write_text("path: two\ntrain: images/train\nval: images/val\nnames: [" + ", ".join(f"c{i}" for i in range(80))
                   + "]\n")
    with pytest.raises(DataError) as err:
        ddkit.build("datasets", {"name": "yolo", "data_yaml": str(yml), "split": "val"})
    assert str(err.value) == (
        f"{yml}: field path: 'two' is not a folder; looked in {tmp_path / 'ymls' / 'two'} (the yaml's folder), two "
        "(the working directory); Ultralytics would also look in its settings' datasets_dir (not installed here); "
        "fix 'path:' (absolute, or relative to the yaml's folder)")
    shutil.copytree(DATA / "coco8", tmp_path / "two")  # from the working directory, as Ultralytics reads it
    import ddkit_plugins.datasets as readers

    def not_asked():
        raise AssertionError("Ultralytics asked for a path: found without it")

    monkeypatch.setattr(readers, "_ultralytics_datasets_dir", not_asked)
    assert len(ddkit.build("datasets", {"name": "yolo", "data_yaml": str(yml), "split": "val"})) == 4


def _five_keypoint_folder(tmp_path: Path) -> Path:
    """coco8-pose cut to its first 5 keypoints (nose, eyes, ears): a skeleton that is not COCO's 17."""
    root = _copy(tmp_path, "coco8-pose")
    for label in (root / "labels").rglob("*.txt"):
        rows = [line.split()[:5 + 5 * 3] for line in label.read_text().splitlines() if line.strip()]
        label.write_text("".join(" ".join(r) + "\n" for r in rows))
    (root / "coco8-pose.yaml").write_text("path:\ntrain: images/train\nval: images/val\nkpt_shape: [5, 3]\n"
                                          "flip_idx: [0, 2, 1, 4, 3]\nnames:\n  0: person\n")
    return root


def test_a_yolo_skeleton_of_unknown_sigmas_takes_ultralytics_1_over_k(tmp_path, caplog):
    """Ultralytics' pose validation scores a skeleton other than COCO's 17 with sigma 1/K per keypoint
    (``np.ones(nkpt) / nkpt``), so a YOLO folder's keypoint AP agrees with ``yolo val``; the dataset's own
    ``sigmas`` win, and COCO's 17 keep COCO's sigmas."""
    root = _five_keypoint_folder(tmp_path)
    with caplog.at_level(logging.WARNING):
        ds = ddkit.build("datasets", {"name": "yolo", "root": str(root), "split": "val"})
    assert ds.info.num_keypoints == 5 and ds.info.keypoint_sigmas == [0.2] * 5
    assert "0.2 used for each (Ultralytics' 1/K" in ds.info.extra["keypoint_sigmas_default"]
    given = ddkit.build("datasets", {"name": "yolo", "root": str(root), "split": "val", "sigmas": [0.1] * 5})
    assert given.info.keypoint_sigmas == [0.1] * 5 and "keypoint_sigmas_default" not in given.info.extra
    coco = ddkit.build("datasets", {"name": "yolo", "root": str(DATA / "coco8-pose"), "split": "val"})
    assert coco.info.keypoint_sigmas == pytest.approx(list(COCO_SIGMAS))
