"""Pass 22 (``ddkit label``): a changed unlabeled folder re-labels its shards, the teacher's class names must be the
data's, nothing is written before the label source is checked, ``teacher.model`` overrides of a checkpoint are
warned about, the ``label.coco`` quality report matches classes by name, ``--max-shards`` below 1 and hidden
folders. A tiny MLP teacher on the 8x8 digits, a few PNGs."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
import yaml

from ddkit import get_registry
from ddkit.cli import main
from ddkit.engine.checkpoint import save_model
from ddkit.engine.data import build_data
from ddkit.engine.shards import load_shard

DATA = {"dataset": {"name": "digits"}, "split": {"labeled": 0.2, "unlabeled": 0.3, "seed": 0}}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """An untrained (seeded) MLP on the digits classes: labelling needs a teacher, not a good one."""
    torch.manual_seed(0)
    task = get_registry().build("tasks", "classification")
    model = task.build_model({"name": "mlp", "hidden": [16]}, build_data(DATA).info)
    return save_model(model, tmp_path_factory.mktemp("teacher") / "model.pt")


def _png(path: Path, index: int) -> None:
    from PIL import Image

    arr = (build_data(DATA).unlabeled[index][0][0].numpy() * 255).astype("uint8")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _folder(tmp_path: Path, n: int = 4) -> Path:
    folder = tmp_path / "pngs"
    for i in range(n):
        _png(folder / f"d{i}.png", i)
    return folder


def recipe(tmp_path: Path, teacher: Path, **label) -> Path:
    cfg = {"run": {"out_dir": str(tmp_path / "run"), "seed": 0, "device": "cpu"}, "data": DATA,
           "teacher": {"checkpoint": str(teacher)},
           "label": {"transforms": [{"name": "identity"}], "aggregator": {"name": "prob_mean"},
                     "selector": {"name": "top_k", "k": 1}, "batch_size": 64, "shard_size": 2, "quality": None,
                     **label}}
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(cfg))
    return path


def _fingerprints(out: Path) -> list[str]:
    return [load_shard(p)["fingerprint"] for p in sorted((out / "shards").glob("*.pt"))]


@pytest.mark.parametrize("change", ["replace", "add", "delete"])
def test_a_changed_image_folder_relabels_its_shards(tmp_path, teacher, change, capsys, caplog):
    folder = _folder(tmp_path)
    r = recipe(tmp_path, teacher, images=str(folder))
    assert main(["label", str(r), "--no-progress"]) == 0
    out = tmp_path / "run" / "label"
    before = _fingerprints(out)
    if change == "replace":  # another picture under the same name (same size on disk, so the mtime must tell)
        st = os.stat(folder / "d0.png")
        _png(folder / "d0.png", 9)
        os.utime(folder / "d0.png", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    elif change == "add":
        _png(folder / "d9.png", 9)
    else:
        (folder / "d3.png").unlink()
    with caplog.at_level(logging.WARNING, logger="ddkit.label"):
        assert main(["label", str(r), "--no-progress"]) == 0
    after = _fingerprints(out)
    assert after and not set(after) & set(before)
    assert "unlabeled images added, replaced or deleted" in caplog.text
    names = [im["file_name"] for im in json.loads((out / "pseudo_labels.json").read_text())["images"]]
    assert ("d9.png" in names) == (change == "add") and ("d3.png" in names) == (change != "delete")


def _swapped_teacher(tmp_path: Path) -> Path:
    """A teacher whose classes 0 and 1 carry each other's names: the same ids, other classes."""
    import dataclasses

    info = build_data(DATA).info
    cats = [dict(c) for c in info.categories]
    cats[0]["name"], cats[1]["name"] = cats[1]["name"], cats[0]["name"]
    model = get_registry().build("tasks", "classification").build_model(
        {"name": "mlp", "hidden": [8]}, dataclasses.replace(info, categories=cats))
    return save_model(model, tmp_path / "swapped" / "model.pt")


def test_a_teacher_whose_class_names_differ_is_refused_before_anything_is_written(tmp_path, capsys):
    names = [c["name"] for c in build_data(DATA).info.categories]
    teacher = _swapped_teacher(tmp_path)
    assert main(["label", str(recipe(tmp_path, teacher)), "--no-progress"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(teacher) in err[0] and "data.dataset (digits)" in err[0], err
    assert f"id 0: teacher {names[1]!r} vs data {names[0]!r}" in err[0] and "trained on this data's classes" in err[0]
    assert not (tmp_path / "run" / "label").exists()


def test_pseudo_labels_whose_class_names_differ_are_refused_by_the_student(tmp_path, teacher, capsys):
    r = recipe(tmp_path, teacher)
    assert main(["label", str(r), "--no-progress"]) == 0
    pseudo = tmp_path / "run" / "label" / "pseudo_labels.json"
    data = json.loads(pseudo.read_text())
    data["categories"][2]["name"], data["categories"][3]["name"] = "cat", "dog"
    pseudo.write_text(json.dumps(data))
    cfg = json.loads(r.read_text())
    cfg.update(task={"name": "classification"},
               student={"model": {"name": "mlp", "hidden": [8]}, "pseudo_labels": "auto",
                        "train": {"iterations": 1, "batch_size": 8, "ratio": [1, 1]}})
    r.write_text(json.dumps(cfg))
    capsys.readouterr()
    assert main(["train", str(r), "--stage", "student", "--no-progress"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(pseudo) in err[0] and "id 2: pseudo-labels 'cat' vs data '2'" in err[0], err
    assert not (tmp_path / "run" / "student").exists()


@pytest.mark.parametrize("images, expected", [
    ("nope", r"^ddkit label: error: \S+recipe.yaml: label.images: \S+nope is not a folder$"),
    ("empty", r"^ddkit label: error: \S+recipe.yaml: label.images: nothing to label, \S+empty holds no images; "
              r"point it at images \(.jpg, .*\)$")])
def test_a_bad_label_images_is_refused_before_the_label_folder_is_rewritten(tmp_path, teacher, images, expected,
                                                                            capsys):
    import re

    r = recipe(tmp_path, teacher, images=str(_folder(tmp_path, 2)))
    assert main(["label", str(r), "--no-progress"]) == 0
    out = tmp_path / "run" / "label"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no image")
    capsys.readouterr()
    assert main(["label", str(r), "--no-progress", f"label.images={tmp_path / images}"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(expected, err[0]), err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # config.yaml included


def test_teacher_model_keys_a_checkpoint_overrides_are_warned_about_and_not_recorded(tmp_path, teacher, caplog):
    cfg = json.loads(recipe(tmp_path, teacher).read_text())
    cfg["teacher"]["model"] = {"name": "mlp", "hidden": [16], "dropout": 0.25}  # hidden: as trained; dropout: not
    r = tmp_path / "model.yaml"
    r.write_text(json.dumps(cfg))
    with caplog.at_level(logging.WARNING, logger="ddkit.label"):
        assert main(["label", str(r), "--no-progress"]) == 0
    said = [m for m in caplog.messages if "teacher.model" in m]
    assert len(said) == 1 and "dropout=0.25" in said[0] and "hidden" not in said[0] and str(teacher) in said[0]
    saved = yaml.safe_load((tmp_path / "run" / "label" / "config.yaml").read_text())
    assert saved["teacher"]["model"]["dropout"] == 0.0 and saved["teacher"]["model"]["hidden"] == [16]


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_max_shards_below_one_is_an_argparse_error(tmp_path, teacher, value, capsys):
    r = recipe(tmp_path, teacher, images=str(_folder(tmp_path, 2)))
    with pytest.raises(SystemExit) as exc:
        main(["label", str(r), "--no-progress", "--max-shards", value])
    assert exc.value.code == 2 and "--max-shards" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_hidden_folders_are_not_labelled(tmp_path, teacher):
    folder = _folder(tmp_path, 2)
    _png(folder / ".ipynb_checkpoints" / "d0-checkpoint.png", 0)
    _png(folder / "sub" / ".hidden.png", 1)
    _png(folder / "sub" / "d2.png", 2)
    assert main(["label", str(recipe(tmp_path, teacher, images=str(folder))), "--no-progress"]) == 0
    data = json.loads((tmp_path / "run" / "label" / "pseudo_labels.json").read_text())
    assert [im["file_name"] for im in data["images"]] == ["d0.png", "d1.png", "sub/d2.png"]
