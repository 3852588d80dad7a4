"""``ddkit label`` through the command line with the builtin classification task (a tiny MLP teacher on the 8x8
digits): end to end, count matching per class, bad recipes, ``--shard``, and torchrun with 2 processes (gloo)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ddkit import get_registry
from ddkit.cli import main
from ddkit.engine import label as L
from ddkit.engine.checkpoint import save_model
from ddkit.engine.data import build_data
from ddkit.engine.pseudo import load_pseudo_dataset
from ddkit.engine.select import round_half_up
from ddkit.engine.shards import load_shard

REPO = Path(__file__).resolve().parents[1]
DATA = {"dataset": {"name": "digits"}, "split": {"labeled": 0.2, "unlabeled": 0.3, "seed": 0}}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    task = get_registry().build("tasks", "classification")
    splits = build_data(DATA)
    model = task.build_model({"name": "mlp", "hidden": [32]}, splits.info)
    x = torch.stack([splits.labeled[i][0] for i in range(len(splits.labeled))])
    y = torch.tensor([splits.labeled[i][1]["label"] for i in range(len(splits.labeled))])
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only contend (100x slower on a busy 2-core machine)
    try:
        for _ in range(60):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return save_model(model, tmp_path_factory.mktemp("teacher") / "model.pt")


def recipe(tmp_path: Path, teacher: Path, out: str = "run", **label) -> Path:
    cfg = {"run": {"out_dir": str(tmp_path / out), "seed": 0, "device": "cpu"}, "data": DATA,
           "teacher": {"checkpoint": str(teacher)},
           "label": {"transforms": [{"name": "identity"}, {"name": "translate", "shifts": [[1, 0], [-1, 0]]}],
                     "aggregator": {"name": "prob_mean"}, "selector": {"name": "count_match"}, "batch_size": 64,
                     "shard_size": 200, **label}}
    path = tmp_path / f"{out}.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def test_classification_end_to_end(tmp_path, teacher, capsys):
    assert main(["label", str(recipe(tmp_path, teacher)), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| single |" in printed and "| ensemble |" in printed and "pseudo-labels:" in printed
    out = tmp_path / "run" / "label"
    data = json.loads((out / "pseudo_labels.json").read_text())
    assert data["ddkit_format"] == "image-labels" and len(data["categories"]) == 10
    assert data["info"]["teacher_sha256"] == __import__("ddkit.io").io.file_sha256(teacher)
    assert data["info"]["views"] == ["identity", "translate_dx1_dy0", "translate_dx-1_dy0"]
    # count matching per class, recomputed from the shards: round(frac_c * N) most confident predicted as c
    splits = build_data(DATA)
    n = len(splits.unlabeled)
    frac = {c: sum(splits.labeled.get_target(i)["label"] == c for i in range(len(splits.labeled)))
            / len(splits.labeled) for c in range(10)}
    preds = []
    for shard in sorted((out / "shards").glob("*.pt")):
        rec = load_shard(shard)
        preds += list(zip(rec["images"]["image_id"].tolist(), rec["ensemble"]["labels"].tolist(),
                          rec["ensemble"]["scores"].tolist()))
    expected = set()
    for c in range(10):
        mine = sorted((s, i) for i, lab, s in preds if lab == c)[::-1]
        k = round_half_up(frac[c] * n)
        thr = mine[k - 1][0] if 0 < k < len(mine) else (-1 if k >= len(mine) else 2)
        expected |= {i for s, i in mine if s >= thr}
    assert {a["image_id"] for a in data["annotations"]} == expected
    assert len(expected) < n  # some images are left out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"]["labelled"] == n and summary["pseudo_labels"] == len(expected)
    q = json.loads((out / "quality.json").read_text())
    for view in ("single", "ensemble"):
        assert q[view]["accuracy"] > 0.6 and q[view]["selected_accuracy"] >= q[view]["accuracy"] - 0.05
    # back as a training set: (image, {"image_id", "label"}) like the digits dataset's items
    train = load_pseudo_dataset(out / "pseudo_labels.json", source=splits.unlabeled)
    image, target = train[0]
    assert image.shape == (1, 8, 8) and set(target) == {"image_id", "label"} and len(train) == len(expected)
    assert train.info.categories == splits.info.categories


def test_image_folder_is_converted_to_the_teachers_input(tmp_path, teacher, capsys):
    """Colour PNGs of another size, labelled by a grey 8x8 digits teacher: converted on read; one corrupt file is
    skipped and reported."""
    from PIL import Image

    splits = build_data(DATA)
    folder = tmp_path / "pngs"
    (folder / "sub").mkdir(parents=True)
    for i in range(4):
        arr = (splits.unlabeled[i][0][0].numpy() * 255).astype("uint8")
        Image.fromarray(arr).convert("RGB").resize((16, 16)).save(folder / ("sub" if i == 3 else "") / f"d{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG broken")
    r = recipe(tmp_path, teacher, images=str(folder), selector={"name": "top_k", "k": 1}, quality=None)
    assert main(["label", str(r), "--no-progress"]) == 0
    assert "1 skipped" in capsys.readouterr().out
    data = json.loads((tmp_path / "run" / "label" / "pseudo_labels.json").read_text())
    assert [im["file_name"] for im in data["images"]] == ["d0.png", "d1.png", "d2.png", "sub/d3.png"]
    assert data["info"]["image_root"] == str(folder.resolve())
    truth = [splits.unlabeled.ground_truth.get_target(i)["label"] for i in range(4)]
    assert sum(a["category_id"] == t for a, t in zip(data["annotations"], truth)) >= 3
    assert not (tmp_path / "run" / "label" / "quality.json").exists()
    skipped = json.loads((tmp_path / "run" / "label" / "skipped.jsonl").read_text())
    assert skipped["file"] == "broken.png"


def test_bad_recipe_fails_before_any_image_is_read(tmp_path, teacher, capsys, monkeypatch):
    monkeypatch.setattr(L.sharded, "label_shard", lambda *a, **k: pytest.fail("an image was read"))
    cases = [(["label.selector.name=count_matsh"], "Did you mean 'count_match'"),
             (["label.transforms=[{name: fliph}]"], "Unknown transform 'fliph'"),
             (["label.aggregator.name=heatmap_mean"], "label.keypoints.aggregator"),
             (["label.batchsize=3"], "Did you mean 'batch_size'"),
             (["labels.x=1"], "unknown section 'labels'"),
             (["teacher.checkpoint=/nonexistent.pt"], "does not exist")]
    for overrides, msg in cases:
        assert main(["label", str(recipe(tmp_path, teacher)), *overrides, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert msg in err, (overrides, err)
    assert not (tmp_path / "run" / "label" / "shards").exists()


def test_strategies_are_built_before_the_data(tmp_path, teacher, monkeypatch, capsys):
    """A COCO dataset checks its images when it is built: a bad label section must fail before that."""
    import ddkit_plugins.datasets as datasets

    monkeypatch.setattr(datasets, "check_images", lambda *a, **k: pytest.fail("the images were checked"))
    monkeypatch.setattr(datasets, "read_image", lambda *a, **k: pytest.fail("an image was read"))
    coco = REPO.parent / "shared" / "data" / "coco-val2017-mini" / "test_coco.json"
    cfg = json.loads(recipe(tmp_path, teacher).read_text())
    cfg["data"] = {"train": {"dataset": {"name": "coco", "annotations": str(coco)}}}
    cfg["label"]["aggregator"] = {"name": "heatmap_mean"}  # valid block, wrong input type: found when built
    (tmp_path / "coco.yaml").write_text(json.dumps(cfg))
    assert main(["label", str(tmp_path / "coco.yaml"), "--no-progress"]) == 2
    assert "ensembles heatmaps" in capsys.readouterr().err


def test_shard_option_then_merge(tmp_path, teacher, capsys):
    r = str(recipe(tmp_path, teacher, shards=3))
    assert main(["label", r, "--shard", "1/2", "--no-progress"]) == 0
    assert "labelled 1 shard(s)" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "run" / "label" / "shards").glob("*.pt")) == \
        ["shard-00001-of-00003.pt"]
    assert main(["label", r, "--no-progress"]) == 0
    assert (tmp_path / "run" / "label" / "pseudo_labels.json").is_file()
    assert main(["label", r, "--shard", "2/2"]) == 2
    assert "--shard must be I/N" in capsys.readouterr().err


def test_torchrun_two_processes_equal_one_process(tmp_path, teacher):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    one = recipe(tmp_path, teacher, out="one", shards=3, keep_raw=True)
    two = recipe(tmp_path, teacher, out="two", shards=3, keep_raw=True)
    subprocess.run([sys.executable, "-m", "ddkit", "label", str(one), "--no-progress"], check=True, env=env,
                   cwd=REPO, capture_output=True, timeout=300)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "ddkit", "label", str(two), "--no-progress"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("pseudo-labels:") == 1  # rank 0 merged, rank 1 labelled its part only
    assert "rank 0 selects" in proc.stdout and "--shard" not in proc.stdout  # no advice about options not given
    for name in ("pseudo_labels.json", "summary.json", "quality.json", "skipped.jsonl"):
        a = (tmp_path / "one" / "label" / name).read_text()
        b = (tmp_path / "two" / "label" / name).read_text()
        assert a.replace(str(tmp_path / "one"), "X") == b.replace(str(tmp_path / "two"), "X"), name
    for s in range(3):
        name = f"shard-{s:05d}-of-00003.pt"
        a, b = (load_shard(tmp_path / d / "label" / "shards" / name) for d in ("one", "two"))
        assert torch.equal(a["ensemble"]["scores"], b["ensemble"]["scores"])
        assert torch.equal(a["raw"]["views"][1]["probs"], b["raw"]["views"][1]["probs"])


def test_keypointrcnn_teacher_end_to_end(tmp_path, capsys):
    """The builtin keypoints task and a (tiny, untrained) Keypoint R-CNN through ``ddkit label``: the keypoint head
    runs on the aggregated boxes mapped into each view and the heatmaps are averaged in the box's frame."""
    reg = get_registry()
    task = reg.build("tasks", "keypoints")
    figures = {"name": "synthetic_figures", "image_size": 64, "min_height": 30, "max_height": 50}
    data = {"train": {"dataset": {**figures, "num_images": 4}},
            "unlabeled": {"dataset": {**figures, "num_images": 3, "seed": 4}}}
    info = build_data(data).info
    torch.manual_seed(0)
    model = task.build_model({"name": "keypointrcnn", "backbone": "tiny", "min_size": 64, "max_size": 64,
                              "detections_per_img": 3, "keypoint_head": [16, 16]}, info)
    ckpt = save_model(model, tmp_path / "kp.pt")
    cfg = {"run": {"out_dir": str(tmp_path / "run")}, "data": data, "teacher": {"checkpoint": str(ckpt)},
           "label": {"transforms": [{"name": "identity"}, {"name": "hflip"}], "aggregator": {"name": "wbf"},
                     "selector": {"name": "count_match"}, "batch_size": 3, "keep_raw": True}}
    (tmp_path / "kp.yaml").write_text(json.dumps(cfg))
    assert main(["label", str(tmp_path / "kp.yaml"), "--no-progress"]) == 0
    out = tmp_path / "run" / "label"
    coco = json.loads((out / "pseudo_labels.json").read_text())
    assert coco["info"]["keypoint_aggregator"] == {"name": "heatmap_mean"}
    assert coco["info"]["transforms"][1]["flip_indices"] == info.flip_indices  # the dataset's, not COCO's
    rec = load_shard(out / "shards" / "shard-00000-of-00001.pt")
    assert rec["ensemble"]["keypoints"].shape[1:] == (7, 3) and len(rec["ensemble"]["keypoints"]) > 0
    target = coco["info"]["thresholds"]["target"]["1"]
    assert target == round_half_up(sum(len(build_data(data).labeled.get_target(i)["labels"]) for i in range(4)) / 4 * 3)
    assert len(coco["annotations"]) == min(target, len(rec["ensemble"]["scores"]))
    for a in coco["annotations"]:
        assert len(a["keypoints"]) == 21
    # the file is a COCO keypoint file: its category names the keypoints, so pycocotools and ddkit's COCO reader
    # see keypoints (and the flip pairs follow from the names) when it is given back as a dataset
    from pycocotools.coco import COCO

    from ddkit.engine.coco_file import validate_coco

    assert COCO(str(out / "pseudo_labels.json")).loadCats(1)[0]["keypoints"] == info.extra["keypoint_names"]
    assert validate_coco(coco, out / "pseudo_labels.json").keypoint_names == info.extra["keypoint_names"]
    q = json.loads((out / "quality.json").read_text())
    assert set(q) >= {"single", "ensemble"} and "AP" in q["ensemble"]
    assert "| ensemble |" in capsys.readouterr().out


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("label_*.yaml")), ids=lambda p: p.name)
def test_example_label_recipes_are_valid(path):
    from ddkit.config import load_config, validate_config

    cfg = load_config(path)
    validate_config(cfg, get_registry(), source=str(path))
    lcfg = L.parse_label_config(cfg.label)
    assert lcfg.transforms and cfg.teacher.checkpoint


def test_the_label_recipe_headers_train_then_label_command_works(tmp_path):
    """``ddkit train configs/train_mnist_teacher.yaml && ddkit label configs/label_digits.yaml`` (shrunk): the label
    recipe finds the teacher where ddkit train wrote it (<out_dir>/teacher)."""
    out = f"run.out_dir={tmp_path}"
    assert main(["train", str(REPO / "configs" / "train_mnist_teacher.yaml"), out, "teacher.train.iterations=3",
                 "--no-progress"]) == 0
    assert main(["label", str(REPO / "configs" / "label_digits.yaml"), out, "label.max_images=40",
                 "--no-progress"]) == 0
    assert (tmp_path / "label" / "pseudo_labels.json").is_file()


def test_without_teacher_checkpoint_label_takes_the_teacher_ddkit_train_wrote(tmp_path, teacher, capsys):
    """``ddkit train --stage teacher`` then ``ddkit label`` of the same recipe: no teacher.checkpoint needed (as
    ``ddkit train --stage student`` finds it); with none trained, the error says where it looked."""
    import shutil

    path = recipe(tmp_path, teacher)
    cfg = json.loads(path.read_text())
    del cfg["teacher"]
    path.write_text(json.dumps(cfg))
    assert main(["label", str(path), "--no-progress"]) == 2
    assert f"{tmp_path / 'run' / 'teacher'} holds none" in capsys.readouterr().err
    (tmp_path / "run" / "teacher").mkdir(parents=True)
    shutil.copy(teacher, tmp_path / "run" / "teacher" / "model.pt")
    assert main(["label", str(path), "--no-progress"]) == 0
    info = json.loads((tmp_path / "run" / "label" / "pseudo_labels.json").read_text())["info"]
    assert info["teacher_checkpoint"] == str(tmp_path / "run" / "teacher" / "model.pt")
