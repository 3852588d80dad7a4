"""The core ``yolo`` dataset with Ultralytics installed: a data yaml's relative ``path:`` found nowhere else is looked
up in Ultralytics' settings' ``datasets_dir``, as ``check_det_dataset`` does (pass 23 #7)."""
from __future__ import annotations

import shutil

import pytest

import ddkit
from ddkit.errors import DataError
from yolo_common import DATA


def test_a_relative_data_yaml_path_is_found_in_ultralytics_datasets_dir(tmp_path, monkeypatch):
    from ultralytics.data.utils import check_det_dataset
    from ultralytics.utils import SETTINGS

    datasets, work = tmp_path / "datasets", tmp_path / "work"
    datasets.mkdir(), work.mkdir(), (tmp_path / "ymls").mkdir()
    monkeypatch.setitem(SETTINGS, "datasets_dir", str(datasets))
    monkeypatch.chdir(work)
    yml = tmp_path / "ymls" / "two.yaml"
    yml.write_text("path: two\ntrain: images/train\nval: images/val\nnames: [" + ", ".join(f"c{i}" for i in range(80))
                   + "]\n")
    with pytest.raises(DataError) as err:
        ddkit.build("datasets", {"name": "yolo", "data_yaml": str(yml), "split": "val"})
    assert str(err.value) == (
        f"{yml}: field path: 'two' is not a folder; looked in {tmp_path / 'ymls' / 'two'} (the yaml's folder), two "
        f"(the working directory), {datasets / 'two'} (Ultralytics' datasets_dir); fix 'path:' (absolute, or relative "
        "to the yaml's folder)")
    shutil.copytree(DATA / "coco8", datasets / "two")
    val = ddkit.build("datasets", {"name": "yolo", "data_yaml": str(yml), "split": "val"})
    assert [f.parent for f in val.files] == [datasets / "two" / "images" / "val"] * 4
    monkeypatch.setattr("ultralytics.data.utils.DATASETS_DIR", datasets)  # read once at its import
    assert check_det_dataset(str(yml))["val"] == str(datasets / "two" / "images" / "val")
    # the yaml's folder and the working directory come first (ddkit's order; Ultralytics': the working directory)
    shutil.copytree(DATA / "coco8", work / "two")
    val = ddkit.build("datasets", {"name": "yolo", "data_yaml": str(yml), "split": "val"})
    assert [f.parent.resolve() for f in val.files] == [work / "two" / "images" / "val"] * 4
