"""The ``yolo`` model: registration, the torchvision-style adapter, weights and the export for Ultralytics."""
from __future__ import annotations

import pytest
import torch

import ddkit
from ddkit import ConfigError
from ddkit.testing import check_spec
from ddkit.testing.models import check_model, info_for_task
from yolo_common import DATA, TINY, TINY_POSE

# three classes no COCO weights file names: its class head cannot be picked by name
OTHER3 = [{"id": i, "name": name} for i, name in enumerate(("bolt", "nut", "washer"))]


def _entry():
    return next(e for e in ddkit.get_registry().entries("models") if e.spec.name == "yolo")


@pytest.fixture(scope="module")
def coco8():
    return ddkit.build("datasets", {"name": "yolo", "root": str(DATA / "coco8"), "split": "train"})


@pytest.fixture(scope="module")
def coco8_pose():
    return ddkit.build("datasets", {"name": "yolo", "root": str(DATA / "coco8-pose"), "split": "train"})


def test_registered_by_this_distribution_for_both_tasks():
    entry = _entry()
    assert entry.provider.replace("_", "-") == "ddkit-ultralytics"
    assert entry.spec.task == "detection" and "keypoints" in entry.spec.also_tasks
    check_spec(entry)
    check_model(entry, dict(entry.spec.examples[0]))
    task = ddkit.build("tasks", {"name": "keypoints"})
    model = task.build_model(TINY_POSE, info_for_task("keypoints", num_keypoints=5))
    preds = task.predict(model, [torch.rand(3, 48, 64)])
    assert preds[0].keypoints is not None and preds[0].keypoints.shape[1:] == (5, 3)


def test_bad_blocks_are_one_line_config_errors(coco8):
    task = ddkit.build("tasks", {"name": "detection"})
    with pytest.raises(ConfigError, match="imgsz"):
        task.build_model({**TINY, "imgsz": 50}, coco8.info)
    with pytest.raises(ConfigError, match="not an Ultralytics model yaml"):
        task.build_model({**TINY, "cfg": "yolov99z.yaml"}, coco8.info)
    with pytest.raises(ConfigError, match="pose model, but the dataset has no keypoints"):
        task.build_model(TINY_POSE, coco8.info)


@pytest.mark.parametrize("cfg, head", [("yolov8n-seg.yaml", "Segment"), ("yolov8n-obb.yaml", "OBB"),
                                       ("yolov8n-cls.yaml", "Classify"), ("yolo26n-seg.yaml", "Segment26"),
                                       ("yolov8s-worldv2.yaml", "WorldDetect")])
def test_heads_other_than_detect_and_pose_are_refused_at_build(cfg, head, coco8):
    """-seg crashed at evaluation after training, -cls with a traceback, -obb trained silently: refused at build
    (``ddkit run`` builds every model before the first stage), naming the head and what is supported."""
    task = ddkit.build("tasks", {"name": "detection"})
    with pytest.raises(ConfigError, match=f"its head is {head}; the yolo model takes Detect heads") as err:
        task.build_model({**TINY, "cfg": cfg}, coco8.info)
    assert "\n" not in str(err.value) and cfg in str(err.value)


@pytest.mark.parametrize("block, task_name", [(TINY, "detection"), (TINY_POSE, "keypoints")])
def test_a_build_logs_no_ultralytics_override_of_nc_or_kpt_shape(block, task_name, monkeypatch):
    """The dataset's class and keypoint counts go into the yaml dict: no "Overriding model.yaml nc=80 with nc=3"
    (printed on every build of every stage) and the network has them."""
    from ultralytics.nn import tasks

    lines = []
    monkeypatch.setattr(tasks.LOGGER, "info", lambda msg, *a, **k: lines.append(str(msg)))
    model = ddkit.build("tasks", task_name).build_model(block, info_for_task(task_name, num_keypoints=5))
    assert not [line for line in lines if "Overriding" in line]
    assert model.num_classes == len(info_for_task(task_name).categories) != 80
    if task_name == "keypoints":
        assert tuple(model.net.kpt_shape) == (5, 3)


def test_training_losses_are_ultralytics_and_decrease(coco8):
    task = ddkit.build("tasks", {"name": "detection"})
    torch.manual_seed(0)
    model = task.build_model(TINY, coco8.info)
    batch = task.collate([coco8[i] for i in range(2)])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    totals = []
    for _ in range(6):
        losses = task.training_forward(model, batch).losses
        assert set(losses) == {"box_loss", "cls_loss", "dfl_loss"}
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        totals.append(float(loss.detach()))
    assert totals[-1] < totals[0]


@pytest.mark.parametrize("factor", [1.0, 0.5])
def test_losses_equal_ultralytics_criterion_on_its_own_batch(coco8, factor):
    """The adapter's targets are Ultralytics' batch: the same loss as the criterion on a hand-made batch (also with
    scale augmentation: ``train_scale`` shrinks the image and its boxes inside the canvas)."""
    from ddkit_ultralytics.letterbox import fitted_size, letterbox

    task = ddkit.build("tasks", {"name": "detection"})
    torch.manual_seed(0)
    model = task.build_model({**TINY, "train_scale": [factor, factor]}, coco8.info).train()
    image, target = coco8[0]
    ours = task.training_forward(model, task.collate([(image, target)])).losses
    size = fitted_size(tuple(image.shape[-2:]), 64, factor)
    x, _, _ = letterbox([image], [size], 32, canvas=(64, 64))
    h, w = image.shape[-2:]
    left, top = round((64 - size[1]) / 2 - 0.1), round((64 - size[0]) / 2 - 0.1)  # centred as Ultralytics does
    b = target["boxes"] / torch.tensor([w, h, w, h]) * torch.tensor([size[1] / 64, size[0] / 64] * 2)
    b = b + torch.tensor([left / 64, top / 64] * 2)
    ref = {"batch_idx": torch.zeros(len(b)), "cls": target["labels"].float()[:, None],
           "bboxes": torch.cat([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], 1)}
    vec, _ = model.net.init_criterion()(model.net(x), ref)
    assert torch.allclose(torch.stack(list(ours.values())), vec, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(37, 53), (53, 37), (61, 20), (64, 64)])
@pytest.mark.parametrize("fixed", [True, False])
def test_letterbox_places_images_as_ultralytics_letterbox(shape, fixed):
    """Training (a fixed square canvas) and inference (the smallest stride-multiple canvas, Ultralytics' ``auto``)
    put the image where Ultralytics' ``LetterBox`` does: centred, the odd pixel of padding after the image. A flat
    image makes the padding mask exact (resampling aside)."""
    import numpy as np
    from ultralytics.data.augment import LetterBox

    from ddkit_ultralytics.letterbox import fitted_size, letterbox, own_canvas

    h, w = shape
    ref = LetterBox(new_shape=(64, 64), auto=not fixed, stride=32)(image=np.full((h, w, 3), 200, np.uint8))
    ours, ratio, offset = letterbox([torch.full((3, h, w), 200 / 255)], [fitted_size(shape, 64)], 32,
                                    canvas=(64, 64) if fixed else own_canvas(fitted_size(shape, 64), 32))
    assert tuple(ours.shape[-2:]) == ref.shape[:2]
    assert torch.equal((ours[0, 0] * 255).round() == 114, torch.from_numpy(ref[..., 0] == 114))
    rows, cols = np.nonzero(ref[..., 0] != 114)
    assert offset[0].tolist() == [cols.min(), rows.min()]


def test_predictions_map_back_to_the_pixels_they_cover():
    """A box and a keypoint on the canvas of a centred image map back to the input pixels they cover, and the
    canvas->input maps invert input->canvas."""
    from ddkit_ultralytics.letterbox import (boxes_from_canvas, boxes_to_canvas, fitted_size, keypoints_from_canvas,
                                             keypoints_to_canvas, letterbox)

    image = torch.zeros(3, 40, 100)
    image[:, 10:20, 30:50] = 1.0  # a white block at x 30..50, y 10..20
    batch, ratio, offset = letterbox([image], [fitted_size((40, 100), 64)], 32, canvas=(64, 64))
    ys, xs = torch.nonzero(batch[0, 0] > 0.5, as_tuple=True)
    found = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
    assert torch.allclose(boxes_from_canvas(found, ratio[0], offset[0], (40, 100)),
                          torch.tensor([[30.0, 10.0, 50.0, 20.0]]), atol=1.6)  # one canvas pixel = 1.56 input
    boxes = torch.tensor([[30.0, 10.0, 50.0, 20.0], [0.0, 0.0, 100.0, 40.0]])
    assert torch.allclose(boxes_from_canvas(boxes_to_canvas(boxes, ratio[0], offset[0]), ratio[0], offset[0],
                                            (40, 100)), boxes, atol=1e-4)
    kps = torch.tensor([[[40.0, 15.0, 2.0], [99.0, 39.0, 1.0]]])
    on_canvas = keypoints_to_canvas(kps, ratio[0], offset[0])
    assert bool((batch[0, 0, on_canvas[0, 0, 1].long(), on_canvas[0, 0, 0].long()] > 0.5))
    assert torch.allclose(keypoints_from_canvas(on_canvas, ratio[0], offset[0], (40, 100)), kps, atol=1e-4)


def test_predictions_are_in_input_pixels_at_any_size(coco8):
    """``at_size`` (multi-scale labelling) runs the image at its own size; both map back into the input frame, and
    the same content at 2x gives the same boxes times 2 when run at its own size."""
    task = ddkit.build("tasks", {"name": "detection"})
    torch.manual_seed(0)
    model = task.build_model({**TINY, "imgsz": 128}, coco8.info).eval()
    image = torch.nn.functional.interpolate(coco8[0][0][None], size=(96, 128), mode="bilinear")[0]
    big = torch.nn.functional.interpolate(image[None], scale_factor=2.0, mode="nearest")[0]
    small = task.predict(model, [image])[0]
    large = task.predict(model, [big])[0]  # resized to imgsz=128 again: the same network input
    assert len(small) > 0 and large.image_size == (192, 256)
    assert torch.allclose(large.boxes, small.boxes * 2, atol=1e-2)
    native = task.predict(model, [image], native_size=True)[0]
    assert native.image_size == (96, 128) and bool((native.boxes[:, 2] <= 128).all())


def test_an_images_predictions_do_not_depend_on_the_others_in_its_batch(coco8):
    """Images of other sizes in one batch: each image's boxes are those it gets alone (its own smallest canvas, as
    Ultralytics' predictor letterboxes one image); a shared canvas sized to the largest moved them (the scores of a
    pose model by up to 23 AP points between ``eval --batch-size`` 1 and 2). Ultralytics' own ``LetterBox(auto)`` on
    one image makes that canvas."""
    import numpy as np
    from ultralytics.data.augment import LetterBox

    from ddkit_ultralytics.letterbox import fitted_size, own_canvas

    task = ddkit.build("tasks", {"name": "detection"})
    torch.manual_seed(0)
    model = task.build_model({**TINY, "imgsz": 128, "conf": 0.0}, coco8.info).eval()
    val = ddkit.build("datasets", {"name": "yolo", "root": str(DATA / "coco8"), "split": "val"})
    images = [val[i][0] for i in range(4)]
    assert len({tuple(im.shape[-2:]) for im in images}) > 1  # coco8's val mixes portrait and landscape images
    together = task.predict(model, images)
    for image, batched in zip(images, together):
        alone = task.predict(model, [image])[0]
        assert len(alone) == len(batched) > 0
        assert torch.equal(alone.labels, batched.labels)
        assert torch.allclose(alone.boxes, batched.boxes, atol=1e-3) and torch.allclose(alone.scores, batched.scores,
                                                                                        atol=1e-5)
        h, w = image.shape[-2:]
        ref = LetterBox(new_shape=(128, 128), auto=True, stride=32)(image=np.zeros((h, w, 3), np.uint8))
        assert own_canvas(fitted_size((h, w), 128), 32) == ref.shape[:2]


def test_pretrained_true_is_offline_one_line_error_then_found_in_the_weights_dir(coco8, monkeypatch, tmp_path):
    from ultralytics.utils import SETTINGS

    task = ddkit.build("tasks", {"name": "detection"})
    monkeypatch.setitem(SETTINGS, "weights_dir", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="yolov8n.pt is not in Ultralytics' weights folder") as err:
        task.build_model({**TINY, "pretrained": True}, coco8.info)
    assert "\n" not in str(err.value)
    # a file in Ultralytics' cache: an Ultralytics checkpoint (a pickle) needs trust_checkpoint
    from ddkit_ultralytics.export import export_ultralytics

    torch.manual_seed(1)
    source = task.build_model(TINY, coco8.info)
    export_ultralytics(source, tmp_path / "yolov8n.pt")
    with pytest.raises(ConfigError, match="trust_checkpoint"):
        task.build_model({**TINY, "pretrained": True}, coco8.info)
    model = task.build_model({**TINY, "pretrained": True, "trust_checkpoint": True}, coco8.info)
    for (k, a), b in zip(source.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    # a plain state dict loads without trust
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    plain = task.build_model({**TINY, "pretrained": str(tmp_path / "weights.pt")}, coco8.info)
    assert torch.equal(plain.net.model[0].conv.weight, source.net.model[0].conv.weight)


def test_weights_file_as_cfg_and_corrupt_weights_are_one_line_diagnoses(coco8, tmp_path, monkeypatch):
    """``cfg: yolov8n.pt`` (what ``YOLO('yolov8n.pt')`` users write) says what to write instead; a damaged file is
    called damaged (not "a pickled checkpoint"), with or without trust, and never a traceback."""
    import random

    from ddkit.errors import DataError
    from ddkit_ultralytics.export import export_ultralytics

    monkeypatch.chdir(tmp_path)
    task = ddkit.build("tasks", {"name": "detection"})
    with pytest.raises(ConfigError, match=r"set cfg: yolov8n.yaml with pretrained: true") as err:
        task.build_model({**TINY, "cfg": "yolov8n.pt"}, coco8.info)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"yolov8n.pt is not a file \(pretrained: true takes Ultralytics' weights"):
        task.build_model({**TINY, "pretrained": "yolov8n.pt"}, coco8.info)
    good = export_ultralytics(task.build_model(TINY, coco8.info), tmp_path / "good.pt")
    (tmp_path / "random.pt").write_bytes(random.Random(0).randbytes(5000))
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:20000])
    for name in ("random.pt", "cut.pt"):
        for trust in (False, True):
            with pytest.raises(DataError, match="cannot be read as a torch file .*: it is corrupt, truncated") as err:
                task.build_model({**TINY, "pretrained": str(tmp_path / name), "trust_checkpoint": trust}, coco8.info)
            assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"holding Python objects \(ultralytics.nn.tasks.DetectionModel\)") as err:
        task.build_model({**TINY, "pretrained": str(good)}, coco8.info)
    assert str(err.value).endswith("or give a state dict")


def test_ultralytics_pt_as_a_ddkit_checkpoint_is_refused_with_the_block_that_loads_it(coco8, tmp_path):
    """An Ultralytics .pt (e.g. runs/detect/train/weights/best.pt) given where a ddkit checkpoint goes: the refusal
    names the yolo model block that loads it (found without unpickling the file), and that block works."""
    import re

    from ddkit.engine.checkpoint import load_model
    from ddkit.errors import DataError
    from ddkit_ultralytics.export import export_ultralytics

    task = ddkit.build("tasks", {"name": "detection"})
    path = export_ultralytics(task.build_model(TINY, coco8.info), tmp_path / "best.pt")
    with pytest.raises(DataError, match=r"Ultralytics checkpoint \(DetectionModel\)") as err:
        load_model(path)
    block = re.search(r"teacher.model: \{name: yolo, cfg: (\S+), pretrained: (\S+), trust_checkpoint: true\}",
                      str(err.value))
    assert block and block.groups() == ("yolov8n.yaml", str(path)) and "\n" not in str(err.value)
    model = task.build_model({**TINY, "cfg": block[1], "pretrained": block[2], "trust_checkpoint": True}, coco8.info)
    reference = torch.load(path, weights_only=False)["model"].model[0].conv.weight
    assert torch.equal(model.net.model[0].conv.weight, reference)


def test_class_names_of_an_ultralytics_pt_are_compared_with_the_dataset(coco8, tmp_path):
    """Same number of classes, names the file lacks: one warning that the class head was loaded by index (the same
    names in another order are taken by name, see the test below)."""
    import dataclasses
    import warnings

    from ddkit_ultralytics.export import export_ultralytics

    task = ddkit.build("tasks", {"name": "detection"})
    path = export_ultralytics(task.build_model(TINY, coco8.info), tmp_path / "best.pt")
    block = {**TINY, "pretrained": str(path), "trust_checkpoint": True}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        task.build_model(block, coco8.info)  # the same names: silent
    cats = coco8.info.categories
    renamed = [{**c, "name": "pedestrian" if c["name"] == "person" else c["name"]} for c in cats]
    info = dataclasses.replace(coco8.info, categories=renamed)
    with pytest.warns(UserWarning, match=r"1 of its 80 class names differ from the dataset's \(class 0 is "
                                         r"'person' there, 'pedestrian' here\); its class head was loaded by index"):
        task.build_model(block, info)


def test_export_loads_in_ultralytics_with_the_same_outputs(coco8, tmp_path):
    from ultralytics import YOLO

    from ddkit_ultralytics.export import export_ultralytics

    task = ddkit.build("tasks", {"name": "detection"})
    model = task.build_model(TINY, coco8.info).eval()
    path = export_ultralytics(model, tmp_path / "student.pt")
    yolo = YOLO(str(path))
    assert yolo.task == "detect" and yolo.names[0] == coco8.info.categories[0]["name"]
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.net(x)[0], yolo.model(x)[0], atol=1e-5)


@pytest.mark.parametrize("cfg", ["yolov8n-pose.yaml", "yolo26n-pose.yaml"])
def test_exported_pose_model_is_a_pose_model_in_ultralytics(cfg, coco8_pose, tmp_path):
    """Ultralytics reads a checkpoint's task from its args: a pose export must say 'pose', or it predicts no
    keypoints and validates with detection metrics."""
    from ultralytics import YOLO

    from ddkit_ultralytics.export import export_ultralytics

    task = ddkit.build("tasks", "keypoints")
    model = task.build_model({**TINY_POSE, "cfg": cfg}, coco8_pose.info).eval()
    yolo = YOLO(str(export_ultralytics(model, tmp_path / "pose.pt")))
    assert yolo.task == "pose"
    result = yolo.predict(torch.rand(1, 3, 64, 64), imgsz=64, conf=0.0, verbose=False)[0]
    assert result.keypoints is not None and tuple(result.keypoints.data.shape[1:]) == (17, 3)


@pytest.mark.parametrize("cfg", ["yolo11n.yaml", "yolov10n.yaml", "yolo26n.yaml", "yolo26n-pose.yaml"])
def test_other_families_train_and_predict(cfg, coco8, coco8_pose):
    """Any Ultralytics yaml with a Detect or Pose head: YOLO11, YOLOv10 (v10Detect), and YOLO26 with its
    end-to-end losses (pose too)."""
    pose = "pose" in cfg
    data = coco8_pose if pose else coco8
    task = ddkit.build("tasks", "keypoints" if pose else "detection")
    torch.manual_seed(0)
    model = task.build_model({**TINY, "cfg": cfg}, data.info)
    losses = task.training_forward(model.train(), task.collate([data[0], data[1]])).losses
    total = sum(losses.values())
    assert torch.isfinite(total) and total.requires_grad
    total.backward()
    preds = task.predict(model, [data[2][0]])
    assert preds[0].image_size == tuple(data[2][0].shape[-2:])
    if pose:
        assert preds[0].keypoints.shape[1:] == (17, 3)


def _without_instances(target: dict) -> dict:
    """An image with no people: an empty YOLO label file (or no pseudo-labels), keypoints ``[0, K, 3]``."""
    return {k: v[:0] if isinstance(v, torch.Tensor) else v for k, v in target.items()}


@pytest.mark.parametrize("cfg", ["yolov8n-pose.yaml", "yolo26n-pose.yaml"])
@pytest.mark.parametrize("empty", [(0,), (0, 1)])
def test_pose_batch_with_images_without_people_trains(cfg, empty, coco8_pose):
    """Background images in a pose batch (Ultralytics trains on them too): finite losses and gradients, and the
    targets are Ultralytics' own for such a batch (no rows for the empty image, keypoints ``[M, K, 3]``)."""
    task = ddkit.build("tasks", "keypoints")
    torch.manual_seed(0)
    model = task.build_model({**TINY_POSE, "cfg": cfg}, coco8_pose.info).train()
    items = [coco8_pose[i] for i in range(2)]
    items = [(im, _without_instances(t) if i in empty else t) for i, (im, t) in enumerate(items)]
    batch = task.collate(items)
    losses = task.training_forward(model, batch).losses
    total = sum(losses.values())
    assert torch.isfinite(total) and total.requires_grad
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    labels = model._ultralytics_targets([t for _, t in items], torch.ones(2, 2), torch.zeros(2, 2), (64, 64),
                                        torch.device("cpu"))
    n = sum(len(t["boxes"]) for _, t in items)
    assert labels["keypoints"].shape == (n, 17, 3) and labels["bboxes"].shape == (n, 4)
    assert labels["batch_idx"].tolist() == [float(i) for i, (_, t) in enumerate(items) for _ in t["boxes"]]


def test_an_ultralytics_pt_of_the_same_classes_labels_untrained_and_one_of_other_classes_is_refused(coco8, tmp_path):
    """``teacher.train.iterations: 0`` with an Ultralytics ``best.pt``: every tensor comes from the file when its
    classes are the dataset's; with fewer classes that it does not name, its class head is skipped, left random, and
    refused by name."""
    import dataclasses

    from ddkit.engine.as_built import check_as_built
    from ddkit_ultralytics.export import export_ultralytics

    task = ddkit.build("tasks", {"name": "detection"})
    path = export_ultralytics(task.build_model(TINY, coco8.info), tmp_path / "best.pt")
    block = {**TINY, "pretrained": str(path), "trust_checkpoint": True}
    check_as_built(lambda: task.build_model(block, coco8.info), "r.yaml: teacher")
    fewer = dataclasses.replace(coco8.info, categories=OTHER3)
    with pytest.raises(ConfigError, match=r"teacher.train.iterations: 0 .* tensors are random.*model\.22\.cv3"):
        check_as_built(lambda: task.build_model(block, fewer), "r.yaml: teacher")  # (its two builds are quiet)


def test_keypoint_similarity_on_yolo_pose_labels_is_ultralytics(coco8_pose):
    """YOLO pose files carry no segment area: the OKS that ddkit's keypoint AP (pycocotools) computes on them is
    Ultralytics' pose validation's (``kpt_iou`` with 0.53 x the box area), not one scaled by the whole box."""
    import contextlib
    import io

    from pycocotools.cocoeval import COCOeval
    from ultralytics.utils.metrics import OKS_SIGMA, kpt_iou

    from ddkit.engine.coco_eval import make_coco

    task = ddkit.build("tasks", {"name": "keypoints"})
    gt = task.coco_ground_truth(coco8_pose)
    g = torch.Generator().manual_seed(0)
    results = []
    for a in gt["annotations"]:
        kp = torch.tensor(a["keypoints"]).reshape(-1, 3)
        moved = kp[:, :2] + torch.randn(len(kp), 2, generator=g) * 6
        results.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9,
                        "keypoints": torch.cat([moved, torch.ones(len(kp), 1)], 1).reshape(-1).tolist()})
    with contextlib.redirect_stdout(io.StringIO()):
        coco = make_coco(gt)
        ev = COCOeval(coco, coco.loadRes(results), "keypoints")
        ev.params.kpt_oks_sigmas = torch.tensor(OKS_SIGMA).double().numpy()
        ev.evaluate()
    compared = 0
    for image in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == image["id"] and a["num_keypoints"] > 0]
        if not anns:
            continue
        ours = torch.as_tensor(ev.ious[(image["id"], anns[0]["category_id"])]).float()  # [detections, truths]
        truth = torch.tensor([a["keypoints"] for a in anns]).reshape(len(anns), -1, 3)
        preds = torch.tensor([r["keypoints"] for r in results if r["image_id"] == image["id"]]).reshape(len(anns),
                                                                                                         -1, 3)
        area = torch.tensor([a["bbox"][2] * a["bbox"][3] for a in anns]) * 0.53
        theirs = kpt_iou(truth, preds, area, OKS_SIGMA).T
        assert torch.allclose(ours, theirs, atol=1e-4), image["id"]
        compared += len(anns)
    assert compared >= 2


def test_a_labelling_view_that_keeps_the_size_runs_at_imgsz_and_a_factor_at_its_share(coco8):
    """A YOLO teacher of imgsz 64 on 640-pixel photos: the identity view of a labelling (or ``eval --tta``) is its
    plain prediction at 64 pixels (it ran at 640 before: AP 0 where the plain model had 79); a scale factor runs at
    that share of imgsz, as Ultralytics' test-time scales are shares of imgsz."""
    from ddkit.engine import label as L
    from ddkit.engine.label.frames import model_frames

    task = ddkit.build("tasks", {"name": "detection"})
    torch.manual_seed(0)
    model = task.build_model({**TINY, "imgsz": 64, "conf": 0.0}, coco8.info).eval()
    images = [coco8[i][0] for i in range(2)]
    block = {"transforms": [{"name": "identity"}, {"name": "hflip"}], "aggregator": {"name": "wbf"},
             "selector": {"name": "count_match"}}
    single = L.Labeller.from_block(task, model, coco8.info, block).label_batch(images).single
    plain = task.predict(model, images)
    assert len(single["boxes"]) > 0 and torch.allclose(single["boxes"], torch.cat([p.boxes for p in plain]))
    half = ddkit.build("transforms", {"name": "scale", "factors": [0.5]})[0]
    sizes = [tuple(x.shape[-2:]) for x in images]
    frames = model_frames(task, model, half, [half.forward_image(x) for x in images], sizes)
    assert [max(x.shape[-2:]) for x in frames.images] == [32, 32]


def test_pose_keypoint_scores_are_probabilities_written_as_they_are(coco8_pose):
    """A YOLO pose head's keypoint confidences are sigmoids: the keypoints task says so, so that ``ddkit predict
    --format yolo`` writes them as they are (a Keypoint R-CNN's heatmap logits go through a sigmoid)."""
    task = ddkit.build("tasks", "keypoints")
    torch.manual_seed(0)
    model = task.build_model(TINY_POSE, coco8_pose.info).eval()
    assert task.keypoint_score_kind(model) == "probability"
    conf = task.predict(model, [coco8_pose[0][0]])[0].keypoints[..., 2]
    assert conf.numel() and float(conf.min()) >= 0 and float(conf.max()) <= 1


def test_weights_of_another_scale_task_or_keypoint_shape_are_refused_naming_both(coco8, coco8_pose, tmp_path):
    """pass 23 #3: a best.pt of another scale, task or keypoint count was loaded partly (a warning blaming "the class
    head") and trained on from a mostly random net: one ConfigError naming what the file and the cfg are."""
    import dataclasses

    from ddkit_ultralytics.export import export_ultralytics

    det, pose = ddkit.build("tasks", {"name": "detection"}), ddkit.build("tasks", {"name": "keypoints"})
    det_pt = export_ultralytics(det.build_model({**TINY, "width": 0.25}, coco8.info), tmp_path / "det.pt")
    pose_pt = export_ultralytics(pose.build_model(TINY_POSE, coco8_pose.info), tmp_path / "pose.pt")
    cases = [
        (det, {**TINY, "cfg": "yolov8s.yaml", "width": None, "pretrained": str(det_pt)}, coco8.info,
         f"{det_pt} is a detect model, scale n (yolov8n.yaml); cfg yolov8s.yaml builds a detect model, scale s"),
        (det, {**TINY, "pretrained": str(pose_pt)}, coco8.info,
         f"{pose_pt} is a pose model with kpt_shape [17, 3], depth 0.33, width 0.125 (yolov8n-pose.yaml); cfg "
         "yolov8n.yaml builds a detect model, depth 0.33, width 0.125"),
        (pose, {**TINY_POSE, "pretrained": str(det_pt)}, coco8_pose.info, "is a detect model, scale n"),
        (pose, {**TINY_POSE, "pretrained": str(pose_pt)}, dataclasses.replace(coco8_pose.info, num_keypoints=5,
                                                                            keypoint_sigmas=None),
         "is a pose model with kpt_shape [17, 3], depth 0.33, width 0.125 (yolov8n-pose.yaml); cfg yolov8n-pose.yaml "
         "builds a pose model with kpt_shape [5, 3]"),
    ]
    for task, block, info, text in cases:
        with pytest.raises(ConfigError, match="use the cfg the weights were trained with") as err:
            task.build_model({**block, "trust_checkpoint": True}, info)
        assert text in str(err.value) and "\n" not in str(err.value), str(err.value)
    # a plain state dict (nothing recorded) of another width: refused too
    torch.save(det.build_model({**TINY, "width": 0.25}, coco8.info).state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ConfigError, match=r"plain.pt holds another architecture; cfg yolov8n.yaml builds a detect "
                                          r"model, depth 0.33, width 0.125 \(\d+ tensors outside the class head"):
        det.build_model({**TINY, "pretrained": str(tmp_path / "plain.pt")}, coco8.info)


def test_a_class_head_of_another_class_count_is_the_only_skip_and_its_warning_says_so(coco8, tmp_path):
    import dataclasses

    from ddkit_ultralytics.export import export_ultralytics

    task = ddkit.build("tasks", {"name": "detection"})
    path = export_ultralytics(task.build_model(TINY, coco8.info), tmp_path / "best.pt")
    fewer = dataclasses.replace(coco8.info, categories=OTHER3)
    with pytest.warns(UserWarning) as record:
        model = task.build_model({**TINY, "pretrained": str(path), "trust_checkpoint": True}, fewer)
    texts = [str(w.message) for w in record]
    assert f"{path}: its class head was skipped (80 classes there, 3 here): it starts from random weights" in texts
    assert not any("tensors" in t for t in texts), texts
    reference = torch.load(path, weights_only=False)["model"].model[0].conv.weight
    assert torch.equal(model.net.model[0].conv.weight, reference)


@pytest.mark.parametrize("cfg", ["yolov8n.yaml", "yolo26n.yaml"])
def test_weights_naming_every_class_give_the_class_head_rows_by_name(cfg, coco8, tmp_path):
    """pass 23 #5: COCO-named weights (yolov8n.pt) for person and dog: the class head's rows of those classes come
    from the file in the dataset's order (no skip, no warning), so the model scores them exactly as the file does
    and the as-built check (teacher.train.iterations: 0) passes."""
    import dataclasses
    import warnings

    from ddkit.engine.as_built import check_as_built
    from ddkit_ultralytics.export import export_ultralytics

    task = ddkit.build("tasks", {"name": "detection"})
    torch.manual_seed(0)
    source = task.build_model({**TINY, "cfg": cfg}, coco8.info).eval()
    path = export_ultralytics(source, tmp_path / "coco.pt")
    names = [c["name"] for c in coco8.info.categories]
    rows = [names.index("dog"), names.index("person")]
    two = dataclasses.replace(coco8.info, categories=[{"id": 0, "name": "dog"}, {"id": 1, "name": "person"}])
    block = {**TINY, "cfg": cfg, "pretrained": str(path), "trust_checkpoint": True}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = task.build_model(block, two).eval()
    theirs, ours = source.net.state_dict(), model.net.state_dict()
    keys = [k for k, v in ours.items() if v.shape[:1] == (2,)]  # the last convs of cv3 (and one2one_cv3): 2 rows
    assert len(keys) == (12 if cfg.startswith("yolo26") else 6) and all("cv3." in k for k in keys)
    for key, value in ours.items():
        assert torch.equal(value, theirs[key][rows] if key in keys else theirs[key]), key
    if cfg == "yolov8n.yaml":  # the outputs: boxes equal, class scores the file's rows of dog and person
        x = torch.rand(1, 3, 64, 64)
        with torch.no_grad():
            a, b = source.net(x)[0], model.net(x)[0]
        assert b.shape[1] == 4 + 2 and torch.allclose(a[:, :4], b[:, :4], atol=1e-5)
        assert torch.allclose(a[:, [4 + r for r in rows]], b[:, 4:], atol=1e-6)
    check_as_built(lambda: task.build_model(block, two), "r.yaml: teacher")
    # its checkpoint rebuilds without the weights file (ddkit's load_model builds with pretrained: null): the class
    # branches take the checkpoint's width (yolov8n's 80-class branches are wider than a 2-class model's)
    fresh = task.build_model({**TINY, "cfg": cfg}, two)
    fresh.load_state_dict(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key
