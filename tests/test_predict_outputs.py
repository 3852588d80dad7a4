"""What ``ddkit predict`` writes besides the boxes (pass 23): a YOLO pose line's keypoint conf is a probability,
``images.json`` names the category ids ``predictions.json`` carries, a folder of an earlier prediction's files is
refused, ``data.yaml`` maps YOLO classes back to category ids; and COCO metrics of no detections read -1 where a
size range has no ground truth, as pycocotools does."""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import ddkit
from ddkit.cli import main
from ddkit.engine.checkpoint import load_model, save_model
from ddkit.engine.data import read_image

pytestmark = pytest.mark.usefixtures("one_thread")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY = {"backbone": "tiny", "min_size": 64, "max_size": 64, "anchor_sizes": [16, 32, 64, 128, 256],
        "representation_size": 32, "box_batch_size_per_image": 16, "rpn_post_nms_top_n_test": 50,
        "score_thresh": 0.0, "detections_per_img": 5}


def _yolo(root: str) -> object:
    return ddkit.build("datasets", {"name": "yolo", "root": str(DATA / root), "split": "val"})


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> Path:
    """An untrained tiny Faster R-CNN for coco8's 80 classes (score threshold 0: it always predicts boxes)."""
    torch.manual_seed(0)
    model = ddkit.build("tasks", "detection").build_model({"name": "fasterrcnn", **TINY}, _yolo("coco8").info)
    return save_model(model, tmp_path_factory.mktemp("det") / "model.pt")


def test_predict_yolo_pose_conf_is_the_sigmoid_of_keypoint_rcnns_logit(tmp_path):
    """A Keypoint R-CNN's keypoint scores are heatmap logits (here constant maps of -6..6 per keypoint): the YOLO
    line's conf is their sigmoid, in [0, 1], as Ultralytics' save_conf writes it (they were written raw)."""
    torch.manual_seed(0)
    info = _yolo("coco8-pose").info
    model = ddkit.build("tasks", "keypoints").build_model({"name": "keypointrcnn", **TINY, "keypoint_head": [8]},
                                                         info)
    head = model.roi_heads.keypoint_predictor.kps_score_lowres
    logits = torch.linspace(-6, 6, info.num_keypoints)
    with torch.no_grad():  # a constant heatmap per keypoint: its value at the argmax is the bias
        head.weight.zero_()
        head.bias.copy_(logits)
    ckpt = save_model(model, tmp_path / "pose.pt")
    image = DATA / "coco8-pose" / "images" / "val" / "000000000113.jpg"
    assert main(["predict", str(ckpt), str(image), "--format", "yolo", "-o", str(tmp_path / "p")]) == 0
    task, model, _ = load_model(ckpt)
    inst = task.predict(model, [read_image(image)])[0]
    assert task.keypoint_score_kind(model) == "logit"
    assert len(inst) > 0 and float(inst.keypoints[..., 2].abs().max()) > 1  # the raw scores leave [0, 1]
    rows = [list(map(float, line.split())) for line in (tmp_path / "p" / "labels" / "000000000113.txt").read_text()
            .splitlines()]
    assert len(rows) == len(inst)
    conf = torch.tensor([r[5:-1][2::3] for r in rows])
    assert float(conf.min()) >= 0 and float(conf.max()) <= 1
    assert torch.allclose(conf, inst.keypoints[..., 2].sigmoid(), atol=1e-5)
    assert torch.allclose(conf[0], logits.sigmoid(), atol=1e-4)


def test_predict_yolo_keeps_keypoint_probabilities_of_a_model_that_declares_them():
    """A model whose keypoint scores already are probabilities (the YOLO pose adapter declares
    ``keypoint_score_kind = "probability"``) is written as it is."""
    from ddkit.commands.predict import _yolo_line
    from ddkit.types import Instances

    class Pose(nn.Module):
        keypoint_score_kind = "probability"

    task = ddkit.build("tasks", "keypoints")
    assert task.keypoint_score_kind(Pose()) == "probability"
    assert ddkit.build("tasks", "detection").keypoint_score_kind(nn.Linear(1, 1)) == "probability"
    kps = torch.tensor([[[10.0, 20.0, 0.25], [30.0, 40.0, 0.75]]])
    inst = Instances(torch.tensor([[0.0, 0.0, 50.0, 50.0]]), torch.tensor([0.5]), torch.tensor([1]), kps, (100, 100))
    assert _yolo_line(inst, 0, 0, 100, 100).split()[5:11] == ["0.1", "0.2", "0.25", "0.3", "0.4", "0.75"]
    assert _yolo_line(inst, 0, 0, 100, 100, kpt_logits=True).split()[7] == f"{1 / (1 + math.exp(-0.25)):.6g}"


def test_predict_coco_images_json_lists_the_category_ids_the_results_carry(detector, tmp_path, capsys):
    """``--coco`` whose classes are some of the model's under other ids: images.json's categories are that file's,
    so pycocotools' loadRes of predictions.json on images.json names each result's class right."""
    from pycocotools.coco import COCO

    images = DATA / "coco-val2017-mini"
    assert main(["predict", str(detector), str(images), "-o", str(tmp_path / "b")]) == 0
    plain = [r["category_id"] for r in json.loads((tmp_path / "b" / "predictions.json").read_text())]
    ours = max(set(plain), key=plain.count)
    names = {int(c["id"]): str(c["name"]) for c in load_model(detector)[2].categories}
    other = next(i for i in names if i not in plain and i != ours)
    coco = json.loads((images / "test_coco.json").read_text())
    coco["categories"] = [{"id": 1, "name": names[other]}, {"id": 99, "name": names[ours]}]
    coco["annotations"] = []
    (tmp_path / "c.json").write_text(json.dumps(coco))
    assert main(["predict", str(detector), str(images), "--coco", str(tmp_path / "c.json"),
                 "-o", str(tmp_path / "a")]) == 0
    index = json.loads((tmp_path / "a" / "images.json").read_text())
    results = json.loads((tmp_path / "a" / "predictions.json").read_text())
    assert [(c["id"], c["name"]) for c in index["categories"]] == [(1, names[other]), (99, names[ours])]
    assert results and {r["category_id"] for r in results} == {99}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = index
        gt.createIndex()
        dt = gt.loadRes(results)
    assert {dt.cats[a["category_id"]]["name"] for a in dt.anns.values()} == {names[ours]}


def test_predict_yolo_data_yaml_maps_classes_back_to_category_ids(detector, tmp_path):
    """predict's data.yaml has the label stage's YOLO export keys, ``ddkit_category_ids`` included."""
    from ddkit.engine.yolo_export import class_keys

    image = DATA / "coco8" / "images" / "val" / "000000000042.jpg"
    assert main(["predict", str(detector), str(image), "--format", "yolo", "-o", str(tmp_path / "y")]) == 0
    data = yaml.safe_load((tmp_path / "y" / "data.yaml").read_text())
    info = load_model(detector)[2]
    assert data["ddkit_category_ids"] == [int(c["id"]) for c in info.categories]
    assert data == class_keys(info)


def test_coco_metrics_of_no_detections_are_minus_one_where_a_range_has_no_ground_truth():
    """No detections: 0 where there is ground truth, -1 for a size range without any (APl here), as pycocotools
    gives beside a detection; every metric was 0."""
    from ddkit.engine.coco_eval import coco_evaluate, coco_evaluate_per_category

    gt = {"images": [{"id": 1, "width": 100, "height": 100}], "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"image_id": 1, "category_id": 1, "bbox": [2, 2, 8, 8]},
                          {"image_id": 1, "category_id": 1, "bbox": [20, 20, 50, 50]}]}
    none = coco_evaluate(gt, [])
    assert none["APl"] == none["ARl"] == -1.0
    assert none["AP"] == none["APs"] == none["APm"] == none["ARs"] == 0.0
    missed = coco_evaluate(gt, [{"image_id": 1, "category_id": 1, "bbox": [80, 80, 3, 3], "score": 0.5}])
    assert none == missed  # one detection matching nothing: pycocotools' own numbers
    assert coco_evaluate_per_category(gt, [])[1][1]["AP"] == 0.0
