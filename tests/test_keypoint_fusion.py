"""``keypoint_fusion``: against a slow reference on random cases, its boxes against ``ensemble_boxes``' WBF, the
contract of instance aggregators, and the flip behaviour it exists for."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ddkit
from ddkit import Instances
from ddkit.testing import check_spec
from ddkit.testing.aggregators import check_instance_aggregator, random_views


def _entry():
    return next(e for e in ddkit.get_registry().entries("aggregators") if e.spec.name == "keypoint_fusion")


# ----------------------------------------------------------------------------------------- slow reference
def _iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def reference(views: list[Instances], iou_thr: float, skip: float, weights: list[float] | None):
    """Plain Python, one box at a time, as ``ensemble_boxes.weighted_boxes_fusion`` (avg) loops; keypoints fused
    per cluster by the documented rule. Returns ``[(label, score, box, kps)]`` sorted by score."""
    nv = len(views)
    w = weights or [1.0] * nv
    items = []  # (label, weighted score, box, kps)
    for v, inst in enumerate(views):
        for i in range(len(inst)):
            if float(inst.scores[i]) < skip:
                continue
            kps = None if inst.keypoints is None else inst.keypoints[i].tolist()
            items.append((int(inst.labels[i]), float(inst.scores[i]) * w[v], inst.boxes[i].tolist(), kps))
    out = []
    for label in sorted({it[0] for it in items}):
        mine = sorted([it for it in items if it[0] == label], key=lambda it: -it[1])
        clusters, fused = [], []
        for it in mine:
            best, best_iou = -1, iou_thr
            for c, fb in enumerate(fused):
                iou = _iou(fb, it[2])
                if iou > best_iou:
                    best, best_iou = c, iou
            if best < 0:
                clusters.append([it])
                fused.append(list(it[2]))
            else:
                clusters[best].append(it)
                tot = sum(m[1] for m in clusters[best])
                fused[best] = [sum(m[1] * m[2][d] for m in clusters[best]) / tot for d in range(4)]
        for members, box in zip(clusters, fused):
            n, tot = len(members), sum(m[1] for m in members)
            score = tot / n * min(nv, n) / sum(w)
            kps = None
            if members[0][3] is not None:
                kps = []
                for k in range(len(members[0][3])):
                    a = [m[1] * max(m[3][k][2], 0.0) for m in members]
                    if sum(a) <= 0:
                        a = [m[1] for m in members]
                    x = sum(ai * m[3][k][0] for ai, m in zip(a, members)) / sum(a)
                    y = sum(ai * m[3][k][1] for ai, m in zip(a, members)) / sum(a)
                    c = sum(m[1] * m[3][k][2] for m in members) / tot * min(nv, n) / nv
                    kps.append([x, y, c])
            out.append((label, score, box, kps))
    return sorted(out, key=lambda r: -r[1])


def _case(seed: int):
    g = torch.Generator().manual_seed(seed)
    size = (int(torch.randint(40, 200, (1,), generator=g)), int(torch.randint(40, 200, (1,), generator=g)))
    nv = int(torch.randint(1, 6, (1,), generator=g))
    views = random_views(nv, size, num_objects=int(torch.randint(1, 7, (1,), generator=g)), num_classes=2,
                         num_keypoints=int(torch.randint(1, 6, (1,), generator=g)), generator=g, jitter=0.3)
    weights = (torch.rand(nv, generator=g) + 0.5).tolist() if seed % 3 == 0 else None
    return views, size, weights


@pytest.mark.parametrize("seed", range(40))
def test_equals_the_slow_reference_on_random_cases(seed):
    views, size, weights = _case(seed)
    iou_thr, skip = [0.55, 0.3, 0.7][seed % 3], [0.0, 0.2][seed % 2]
    agg = ddkit.build("aggregators", {"name": "keypoint_fusion", "iou_thr": iou_thr, "skip_box_thr": skip,
                                      "weights": weights})
    out = agg(views, size)
    ref = reference(views, iou_thr, skip, weights)
    assert len(out) == len(ref)
    for j, (label, score, box, kps) in enumerate(ref):
        assert int(out.labels[j]) == label
        assert float(out.scores[j]) == pytest.approx(score, rel=1e-5, abs=1e-6)
        assert torch.allclose(out.boxes[j], torch.tensor(box), atol=1e-3)
        assert torch.allclose(out.keypoints[j], torch.tensor(kps), atol=1e-3)


@pytest.mark.parametrize("seed", range(10))
def test_boxes_and_scores_equal_ensemble_boxes_wbf(seed):
    """The public implementation decides the boxes: ``weighted_boxes_fusion`` on normalised coordinates."""
    from ensemble_boxes import weighted_boxes_fusion

    views, (h, w), weights = _case(seed)
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    eb, es, el = weighted_boxes_fusion([(v.boxes / scale).tolist() for v in views], [v.scores.tolist() for v in views],
                                       [v.labels.tolist() for v in views], weights=weights, iou_thr=0.55,
                                       skip_box_thr=0.0, conf_type="avg")
    out = ddkit.build("aggregators", {"name": "keypoint_fusion", "weights": weights})(views, (h, w))
    order = torch.argsort(torch.tensor(es), descending=True, stable=True)
    assert torch.allclose(out.scores, torch.tensor(es, dtype=torch.float32)[order], atol=1e-5)
    assert torch.allclose(out.boxes / scale, torch.tensor(eb, dtype=torch.float32)[order], atol=1e-4)
    assert out.labels.tolist() == [int(x) for x in torch.tensor(el)[order].tolist()]


def test_contract():
    entry = _entry()
    check_spec(entry)
    for agg in (ddkit.build("aggregators", {"name": "keypoint_fusion"}),
                ddkit.build("aggregators", {"name": "keypoint_fusion", "iou_thr": 0.4, "skip_box_thr": 0.05})):
        check_instance_aggregator(agg)
        assert agg.fuses_keypoints is True


def test_a_view_and_its_flip_fuse_to_the_view_itself():
    """A flipped view mapped back (boxes mirrored, left/right channels swapped) is the same person: fusing it with the
    unflipped view gives the unflipped view's keypoints, not a left/right average."""
    hflip = ddkit.build("transforms", {"name": "hflip", "flip_indices": [0, 2, 1]})
    size = (60, 80)
    kps = torch.tensor([[[40.0, 10.0, 0.9], [30.0, 30.0, 0.8], [50.0, 30.0, 0.7]]])
    person = Instances(torch.tensor([[25.0, 5.0, 55.0, 50.0]]), torch.tensor([0.8]), torch.tensor([1]), kps, size)
    seen_flipped = hflip.forward_instances(person, size)  # what the model reports on the flipped image
    back = hflip.inverse_instances(seen_flipped, size)
    out = ddkit.build("aggregators", {"name": "keypoint_fusion"})([person, back], size)
    assert len(out) == 1
    assert torch.allclose(out.boxes, person.boxes) and torch.allclose(out.keypoints, kps, atol=1e-5)


def test_a_keypoint_with_zero_confidence_does_not_move_the_mean():
    size = (100, 100)
    box = torch.tensor([[10.0, 10.0, 60.0, 60.0]])
    a = Instances(box, torch.tensor([0.9]), torch.tensor([0]), torch.tensor([[[20.0, 20.0, 1.0]]]), size)
    b = Instances(box + 1, torch.tensor([0.9]), torch.tensor([0]), torch.tensor([[[90.0, 90.0, 0.0]]]), size)
    out = ddkit.build("aggregators", {"name": "keypoint_fusion"})([a, b], size)
    assert out.keypoints[0, 0, :2].tolist() == [20.0, 20.0]
    assert float(out.keypoints[0, 0, 2]) == pytest.approx(0.5)  # (0.9 * 1 + 0.9 * 0) / 1.8, seen in 2 of 2 views


def test_the_labelling_engine_takes_fused_keypoints_without_a_heatmap_stage(tmp_path, monkeypatch):
    """With an aggregator that fuses keypoints, a keypoint teacher's own (regressed) keypoints are fused across the
    views and written as pseudo-labels; the heatmap stage never runs. Each image's ensemble equals the aggregator
    applied to the views' predictions mapped back (here a tiny, untrained Keypoint R-CNN stands for any model)."""
    from ddkit.engine.data import build_data
    from ddkit.engine.label import Labeller, build_strategies, label_dataset, parse_label_config

    task = ddkit.build("tasks", "keypoints")
    figures = {"name": "synthetic_figures", "image_size": 64, "min_height": 30, "max_height": 50}
    splits = build_data({"train": {"dataset": {**figures, "num_images": 4}},
                         "unlabeled": {"dataset": {**figures, "num_images": 3, "seed": 4}}})
    torch.manual_seed(0)
    model = task.build_model({"name": "keypointrcnn", "backbone": "tiny", "min_size": 64, "max_size": 64,
                              "detections_per_img": 3, "keypoint_head": [16, 16]}, splits.info).eval()
    cfg = {"transforms": [{"name": "identity"}, {"name": "hflip"}], "aggregator": {"name": "keypoint_fusion"},
           "selector": {"name": "count_match", "keypoints": True}, "batch_size": 3}

    def no_heatmaps(*args, **kwargs):
        raise AssertionError("the heatmap stage ran")

    monkeypatch.setattr(type(task), "keypoint_heatmaps", no_heatmaps)
    result = label_dataset(task, model, splits.info, splits.unlabeled, splits.labeled, cfg, tmp_path)
    coco = json.loads(Path(result.pseudo_path).read_text())
    assert coco["annotations"] and all(len(a["keypoints"]) == 7 * 3 for a in coco["annotations"])

    strategies = build_strategies(parse_label_config(cfg), task, splits.info)
    images = [splits.unlabeled[i][0] for i in range(3)]
    fused = Labeller(task, model, splits.info, strategies).label(images)
    agg = ddkit.build("aggregators", {"name": "keypoint_fusion"})
    for image, got in zip(images, fused):
        size = tuple(image.shape[-2:])
        views = [v.inverse_instances(task.predict(model, [v.forward_image(image)], native_size=True)[0], size)
                 for v in strategies.views]
        want = agg(views, size)
        assert torch.allclose(got.boxes, want.boxes, atol=1e-4)
        assert torch.allclose(got.keypoints, want.keypoints, atol=1e-4)
