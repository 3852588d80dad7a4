"""``ddkit eval`` / ``ddkit predict`` of a user's Ultralytics ``best.pt`` with ``--trust-checkpoint``: the file is
evaluated and predicted as the ddkit model it was exported from; without the flag it is refused in one line naming
it (the file is a pickle: it runs code when loaded)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ddkit
from ddkit.cli import main
from ddkit.engine.checkpoint import save_model
from yolo_common import DATA

# Ultralytics' inference defaults (conf 0.001, max_det 300): an Ultralytics file records none, the yolo model's apply
BLOCK = {"name": "yolo", "cfg": "yolov8n.yaml", "imgsz": 64, "width": 0.125}


def _trained(folder: Path, data: str, task_name: str, cfg: str, steps: int) -> tuple[Path, Path]:
    """``(ddkit model.pt, Ultralytics best.pt)`` of a tiny yolo model trained ``steps`` steps on ``data``'s train
    images, so that its scores pass the default conf and its AP is not 0."""
    from ddkit_ultralytics.export import export_ultralytics

    dataset = ddkit.build("datasets", {"name": "yolo", "root": str(DATA / data), "split": "train"})
    task = ddkit.build("tasks", {"name": task_name})
    torch.manual_seed(0)
    model = task.build_model({**BLOCK, "cfg": cfg}, dataset.info).train()
    batch = task.collate([dataset[i] for i in range(len(dataset))])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = sum(task.training_forward(model, batch).losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    folder.mkdir(parents=True)
    ddkit_file = save_model(model.eval(), folder / "model.pt")
    return ddkit_file, export_ultralytics(model, folder / "weights" / "best.pt")


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _trained(tmp_path_factory.mktemp("det") / "train", "coco8", "detection", "yolov8n.yaml", 80)


def _eval(model: Path, data: str, out: Path, *flags: str) -> dict:
    assert main(["eval", str(model), "--data", str(DATA / data), "--split", "train", "--batch-size", "2", *flags,
                 "-o", str(out)]) == 0
    return json.loads(out.read_text())


def test_eval_of_a_trusted_ultralytics_file_is_the_exported_models(detector, tmp_path, capsys):
    """The same metrics, per class too, as the ddkit model it was exported from (its classes, scale and training
    image size come from the file); the default output lies beside the file."""
    ddkit_file, best = detector
    ours = _eval(ddkit_file, "coco8", tmp_path / "ours.json")
    theirs = _eval(best, "coco8", tmp_path / "theirs.json", "--trust-checkpoint")
    assert ours["metrics"]["AP50"] > 0, ours["metrics"]  # a comparison of zeros would prove nothing
    assert theirs["metrics"] == ours["metrics"] and theirs["per_class"] == ours["per_class"]
    assert main(["eval", str(best), "--trust-checkpoint", "--data", str(DATA / "coco8")]) == 0
    assert f"wrote {best.parent / 'eval_coco8_val.json'}" in capsys.readouterr().out


def test_predict_of_a_trusted_ultralytics_file_writes_the_exported_models_labels(detector, tmp_path):
    ddkit_file, best = detector
    images = DATA / "coco8" / "images" / "val"
    assert main(["predict", str(ddkit_file), str(images), "--format", "yolo", "-o", str(tmp_path / "ours")]) == 0
    assert main(["predict", str(best), str(images), "--format", "yolo", "--trust-checkpoint",
                 "-o", str(tmp_path / "theirs")]) == 0
    ours = {p.name: p.read_text() for p in (tmp_path / "ours" / "labels").glob("*.txt")}
    theirs = {p.name: p.read_text() for p in (tmp_path / "theirs" / "labels").glob("*.txt")}
    assert len(ours) == 4 and all(ours.values()) and theirs == ours
    assert (tmp_path / "theirs" / "data.yaml").read_text() == (tmp_path / "ours" / "data.yaml").read_text()


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_an_ultralytics_file_without_trust_is_refused_naming_the_flag(detector, tmp_path, capsys, command):
    """Never unpickled without consent: one line that says how to give it."""
    best = detector[1]
    args = ["--data", str(DATA / "coco8")] if command == "eval" else [str(DATA / "coco8" / "images" / "val"),
                                                                      "-o", str(tmp_path / "out")]
    assert main([command, str(best), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Ultralytics checkpoint (DetectionModel)" in err, err
    assert err.rstrip().endswith("or pass --trust-checkpoint to evaluate/predict it as it is (this runs code from "
                                 "the file: only for files you trust)"), err
    assert not (tmp_path / "out").exists()


def test_a_trusted_ultralytics_pose_file_is_the_exported_keypoints_model(tmp_path):
    """A pose file is a keypoints model of its 17 keypoints: the same keypoint lines and metrics."""
    ddkit_file, best = _trained(tmp_path / "pose", "coco8-pose", "keypoints", "yolov8n-pose.yaml", 30)
    images = DATA / "coco8-pose" / "images" / "val"
    labels = {}
    for name, model, flags in (("ours", ddkit_file, ()), ("theirs", best, ("--trust-checkpoint",))):
        assert main(["predict", str(model), str(images), "--format", "yolo", *flags, "-o", str(tmp_path / name)]) == 0
        labels[name] = {p.name: p.read_text() for p in (tmp_path / name / "labels").glob("*.txt")}
    lines = [line for text in labels["ours"].values() for line in text.splitlines()]
    assert lines and all(len(line.split()) == 1 + 4 + 17 * 3 + 1 for line in lines)
    assert labels["theirs"] == labels["ours"]
    ours = _eval(ddkit_file, "coco8-pose", tmp_path / "ours.json")
    theirs = _eval(best, "coco8-pose", tmp_path / "theirs.json", "--trust-checkpoint")
    assert theirs["task"] == "keypoints" and theirs["metrics"] == ours["metrics"]
