"""``ddkit-yolo-export`` refuses outputs ddkit reads, and ``ddkit export`` of a yolo model says how to get the file
``ultralytics.YOLO()`` loads (pass 23, findings 1, 4 and 9)."""
from __future__ import annotations

from pathlib import Path

import pytest

import ddkit
from ddkit.engine.checkpoint import load_model, save_checkpoint, save_model
from yolo_common import DATA, TINY


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained stage folder of a tiny yolo model: model.pt, checkpoints/last.pt and stage.json."""
    folder = tmp_path_factory.mktemp("run") / "teacher"
    (folder / "checkpoints").mkdir(parents=True)
    info = ddkit.build("datasets", {"name": "yolo", "root": str(DATA / "coco8"), "split": "train"}).info
    model = ddkit.build("tasks", {"name": "detection"}).build_model(TINY, info)
    save_model(model, folder / "model.pt")
    save_checkpoint(folder / "checkpoints" / "last.pt", model)
    (folder / "stage.json").write_text("{}")
    return folder


def _bytes(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*.pt")}


@pytest.mark.parametrize("src, out, text", [
    (".", "model.pt", "OUT {o} is the checkpoint being exported"),
    (".", "checkpoints/last.pt", "is stage teacher's checkpoints/last.pt; writing over it"),
    ("checkpoints/last.pt", "model.pt", "is stage teacher's model.pt; writing over it"),
    ("checkpoints/last.pt", "checkpoints/last.pt", "is the checkpoint being exported"),
    (".", "checkpoints", "OUT {o} is a folder; give a file name, e.g. OUT {o}/model.pt"),
])
def test_yolo_export_never_writes_over_a_stage_model_the_input_or_a_folder(stage, capsys, src, out, text):
    """The export replaced the run's own model.pt with an Ultralytics pickle (ddkit could no longer read the run),
    and a folder ended in an IsADirectoryError traceback: one line, nothing written, as ``ddkit export -o``."""
    from ddkit_ultralytics.export import main

    before = _bytes(stage)
    with pytest.raises(SystemExit) as code:
        main([str(stage / src), str(stage / out)])
    err = capsys.readouterr().err
    assert code.value.code == 2 and err.count("\n") == 1 and text.format(o=stage / out) in err, err
    assert _bytes(stage) == before
    load_model(stage / "model.pt")


def test_yolo_export_of_another_model_names_it(tmp_path, capsys):
    """Not "export_ultralytics needs a ddkit 'yolo' model": which model the file holds, and what exports."""
    from ddkit.testing.models import info_for_task
    from ddkit_ultralytics.export import main

    model = ddkit.build("tasks", {"name": "classification"}).build_model({"name": "mlp", "hidden": [4]},
                                                                           info_for_task("classification"))
    save_model(model, tmp_path / "mlp.pt")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "mlp.pt"), str(tmp_path / "out.pt")])
    err = capsys.readouterr().err
    assert f"{tmp_path / 'mlp.pt'} holds a mlp model; only yolo models export to Ultralytics" in err, err
    assert "export_ultralytics" not in err and not (tmp_path / "out.pt").exists()


def test_ddkit_export_of_a_yolo_model_says_how_to_write_the_ultralytics_file(stage, tmp_path, capsys):
    """``ddkit export`` writes ddkit's format, which ``ultralytics.YOLO()`` rejects: the yolo plugin's hint says so."""
    from ddkit.cli import main

    assert main(["export", str(stage), "-o", str(tmp_path / "m.pt")]) == 0
    out = capsys.readouterr().out
    assert f"for ultralytics.YOLO() use: ddkit-yolo-export {stage} OUT.pt" in out, out


def test_the_exported_file_remembers_its_data_yaml_as_a_best_pt_does(stage, tmp_path):
    """``train_args.data`` is the yaml of the yolo folder the model was trained on (``YOLO(file).val()`` then
    validates there, not on coco8 by default); a model of other data (a COCO file) records none."""
    import torch

    from ddkit_ultralytics.export import export_ultralytics

    out = export_ultralytics(stage, tmp_path / "best.pt")
    assert torch.load(out, weights_only=False)["train_args"]["data"] == str(DATA / "coco8" / "coco8.yaml")
    coco = ddkit.build("datasets", {"name": "coco", "annotations": str(DATA / "coco-val2017-mini" / "test_coco.json")})
    model = ddkit.build("tasks", {"name": "detection"}).build_model(TINY, coco.info)
    out = export_ultralytics(model, tmp_path / "coco.pt")
    assert torch.load(out, weights_only=False)["train_args"]["data"] is None

