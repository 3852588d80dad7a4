"""Pass 22 leftovers: a plain state dict as ``teacher.checkpoint`` points to the route that works for
``ddkit label``; ``fuse --gt`` names the results' category ids the GT file lacks; ``bench`` without raw
predictions names ``bench.raw``; pseudo-labels whose images moved name the file and its ``info.image_root``; a
strategy block whose ``name`` changes by override drops the old strategy's keys. A tiny MLP on the 8x8 digits."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ddkit import get_registry
from ddkit.cli import main
from ddkit.engine.checkpoint import save_model
from ddkit.engine.data import build_data

DATA = {"dataset": {"name": "digits"}, "split": {"labeled": 0.2, "unlabeled": 0.3, "seed": 0}}
MLP = {"name": "mlp", "hidden": [16]}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = get_registry().build("tasks", "classification").build_model(MLP, build_data(DATA).info)
    return save_model(model, tmp_path_factory.mktemp("teacher") / "model.pt")


def recipe(tmp_path: Path, teacher: dict | None) -> Path:
    cfg = {"run": {"out_dir": str(tmp_path / "run"), "seed": 0, "device": "cpu"}, "data": DATA,
           "task": {"name": "classification"}, "teacher": teacher or {},
           "label": {"transforms": [{"name": "identity"}], "aggregator": {"name": "prob_mean"},
                     "selector": {"name": "top_k", "k": 1}, "batch_size": 64, "shard_size": 1000, "quality": None}}
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(cfg))
    return path


def _state_dict(tmp_path: Path, teacher: Path) -> Path:
    path = tmp_path / "weights.pth"
    torch.save(torch.load(teacher, weights_only=True)["model"], path)
    return path


def test_a_plain_state_dict_as_teacher_checkpoint_names_the_route_that_works(tmp_path, teacher, capsys):
    weights = _state_dict(tmp_path, teacher)
    r = recipe(tmp_path, {"checkpoint": str(weights), "model": MLP})
    assert main(["label", str(r), "--no-progress"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{weights}: a plain state dict" in err[0], err
    assert (f"ddkit train {r} --stage teacher teacher.model.pretrained={weights} teacher.train.iterations=0"
            in err[0]) and "'pretrained' key" not in err[0], err
    assert not (tmp_path / "run").exists()


def test_the_route_for_a_plain_state_dict_labels_with_its_weights(tmp_path, teacher, capsys):
    weights = _state_dict(tmp_path, teacher)
    r = recipe(tmp_path, {"model": {**MLP, "pretrained": str(weights)}, "train": {"iterations": 1}})
    assert main(["label", str(r), "--no-progress"]) != 0  # no checkpoint yet: the route is in the error
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "teacher.checkpoint is required" in err[0], err
    assert f"teacher.model.pretrained={weights} teacher.train.iterations=0" in err[0], err
    assert main(["train", str(r), "--stage", "teacher", "--no-progress", "teacher.train.iterations=0"]) == 0
    made = torch.load(tmp_path / "run" / "teacher" / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(made[k], v) for k, v in torch.load(weights, weights_only=True).items())
    assert main(["label", str(r), "--no-progress"]) == 0
    assert json.loads((tmp_path / "run" / "label" / "pseudo_labels.json").read_text())["annotations"]


def _pngs(folder: Path, n: int = 3) -> Path:
    from PIL import Image

    unlabeled = build_data(DATA).unlabeled
    for i in range(n):
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((unlabeled[i][0][0].numpy() * 255).astype("uint8")).save(folder / f"d{i}.png")
    return folder


def test_pseudo_labels_whose_images_moved_name_the_file_its_image_root_and_the_fix(tmp_path, teacher, capsys):
    r = recipe(tmp_path, {"checkpoint": str(teacher)})
    cfg = json.loads(r.read_text())
    cfg["data"] = {"dataset": {"name": "digits"}, "split": {"labeled": 0.2, "seed": 0}}  # no unlabeled split
    cfg["label"]["images"] = str(_pngs(tmp_path / "pngs"))
    r.write_text(json.dumps(cfg))
    assert main(["label", str(r), "--no-progress"]) == 0
    pseudo = tmp_path / "run" / "label" / "pseudo_labels.json"
    (tmp_path / "pngs").rename(tmp_path / "moved")
    student = ["train", str(r), "--stage", "student", "--no-progress", "student.pseudo_labels=auto",
               "student.model={name: mlp, hidden: [8]}", "student.train.iterations=1", "student.train.batch_size=4"]
    capsys.readouterr()
    assert main(student) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ddkit train: error: {pseudo}: 3 of 3 image(s) are not under its "
                                               f"info.image_root {tmp_path / 'pngs'} (e.g. d0.png"), err
    assert "set info.image_root in the file to the images' new folder" in err[0]
    assert not (tmp_path / "run" / "student").exists()
    data = json.loads(pseudo.read_text())  # the fix the line names
    data["info"]["image_root"] = str(tmp_path / "moved")
    pseudo.write_text(json.dumps(data))
    assert main(student) == 0
