"""Tasks train and evaluate on small real or synthetic data; COCO AP of ground truth is 1; the Task protocol and the
models contract over every registered strategy."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ddkit
from ddkit.engine.data import get_target, split_dataset
from ddkit.engine.task import category_ids
from ddkit.engine.train import train_model
from ddkit.errors import ConfigError, DataError
from ddkit.testing import build_examples, example_blocks, registered
from ddkit.testing.models import check_model, info_for_task
from ddkit.testing.tasks import check_task
from ddkit.types import DatasetInfo, Instances

DATA = Path(__file__).parents[1].parent / "shared" / "data"
COCO_JSON = DATA / "coco-val2017-mini" / "test_coco.json"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="shared/data fixtures are not beside the repository")

TINY_RCNN = {"backbone": "tiny", "min_size": 64, "max_size": 64, "anchor_sizes": [16, 32, 64, 128, 256],
             "representation_size": 64, "box_batch_size_per_image": 32, "rpn_post_nms_top_n_train": 200,
             "rpn_post_nms_top_n_test": 100}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"losses"' in line]


# ------------------------------------------------------------------------------------------------ training
def test_classification_trains_and_evaluates_on_real_digits(tmp_path):
    task = ddkit.build("tasks", "classification")
    splits = split_dataset(ddkit.build("datasets", "digits"), labeled=0.5, test=0.2, seed=0)
    torch.manual_seed(0)
    model = task.build_model({"name": "lenet", "channels": [8, 16], "hidden": 32}, splits.info)
    res = train_model(task, model, splits.labeled, {"iterations": 120, "batch_size": 32, "lr": 0.05,
                                                    "log_every": 40}, tmp_path, eval_set=splits.test, progress=False)
    assert res["finished"] and res["metrics"]["accuracy"] > 0.85
    assert res["metrics"]["error"] == pytest.approx(1 - res["metrics"]["accuracy"])
    losses = _losses(tmp_path)
    assert losses[-1] < losses[0] / 2


def test_detection_trains_and_evaluates_on_synthetic_shapes(tmp_path):
    task = ddkit.build("tasks", "detection")
    ds = ddkit.build("datasets", {"name": "synthetic_shapes", "num_images": 8, "image_size": 64, "num_classes": 2,
                                  "min_object": 14, "max_object": 30, "max_objects": 2})
    torch.manual_seed(0)
    model = task.build_model({"name": "fasterrcnn", **TINY_RCNN}, ds.info)
    res = train_model(task, model, ds, {"iterations": 60, "batch_size": 4, "lr": 0.02, "warmup": 10,
                                        "clip_grad_norm": 10.0, "log_every": 20}, tmp_path, eval_set=ds,
                      progress=False)
    m = res["metrics"]
    assert set(m) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert m["AP50"] > 0.5, m  # 8 training images: the detector must at least fit them
    losses = _losses(tmp_path)
    assert losses[-1] < losses[0]


def test_keypoints_train_and_evaluate_on_synthetic_figures(tmp_path):
    task = ddkit.build("tasks", "keypoints")
    ds = ddkit.build("datasets", {"name": "synthetic_figures", "num_images": 8, "image_size": 64, "min_height": 30,
                                  "max_height": 60, "max_figures": 1})
    torch.manual_seed(0)
    model = task.build_model({"name": "keypointrcnn", **TINY_RCNN, "keypoint_head": [32, 32]}, ds.info)
    res = train_model(task, model, ds, {"iterations": 60, "batch_size": 4, "lr": 0.02, "warmup": 10,
                                        "clip_grad_norm": 10.0, "log_every": 20, "hflip": 0.5}, tmp_path,
                      eval_set=ds, progress=False)
    m = res["metrics"]
    assert {"AP", "AP50", "bbox_AP"} <= set(m)
    assert m["AP"] > 0.3, m
    losses = _losses(tmp_path)
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------------------------------------ COCO AP
class _AsPredictions:
    @staticmethod
    def of(ds, keypoints: bool) -> list[Instances]:
        preds = []
        for i in range(len(ds)):
            t = get_target(ds, i)
            n = len(t["boxes"])
            kps = None
            keep = torch.ones(n, dtype=torch.bool)
            if keypoints:
                kps = t["keypoints"].clone()
                keep = (kps[..., 2] > 0).any(1)  # people without labeled keypoints are ignored by COCO OKS eval
                kps[..., 2] = 1.0
            preds.append(Instances(t["boxes"], torch.ones(n), t["labels"], kps, t.get("size"))[keep])
        return preds


@needs_data
def test_coco_ground_truth_as_predictions_scores_ap_1():
    ds = ddkit.build("datasets", {"name": "coco", "annotations": str(COCO_JSON)})
    det = ddkit.build("tasks", "detection").evaluate_predictions(_AsPredictions.of(ds, False), ds)
    assert det["AP"] == pytest.approx(1.0) and det["AP50"] == pytest.approx(1.0)
    kp = ddkit.build("tasks", "keypoints").evaluate_predictions(_AsPredictions.of(ds, True), ds)
    assert kp["AP"] == pytest.approx(1.0) and kp["AP50"] == pytest.approx(1.0)


@needs_data
def test_coco_ap_drops_with_shifted_keypoints_and_missing_boxes():
    ds = ddkit.build("datasets", {"name": "coco", "annotations": str(COCO_JSON)})
    preds = _AsPredictions.of(ds, True)
    shifted = [Instances(p.boxes, p.scores, p.labels, p.keypoints + torch.tensor([15.0, 0.0, 0.0]), p.image_size)
               for p in preds]
    kp = ddkit.build("tasks", "keypoints").evaluate_predictions(shifted, ds)
    assert kp["AP"] < 0.9
    half = [p[torch.arange(len(p)) % 2 == 0] for p in preds]
    det = ddkit.build("tasks", "detection").evaluate_predictions(half, ds)
    assert 0.2 < det["AP"] < 0.8


def test_classification_accuracy_by_hand():
    task = ddkit.build("tasks", "classification")
    ds = ddkit.build("datasets", "digits")
    sub = split_dataset(ds, labeled=0.01, seed=0).labeled
    labels = [get_target(sub, i)["label"] for i in range(len(sub))]
    preds = [torch.nn.functional.one_hot(torch.tensor((y + (i % 2)) % 10), 10).float()
             for i, y in enumerate(labels)]
    m = task.evaluate_predictions(preds, sub)
    expected = sum(1 for i in range(len(labels)) if i % 2 == 0) / len(labels)
    assert m["accuracy"] == pytest.approx(expected) and m["num_samples"] == len(labels)


# ---------------------------------------------------------------------------------------- category mapping
def test_detection_maps_noncontiguous_category_ids():
    task = ddkit.build("tasks", "detection")
    ds = ddkit.build("datasets", {"name": "synthetic_shapes", "num_images": 2, "image_size": 64, "max_object": 30})
    info = DatasetInfo([{"id": 7, "name": "a"}, {"id": 3, "name": "b"}, {"id": 42, "name": "c"}])
    model = task.build_model({"name": "fasterrcnn", **TINY_RCNN}, info)
    assert category_ids(model) == [7, 3, 42]
    targets = [{"image_id": 0, "boxes": torch.tensor([[1.0, 1, 20, 20], [5, 5, 30, 40]]),
                "labels": torch.tensor([42, 7])}]
    mapped = task._model_targets(model, targets)
    assert mapped[0]["labels"].tolist() == [3, 1]
    with pytest.raises(DataError, match="category id 5"):
        task._model_targets(model, [{"image_id": 0, "boxes": torch.tensor([[1.0, 1, 9, 9]]),
                                     "labels": torch.tensor([5])}])
    model.roi_heads.score_thresh = 0.0
    preds = task.predict(model, [ds[0][0]])
    assert set(preds[0].labels.tolist()) <= {7, 3, 42}


def test_models_of_another_task_are_refused():
    task = ddkit.build("tasks", "classification")
    with pytest.raises(ConfigError, match="is for task 'detection'"):
        task.build_model({"name": "fasterrcnn"}, info_for_task("classification"))
    with pytest.raises(ConfigError, match="category ids 0..C-1"):
        task.build_model({"name": "mlp"}, DatasetInfo([{"id": 1, "name": "a"}], extra={"image_shape": [1, 2, 2]}))


# ------------------------------------------------------------------------------------------------ pretrained
def test_pretrained_only_from_a_local_file(tmp_path):
    task = ddkit.build("tasks", "classification")
    info = info_for_task("classification", image_shape=(3, 32, 32))
    with pytest.raises(ConfigError, match="never downloads"):
        task.build_model({"name": "timm", "model_name": "resnet18", "pretrained": str(tmp_path / "none.pth")}, info)
    torch.manual_seed(0)
    source = task.build_model({"name": "timm", "model_name": "resnet18"}, info)
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    torch.manual_seed(1)
    loaded = task.build_model({"name": "timm", "model_name": "resnet18", "pretrained": str(tmp_path / "r18.pth")},
                              info)
    for k, v in source.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    other = info_for_task("classification", num_classes=5, image_shape=(3, 32, 32))
    with pytest.warns(UserWarning, match="different shape"):  # a new class head keeps its own init
        task.build_model({"name": "timm", "model_name": "resnet18", "pretrained": str(tmp_path / "r18.pth")}, other)


# ------------------------------------------------------------------------------------------------ contracts
def _task_case(name: str):
    if name == "classification":
        return ddkit.build("datasets", "digits"), {"name": "mlp", "hidden": [16]}
    if name == "detection":
        return (ddkit.build("datasets", {"name": "synthetic_shapes", "num_images": 4, "image_size": 64,
                                         "max_object": 30}), {"name": "fasterrcnn", **TINY_RCNN})
    return (ddkit.build("datasets", {"name": "synthetic_figures", "num_images": 4, "image_size": 64,
                                     "min_height": 30, "max_height": 60}),
            {"name": "keypointrcnn", **TINY_RCNN, "keypoint_head": [16]})


@pytest.mark.parametrize("entry", registered("tasks"), ids=lambda e: e.spec.name)
def test_every_registered_task_meets_the_protocol(entry):
    if entry.spec.name not in ("classification", "detection", "keypoints"):
        pytest.skip("a third-party task: test it with ddkit.testing.tasks.check_task and its own data")
    dataset, model_cfg = _task_case(entry.spec.name)
    for task in build_examples(entry):
        check_task(task, dataset, model_cfg)


@pytest.mark.parametrize("entry", registered("models"), ids=lambda e: e.spec.name)
def test_every_registered_model_builds_for_its_task_and_runs(entry):
    blocks = example_blocks(entry)
    if entry.spec.name == "timm":
        blocks = [{"model_name": "resnet18"}]
    for block in blocks:
        check_model(entry, block)


def test_coco_evaluate_uses_the_given_keypoint_sigmas():
    """Keypoint AP of a 3-keypoint set depends on its OKS sigmas: a loose sigma forgives an offset a tight one does
    not."""
    from ddkit.engine.coco_eval import coco_evaluate

    gt = {"images": [{"id": 1, "height": 100, "width": 100}],
          "categories": [{"id": 1, "name": "f", "keypoints": ["a", "b", "c"], "skeleton": []}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 60, 60], "area": 3600,
                           "iscrowd": 0, "num_keypoints": 3, "keypoints": [20, 20, 2, 40, 40, 2, 60, 60, 2]}]}
    pred = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 60, 60], "score": 0.9,
             "keypoints": [24, 20, 1, 44, 40, 1, 64, 60, 1]}]
    tight = coco_evaluate(gt, pred, "keypoints", sigmas=[0.01] * 3)["AP"]
    loose = coco_evaluate(gt, pred, "keypoints", sigmas=[1.0] * 3)["AP"]
    assert loose == pytest.approx(1.0) and tight < 0.5


def _one_category_ap(gt: dict, results: list[dict], category: int, iou_type: str = "bbox") -> tuple[float, float]:
    """The slow reference: pycocotools run on one category alone (``params.catIds``), its AP and AP50."""
    import contextlib
    import io

    from pycocotools.cocoeval import COCOeval

    from ddkit.engine.coco_eval import make_coco

    with contextlib.redirect_stdout(io.StringIO()):
        coco = make_coco(gt)
        ev = COCOeval(coco, coco.loadRes([dict(r) for r in results]), iou_type)
        ev.params.catIds = [category]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0]), float(ev.stats[1])


@pytest.mark.parametrize("seed", range(4))
def test_per_category_ap_is_pycocotools_run_on_each_category_alone(seed):
    """Random boxes of 4 categories on 6 images, predictions jittered, missed, invented and mislabelled: each
    category's AP and AP50 equal pycocotools' own summary restricted to that category; a category without ground
    truth is nan, one with ground truth but no prediction 0."""
    import math

    from ddkit.engine.coco_eval import coco_evaluate_per_category

    g = torch.Generator().manual_seed(seed)
    images = [{"id": i, "height": 200, "width": 240} for i in range(1, 7)]
    cats = [{"id": c, "name": f"c{c}"} for c in (1, 3, 4, 9)]  # 9: no ground truth; 4: never predicted
    anns, results = [], []
    for im in images:
        for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
            cat = (1, 3, 4)[int(torch.randint(0, 3, (1,), generator=g))]
            x, y = (torch.rand(2, generator=g) * 150).tolist()
            w, h = (torch.rand(2, generator=g) * 40 + 10).tolist()
            anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": cat, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0})
            if cat != 4 and float(torch.rand(1, generator=g)) < 0.8:  # found, a few pixels off
                jitter = (torch.randn(4, generator=g) * 3).tolist()
                label = cat if float(torch.rand(1, generator=g)) < 0.9 else 9
                results.append({"image_id": im["id"], "category_id": label, "score": float(torch.rand(1, generator=g)),
                                "bbox": [x + jitter[0], y + jitter[1], w + jitter[2], h + jitter[3]]})
        results.append({"image_id": im["id"], "category_id": 1, "bbox": [0, 0, 30, 30],  # an invented box
                        "score": float(torch.rand(1, generator=g))})
    gt = {"images": images, "categories": cats, "annotations": anns}
    from ddkit.engine.coco_eval import coco_evaluate

    stats, per = coco_evaluate_per_category(gt, results)
    assert stats == coco_evaluate(gt, results)  # the summary of the same evaluation
    assert sorted(per) == [1, 3, 4, 9]
    for c in (1, 3):
        assert (per[c]["AP"], per[c]["AP50"]) == pytest.approx(_one_category_ap(gt, results, c))
        assert per[c]["instances"] == sum(a["category_id"] == c for a in anns)
    assert per[4]["AP"] == 0.0 and per[4]["instances"] > 0
    assert math.isnan(per[9]["AP"]) and per[9]["instances"] == 0


@needs_data
def test_per_class_rows_of_each_builtin_instance_task_and_classification():
    """Ground truth as predictions: AP 1 for each class with ground truth (boxes; keypoints by OKS); with every
    other person dropped, the person's box AP is pycocotools' on that category. Classification: each class's
    accuracy (recall) and precision by hand."""
    ds = ddkit.build("datasets", {"name": "coco", "annotations": str(COCO_JSON)})
    for task_name, keypoints in (("detection", False), ("keypoints", True)):
        task = ddkit.build("tasks", task_name)
        metrics, rows = task.evaluate_per_class(_AsPredictions.of(ds, keypoints), ds)
        assert metrics == task.evaluate_predictions(_AsPredictions.of(ds, keypoints), ds)
        assert [r["name"] for r in rows] == [c["name"] for c in ds.info.categories]
        boxes = sum(len(get_target(ds, i)["boxes"]) for i in range(len(ds)))
        assert rows[0]["AP"] == pytest.approx(1.0) and rows[0]["instances"] == boxes
    task = ddkit.build("tasks", "detection")
    half = [p[torch.arange(len(p)) % 2 == 0] for p in _AsPredictions.of(ds, False)]
    row = task.evaluate_per_class(half, ds)[1][0]
    gt, results = task.coco_ground_truth(ds), task._results(half, False)
    assert (row["AP"], row["AP50"]) == pytest.approx(_one_category_ap(gt, results, int(row["id"])))
    cls = ddkit.build("tasks", "classification")
    digits = split_dataset(ddkit.build("datasets", "digits"), labeled=0.05, seed=0).labeled
    labels = [get_target(digits, i)["label"] for i in range(len(digits))]
    said = [(y + 1) % 10 if i % 3 == 0 else y for i, y in enumerate(labels)]
    one_hot = [torch.nn.functional.one_hot(torch.tensor(s), 10).float() for s in said]
    rows = cls.evaluate_per_class(one_hot, digits)[1]
    for r in rows:
        k = r["id"]
        right = sum(1 for y, s in zip(labels, said) if y == s == k)
        assert r["instances"] == labels.count(k)
        assert r["accuracy"] == pytest.approx(right / labels.count(k))
        assert r["precision"] == pytest.approx(right / said.count(k))
