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
