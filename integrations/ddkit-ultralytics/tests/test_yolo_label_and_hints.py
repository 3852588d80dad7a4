"""YOLO in the labelling engine (the mirror property, detection and pose) and as a hint teacher for a YOLO
student."""
from __future__ import annotations

import json

import pytest
import torch

import ddkit
from ddkit.engine.label import Labeller, build_strategies, parse_label_config
from ddkit.ops.geometry import hflip_boxes, hflip_keypoints
from yolo_common import DATA, TINY, TINY_POSE

# Views whose sizes need no padding: a padded border looks the same in an image and its mirror, so its boxes tie
# exactly across views, and tied boxes fuse in view order. Halving and doubling: resizing a mirror then equals
# mirroring a resize to 1e-7 (4e-6 at 0.75 / 1.25, enough to reorder near-tied boxes on another CPU).
VIEW_SETS = ([{"name": "identity"}, {"name": "hflip"}],
             [{"name": "scale", "factors": [0.5, 2.0], "flip": True}])


@pytest.fixture(scope="module")
def coco8_pose():
    return ddkit.build("datasets", {"name": "yolo", "root": str(DATA / "coco8-pose"), "split": "train"})


def _noisy(model: torch.nn.Module) -> torch.nn.Module:
    """An untrained head scores every anchor alike (a constant prior bias): random class-head weights spread the
    scores, so that no two boxes tie within float error (tied boxes fuse in view order, mirrored or not)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for branch in model.net.model[-1].cv3:
            branch[-1].weight.normal_(0, 1.0)
            branch[-1].bias.fill_(-2.0)
    return model


def _noise_image() -> torch.Tensor:
    """128 x 128 (every view a multiple of 32: no padding) of noise: a photo's flat regions give distinct anchors
    exactly equal scores, and exact ties between boxes fuse in index order, which a mirror reverses."""
    return torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(1))


def _mirror_check(task, model, info, cfg, image) -> int:
    """Label an image and its mirror with a flip-closed view set: mirrored boxes and keypoints (pairs swapped),
    equal scores. Instances are matched one to one (tied scores may come in either order)."""
    labeller = Labeller(task, model.eval(), info, build_strategies(parse_label_config(cfg), task, info))
    a, b = labeller.label([image, image.flip(-1)])
    assert len(a) == len(b)
    w = image.shape[-1]
    boxes = hflip_boxes(a.boxes, w)
    kps = None if a.keypoints is None else hflip_keypoints(a.keypoints, w, info.flip_indices)
    free = list(range(len(b)))
    for i in range(len(a)):
        match = [j for j in free if b.labels[j] == a.labels[i] and abs(float(b.scores[j] - a.scores[i])) < 1e-5
                 and torch.allclose(b.boxes[j], boxes[i], atol=1e-3)
                 and (kps is None or torch.allclose(b.keypoints[j], kps[i], atol=1e-3))]
        assert match, f"instance {i} of the image has no mirror among the mirror image's: {boxes[i].tolist()}"
        free.remove(match[0])
    return len(a)


@pytest.mark.parametrize("aggregator", ["wbf", "nms", "soft_nms", "nmw", "box_voting"])
def test_detection_labels_of_a_mirrored_image_are_mirrored(aggregator, coco8_pose):
    task = ddkit.build("tasks", "detection")
    torch.manual_seed(0)
    # imgsz 128, the image's size: each view runs at its own size, no resize (a bilinear resize of a mirror differs
    # from the mirror of a resize by float rounding, which flips this noisy model's tied scores on some CPUs)
    model = _noisy(task.build_model({**TINY, "imgsz": 128, "max_det": 20}, coco8_pose.info))
    image = _noise_image()
    for views in VIEW_SETS:
        assert _mirror_check(task, model, coco8_pose.info, {"transforms": views, "aggregator": {"name": aggregator}},
                             image) > 0


def test_pose_labels_of_a_mirrored_image_are_mirrored_with_pairs_swapped(coco8_pose):
    """The identity + hflip set only: its views of an image and of its mirror are the same tensors. An untrained
    pose head has plateaus of anchors whose scores tie within the 1e-7 by which a resized mirror differs from a
    mirrored resize, so with scaled views its top-k picks other anchors for the mirror (seen with Ultralytics
    8.4.190 at one thread); the detection test above keeps the scaled set."""
    task = ddkit.build("tasks", "keypoints")
    torch.manual_seed(0)
    model = _noisy(task.build_model({**TINY_POSE, "imgsz": 128, "max_det": 20}, coco8_pose.info))
    cfg = {"transforms": VIEW_SETS[0], "aggregator": {"name": "keypoint_fusion"}}
    assert _mirror_check(task, model, coco8_pose.info, cfg, _noise_image()) > 0


def test_pose_model_with_a_heatmap_aggregator_says_to_use_keypoint_fusion(coco8_pose):
    task = ddkit.build("tasks", "keypoints")
    model = task.build_model(TINY_POSE, coco8_pose.info)
    cfg = {"transforms": [{"name": "identity"}], "aggregator": {"name": "wbf"}}
    labeller = Labeller(task, model.eval(), coco8_pose.info,
                        build_strategies(parse_label_config(cfg), task, coco8_pose.info))
    with pytest.raises(ddkit.ConfigError, match="keypoint_fusion"):
        labeller.label([coco8_pose[0][0]])


def test_hint_from_a_wider_yolo_neck_trains_a_narrower_student(tmp_path):
    """FitNets hint between YOLO necks (P3 output, layer 15 of v8): forward hooks on both networks, a 1x1 adapter;
    the hint loss falls while the student also learns its detection losses."""
    from ddkit.engine.train import train_model

    coco8 = ddkit.build("datasets", {"name": "yolo", "root": str(DATA / "coco8"), "split": "train"})
    task = ddkit.build("tasks", "detection")
    torch.manual_seed(0)
    teacher = task.build_model({**TINY, "width": 0.25}, coco8.info)
    student = task.build_model(TINY, coco8.info)
    losses = [{"name": "hard_label"},
              {"name": "hint", "teacher_layer": "net.model.15", "student_layer": "net.model.15", "weight": 1.0}]
    cfg = {"iterations": 12, "batch_size": 2, "optimizer": "adamw", "lr": 0.01, "log_every": 1}
    result = train_model(task, student, coco8, cfg, tmp_path, teacher=teacher, losses=losses, device="cpu",
                         progress=False)
    assert result["finished"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    hints = [r["losses"]["hint"] for r in rows if "hint" in r.get("losses", {})]
    assert len(hints) == 12 and sum(hints[-3:]) < 0.7 * sum(hints[:3]), hints
