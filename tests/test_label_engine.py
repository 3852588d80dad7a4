"""The labelling engine end to end on small synthetic data with tiny pixel-based teachers of our own (a blob detector
and a heatmap keypoint head), through the Python API: detection and keypoints, resume, sharding, bad images."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ddkit import DataError, Instances, get_registry
from ddkit.engine import label as L
from ddkit.engine.data import HiddenLabels, Subset
from ddkit.engine.pseudo import load_pseudo_dataset
from ddkit.engine.shards import load_shard
from ddkit.ops.heatmaps import heatmaps_to_keypoints

SHAPES_CFG = {"num_images": 40, "image_size": 64, "num_classes": 3, "max_objects": 3, "min_object": 10,
              "max_object": 24, "seed": 3}


# ------------------------------------------------------------------------------------------------ tiny teachers
class BlobDetector(nn.Module):
    """Connected components of bright pixels: box = extent, class = fill ratio (rectangle / ellipse / other),
    score = mean brightness. Exactly equivariant under flips, approximately under scaling."""

    K_REL = torch.tensor([[0.5, 0.1], [0.5, 0.25], [0.85, 0.45], [0.15, 0.45], [0.5, 0.6], [0.7, 0.95], [0.3, 0.95]])

    def __init__(self, threshold: float = 0.375, num_keypoints: int | None = None):
        super().__init__()
        self.threshold = threshold
        self.num_keypoints = num_keypoints
        self.weight = nn.Parameter(torch.ones(1))

    def detect(self, image: torch.Tensor) -> Instances:
        from scipy import ndimage

        gray = image.mean(0)
        mask = (gray > self.threshold).numpy()
        lab, n = ndimage.label(mask)
        boxes, scores, labels = [], [], []
        for k, sl in enumerate(ndimage.find_objects(lab)):
            ys, xs = sl
            comp = lab[sl] == k + 1
            area = int(comp.sum())
            if area < 12:
                continue
            fill = area / comp.size
            boxes.append([xs.start, ys.start, xs.stop, ys.stop])
            scores.append(float(gray.numpy()[sl][comp].mean()) * min(1.0, area / 150))
            labels.append(1 if fill > 0.9 else 2 if fill > 0.7 else 3)
        inst = Instances(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(scores),
                         torch.tensor(labels, dtype=torch.int64), image_size=tuple(image.shape[-2:]))
        if self.num_keypoints:
            inst.labels = torch.ones_like(inst.labels)
            maps = self.heatmaps(image, inst.boxes)
            inst.keypoints = heatmaps_to_keypoints(maps, inst.boxes)
        return inst

    def heatmaps(self, image: torch.Tensor, rois: torch.Tensor, size: int = 14) -> torch.Tensor:
        from torchvision.ops import roi_align

        gray = image.mean(0)[None, None]
        crops = roi_align(gray, [rois.float()], output_size=(size, size), spatial_scale=1.0, sampling_ratio=2,
                          aligned=True)  # [N, 1, s, s], exactly mirrored under a flip of image and RoI
        c = (torch.arange(size) + 0.5) / size
        vv, uu = torch.meshgrid(c, c, indexing="ij")
        rel = self.K_REL[: self.num_keypoints]
        prior = torch.exp(-((uu[None] - rel[:, 0, None, None]) ** 2 + (vv[None] - rel[:, 1, None, None]) ** 2) / 0.02)
        return crops * prior[None] * 4.0


class FakeTask:
    """The Task protocol's inference half, enough for labelling."""

    name = "detection"
    prediction_type = "instances"

    def __init__(self):
        self.calls = 0
        self.images_seen = 0

    def predict(self, model, images, native_size=False):
        self.calls += 1
        self.images_seen += len(images)
        return [model.detect(im) for im in images]


class FakeKeypointTask(FakeTask):
    name = "keypoints"

    def keypoint_heatmaps(self, model, images, rois, native_size=False):
        return [model.heatmaps(im, r) for im, r in zip(images, rois)]


def shapes_splits(n_labeled: int = 12):
    ds = get_registry().build("datasets", {"name": "synthetic_shapes", **SHAPES_CFG})
    labeled = Subset(ds, range(n_labeled))
    unlabeled = HiddenLabels(Subset(ds, range(n_labeled, len(ds))))
    return ds, labeled, unlabeled


def figures_splits():
    ds = get_registry().build("datasets", {"name": "synthetic_figures", "num_images": 24, "image_size": 96,
                                           "min_height": 40, "max_height": 70, "seed": 1})
    return ds, Subset(ds, range(8)), HiddenLabels(Subset(ds, range(8, 24)))


DET_CFG = {"transforms": [{"name": "identity"}, {"name": "hflip"}, {"name": "scale", "factors": [0.75, 1.5]}],
           "aggregator": {"name": "nms", "iou_thr": 0.5}, "selector": {"name": "count_match"}, "batch_size": 4,
           "shard_size": 10}


def read_bytes(folder: Path, names=("pseudo_labels.json", "summary.json", "skipped.jsonl", "quality.json")):
    return {n: (folder / n).read_bytes() for n in names if (folder / n).exists()}


# ------------------------------------------------------------------------------------------------ detection
def test_detection_end_to_end(tmp_path):
    ds, labeled, unlabeled = shapes_splits()
    task = FakeTask()
    res = L.label_dataset(task, BlobDetector(), ds.info, unlabeled, labeled, DET_CFG, tmp_path)
    assert res.complete and res.pseudo_path == tmp_path / "pseudo_labels.json"
    n = len(unlabeled)
    # one teacher call per view shape: all images are 64x64, so one call per batch for identity+hflip and one for
    # each scale -> 3 calls per batch; 28 images in 3 shards of 9, 9, 10 images, batch 4 -> 3 batches each
    assert task.calls == 3 * 9 and task.images_seen == 4 * n
    coco = json.loads(res.pseudo_path.read_text())
    assert coco["categories"] == ds.info.categories
    assert [im["ddkit_index"] for im in coco["images"]] == list(range(n))
    info = coco["info"]
    assert info["selector"] == {"name": "count_match"} and info["aggregator"]["name"] == "nms"
    assert info["transforms"][0] == {"name": "identity"} and len(info["views"]) == 4
    assert len(info["teacher_sha256"]) == 64 and set(info["thresholds"]["score"]) == {"1", "2", "3"}
    # count matching, recomputed from the shard files: per category the round(m_c * N) best, ties kept
    stats = L.labeled_stats(labeled, ds.info, keypoints=False)
    scores = {c["id"]: [] for c in ds.info.categories}
    for shard in sorted((tmp_path / "shards").glob("shard-*.pt")):
        ens = load_shard(shard)["ensemble"]
        for sc, c in zip(ens["scores"].tolist(), ens["labels"].tolist()):
            scores[c].append(sc)
    kept = {c: sum(a["category_id"] == c for a in coco["annotations"]) for c in scores}
    for c, sc in scores.items():
        target = int(np.floor(stats.per_image(c) * n + 0.5))
        expected = len(sc) if target >= len(sc) else sum(x >= sorted(sc, reverse=True)[target - 1] for x in sc)
        assert kept[c] == expected and expected > 0
        assert res.summary["per_category"][c - 1]["pseudo"] == kept[c]
    assert res.summary["images"] == {"unlabeled": n, "labelled": n, "skipped": 0,
                                     "without_pseudo_labels": res.summary["images"]["without_pseudo_labels"]}
    # quality: single view and ensemble, AP and precision/recall, side by side
    q = json.loads((tmp_path / "quality.json").read_text())
    for view in ("single", "ensemble"):
        assert 0.0 < q[view]["AP50"] <= 1.0 and 0.0 < q[view]["precision"] <= 1.0 and 0 < q[view]["recall"] <= 1
    assert "| single |" in L.quality_table(q) and "| ensemble |" in L.quality_table(q)
    # read back as a training dataset: the training item format
    train = load_pseudo_dataset(res.pseudo_path, source=unlabeled)
    assert len(train) == n and train.info.categories == ds.info.categories
    image, target = train[0]
    assert image.shape == (3, 64, 64) and target["boxes"].shape[1] == 4 and target["labels"].dtype == torch.int64
    assert sum(len(train.get_target(i)["labels"]) for i in range(n)) == len(coco["annotations"])
    assert torch.equal(image, unlabeled[0][0])


def test_flip_view_maps_back_exactly(tmp_path):
    """A flip-only run gives the identity run's boxes: the inverse of every prediction is applied."""
    ds, labeled, unlabeled = shapes_splits()
    cfg = {**DET_CFG, "transforms": [{"name": "hflip"}], "selector": {"name": "score_threshold", "threshold": 0.0},
           "quality": False}
    a = L.label_dataset(FakeTask(), BlobDetector(), ds.info, unlabeled, labeled, cfg, tmp_path / "flip")
    b = L.label_dataset(FakeTask(), BlobDetector(), ds.info, unlabeled, labeled,
                        {**cfg, "transforms": [{"name": "identity"}]}, tmp_path / "id")
    fa, fb = (json.loads(r.pseudo_path.read_text())["annotations"] for r in (a, b))
    assert len(fa) == len(fb) > 10
    key = lambda x: (x["image_id"], x["bbox"])  # noqa: E731
    for x, y in zip(sorted(fa, key=key), sorted(fb, key=key)):
        assert x["bbox"] == pytest.approx(y["bbox"], abs=1e-3) and x["category_id"] == y["category_id"]


def test_keep_raw_feeds_bench(tmp_path):
    from ddkit.engine.bench import load_raw

    ds, labeled, unlabeled = shapes_splits()
    res = L.label_dataset(FakeTask(), BlobDetector(), ds.info, unlabeled, labeled, {**DET_CFG, "keep_raw": True},
                          tmp_path)
    raw = load_raw(res.raw_path)
    assert raw.prediction_type == "instances" and len(raw.images) == len(unlabeled)
    assert raw.view_names == ["identity", "hflip", "scale_x0.75", "scale_x1.5"]
    assert all(len(img.views) == 4 and img.target is not None for img in raw.images)


# ------------------------------------------------------------------------------------------------ keypoints
def test_keypoints_end_to_end(tmp_path):
    ds, labeled, unlabeled = figures_splits()
    cfg = {"transforms": [{"name": "identity"}, {"name": "hflip"}], "aggregator": {"name": "nms"},
           "selector": {"name": "count_match"}, "batch_size": 8, "keep_raw": False}
    res = L.label_dataset(FakeKeypointTask(), BlobDetector(num_keypoints=7), ds.info, unlabeled, labeled, cfg,
                          tmp_path)
    # the flip view's heatmaps, flipped back (channels through flip_indices), equal the identity view's, so the
    # ensemble keypoints are the single view's (RoIs of the aggregated boxes mapped into the flipped image)
    rec = load_shard(tmp_path / "shards" / "shard-00000-of-00001.pt")
    ens, single = rec["ensemble"], rec["single"]
    assert torch.equal(ens["counts"], single["counts"]) and len(ens["boxes"]) > 5
    for e, s in zip(L.unpack_instances(ens), L.unpack_instances(single)):
        match = (e.boxes[:, None, :] == s.boxes[None, :, :]).all(-1).float().argmax(1)  # same boxes, NMS order
        assert torch.equal(e.boxes, s.boxes[match])
        assert torch.allclose(e.keypoints, s.keypoints[match], atol=1e-3)
    # every heatmap of the flipped view was mapped back through the *dataset's* flip indices
    assert res.summary["keypoints_per_instance"]["labeled"] == 7.0
    coco = json.loads(res.pseudo_path.read_text())
    thr = coco["info"]["thresholds"]
    assert thr["keypoint_target"] == int(np.floor(7.0 * thr["keypoint_instances"] + 0.5))
    for a in coco["annotations"]:
        kp = np.array(a["keypoints"]).reshape(-1, 3)
        assert set(kp[:, 2]) <= {0, 2} and a["num_keypoints"] == int((kp[:, 2] == 2).sum())
        x, y, w, h = a["bbox"]
        vis = kp[kp[:, 2] == 2]
        assert ((vis[:, 0] >= x - 1) & (vis[:, 0] <= x + w + 1) & (vis[:, 1] >= y - 1) & (vis[:, 1] <= y + h + 1)).all()
    q = res.quality
    # 7 keypoints: keypoint AP with the dataset's own OKS sigmas
    assert q["ensemble"]["AP50"] > 0 and 0 < q["ensemble"]["kp_AP50"] <= 1 and 0 <= q["single"]["kp_AP"] <= 1


def test_keypoint_count_match_drops_low_keypoints(tmp_path):
    ds, labeled, unlabeled = figures_splits()
    # a labeled set with 3 visible keypoints per instance (of 7): the second threshold must keep ~3 per instance
    class ThreeVisible(Subset):
        def get_target(self, i):
            t = super().get_target(i)
            t["keypoints"][:, 3:, 2] = 0
            return t

    lab = ThreeVisible(ds, range(8))
    cfg = {"transforms": [{"name": "identity"}], "aggregator": {"name": "nms"}, "quality": False}
    res = L.label_dataset(FakeKeypointTask(), BlobDetector(num_keypoints=7), ds.info, unlabeled, lab, cfg, tmp_path)
    kpi = res.summary["keypoints_per_instance"]
    coco = json.loads(res.pseudo_path.read_text())
    vis = [a["num_keypoints"] for a in coco["annotations"]]
    thr = coco["info"]["thresholds"]
    assert thr["keypoint_instances"] == len(vis) > 5 and thr["keypoint_target"] == int(3.0 * len(vis))
    assert sum(vis) == thr["keypoint_target"]  # no ties among these float scores
    assert kpi["labeled"] == 3.0 and kpi["pseudo"] == pytest.approx(3.0) and min(vis) < 7
    # the dropped keypoints are the low-scoring ones: every visible one scores >= the threshold
    rec = load_shard(tmp_path / "shards" / "shard-00000-of-00001.pt")
    assert float((rec["ensemble"]["keypoints"][..., 2] >= thr["keypoint"]).sum()) >= sum(vis)


# ------------------------------------------------------------------------------------------------ resume, shards
def test_resume_after_interruption_gives_identical_output(tmp_path, monkeypatch, caplog):
    ds, labeled, unlabeled = shapes_splits()
    cfg = {**DET_CFG, "shard_size": 7}  # 28 images -> 4 shards
    ref = L.label_dataset(FakeTask(), BlobDetector(), ds.info, unlabeled, labeled, cfg, tmp_path / "ref")
    # 1) stop after 2 shards, as a killed run would have left it
    part = L.label_dataset(FakeTask(), BlobDetector(), ds.info, unlabeled, labeled, cfg, tmp_path / "run",
                           max_shards=2)
    assert not part.complete and part.shards_done == [0, 1] and not (tmp_path / "run" / "pseudo_labels.json").exists()
    # 2) crash in the middle of the third shard (an exception inside the teacher)
    real = L.label_shard
    calls = []

    def crashing(labeller, source, start, stop, *a, **k):
        calls.append(start)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(labeller, source, start, stop, *a, **k)

    monkeypatch.setattr(L.sharded, "label_shard", crashing)
    with pytest.raises(RuntimeError, match="killed"):
        L.label_dataset(FakeTask(), BlobDetector(), ds.info, unlabeled, labeled, cfg, tmp_path / "run")
    assert calls == [14, 21]  # shards 0 and 1 were skipped
    monkeypatch.setattr(L.sharded, "label_shard", real)
    task = FakeTask()
    with caplog.at_level(logging.INFO, logger="ddkit"):
        done = L.label_dataset(task, BlobDetector(), ds.info, unlabeled, labeled, cfg, tmp_path / "run")
    assert done.shards_done == [3] and done.complete
    assert "resuming: 3 of 4 shards already labelled" in caplog.text  # the user is told what is kept
    assert read_bytes(tmp_path / "run") == read_bytes(tmp_path / "ref")
    assert len(read_bytes(tmp_path / "ref")) == 4
    for s in range(4):
        name = f"shard-{s:05d}-of-00004.pt"
        assert (tmp_path / "run" / "shards" / name).read_bytes() == (tmp_path / "ref" / "shards" / name).read_bytes()
    # a changed selector re-uses every shard (selection is a separate pass); a changed transform labels again
    task = FakeTask()
    L.label_dataset(task, BlobDetector(), ds.info, unlabeled, labeled,
                    {**cfg, "selector": {"name": "top_k", "k": 1}}, tmp_path / "run")
    assert task.calls == 0
    L.label_dataset(task, BlobDetector(), ds.info, unlabeled, labeled,
                    {**cfg, "transforms": [{"name": "identity"}]}, tmp_path / "run")
    assert task.images_seen == len(unlabeled)


def test_workers_give_the_same_output_as_one_process(tmp_path):
    ds, labeled, unlabeled = shapes_splits()
    cfg = {**DET_CFG, "shards": 3}
    ref = L.label_dataset(FakeTask(), BlobDetector(), ds.info, unlabeled, labeled, cfg, tmp_path / "one")
    out = tmp_path / "two"
    r1 = L.label_dataset(FakeTask(), BlobDetector(), ds.info, unlabeled, labeled, cfg, out, worker=(1, 2))
    assert not r1.complete and r1.shards_done == [1]
    r0 = L.label_dataset(FakeTask(), BlobDetector(), ds.info, unlabeled, labeled, cfg, out, worker=(0, 2))
    assert r0.shards_done == [0, 2] and not r0.complete
    task = FakeTask()
    merged = L.label_dataset(task, BlobDetector(), ds.info, unlabeled, labeled, cfg, out)
    assert merged.complete and task.calls == 0
    assert read_bytes(out) == read_bytes(tmp_path / "one") and ref.summary == merged.summary


# ------------------------------------------------------------------------------------------------ bad images
def _coco_with_bad_images(tmp_path: Path, n_good: int = 5) -> Path:
    from PIL import Image

    ds, _, _ = shapes_splits()
    images = []
    for i in range(n_good):
        arr = (ds[i][0].permute(1, 2, 0).numpy() * 255).astype("uint8")
        Image.fromarray(arr).save(tmp_path / f"img{i}.png")
        images.append({"id": 100 + i, "file_name": f"img{i}.png", "height": 64, "width": 64})
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    images.insert(2, {"id": 7, "file_name": "corrupt.jpg", "height": 64, "width": 64})
    images.append({"id": 8, "file_name": "missing.png", "height": 64, "width": 64})
    path = tmp_path / "unlabeled.json"
    path.write_text(json.dumps({"images": images, "categories": ds.info.categories}))
    return path


def test_unreadable_images_are_skipped_and_reported(tmp_path):
    ds, labeled, _ = shapes_splits()
    coco = _coco_with_bad_images(tmp_path)
    res = L.label_dataset(FakeTask(), BlobDetector(), ds.info, None, labeled,
                          {**DET_CFG, "coco": str(coco)}, tmp_path / "out")
    skipped = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert [(s["image_id"], s["file"]) for s in skipped] == [(7, "corrupt.jpg"), (8, "missing.png")]
    assert "UnidentifiedImageError" in skipped[0]["reason"] or "cannot" in skipped[0]["reason"]
    assert "No such file" in skipped[1]["reason"] or "not found" in skipped[1]["reason"].lower()
    out = json.loads(res.pseudo_path.read_text())
    assert [im["id"] for im in out["images"]] == [100, 101, 102, 103, 104]
    assert res.summary["images"]["skipped"] == 2 and res.summary["images"]["labelled"] == 5
    assert res.quality is None  # this COCO file has no annotations: no hidden ground truth
    # the pseudo-label file reads back from the image files alone
    train = load_pseudo_dataset(res.pseudo_path)
    assert train[0][0].shape == (3, 64, 64)


def test_no_readable_image_is_a_clear_error(tmp_path):
    ds, labeled, _ = shapes_splits()
    for i in range(3):
        (tmp_path / f"bad{i}.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"none of the 3 unlabeled images could be read"):
        L.label_dataset(FakeTask(), BlobDetector(), ds.info, None, labeled, {**DET_CFG, "images": str(tmp_path)},
                        tmp_path / "out")
    assert len((tmp_path / "out" / "skipped.jsonl").read_text().splitlines()) == 3


def test_bad_label_section_fails_before_reading(tmp_path, monkeypatch):
    from ddkit import ConfigError

    ds, labeled, unlabeled = shapes_splits()
    read = []
    monkeypatch.setattr(L.DatasetSource, "load", lambda self, i: read.append(i))
    for bad, msg in [({"selector": {"name": "count_matsh"}}, "Did you mean 'count_match'"),
                     ({"transforms": [{"name": "hflip", "flip_indices": [0, 0]}]}, "hflip"),
                     ({"aggregator": {"name": "prob_mean"}}, "ensembles probs"),
                     ({"batch_sise": 4}, "Did you mean 'batch_size'"),
                     ({"shards": 0}, "shards must be")]:
        with pytest.raises(ConfigError, match=msg):
            L.label_dataset(FakeTask(), BlobDetector(), ds.info, unlabeled, labeled, {**DET_CFG, **bad}, tmp_path)
    assert read == [] and not (tmp_path / "shards").exists()


# ------------------------------------------------------------------------------------------------ several teachers
def test_teacher_ensemble_averages_every_teacher_and_view_against_a_slow_reference():
    """Two classifiers, identity + flip views, ``prob_mean``: each image's pseudo-label is the argmax of the mean of
    the four softmaxes, computed here one model and one view at a time."""
    reg = get_registry()
    task = reg.build("tasks", {"name": "classification"})
    ds = reg.build("datasets", {"name": "digits"})
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(task.build_model({"name": "mlp", "hidden": [16]}, ds.info).eval())
    cfg = {"transforms": [{"name": "identity"}, {"name": "hflip"}], "aggregator": {"name": "prob_mean"},
           "selector": {"name": "count_match"}}
    strategies = L.build_strategies(L.parse_label_config(cfg), task, ds.info)
    images = [ds[i][0] for i in range(20)]
    labels, scores = zip(*L.Labeller(task, models, ds.info, strategies).label(images))
    with torch.no_grad():
        probs = torch.stack([torch.stack([m(v[None]).softmax(-1)[0] for m in models for v in (x, x.flip(-1))]).mean(0)
                             for x in images])
    assert torch.equal(torch.cat(labels), probs.argmax(1))
    assert torch.allclose(torch.cat(scores), probs.max(1).values, atol=1e-6)
    one = L.Labeller(task, models[0], ds.info, strategies).label(images)  # a module or a one-item list: the same
    assert all(torch.equal(a[0], b[0]) for a, b in zip(one, L.Labeller(task, models[:1], ds.info,
                                                                       strategies).label(images)))
    with pytest.raises(ValueError, match="at least one teacher"):
        L.Labeller(task, [], ds.info, strategies)


def test_teacher_ensemble_slots_are_each_teachers_own_views(tmp_path):
    """``keep_raw`` with two teachers: the raw slots are teacher 1's views then teacher 2's, each equal to that
    teacher's own single-teacher labelling; the provenance hashes the two teachers together."""
    from ddkit.engine.bench import load_raw

    ds, labeled, unlabeled = shapes_splits()
    cfg = {**DET_CFG, "keep_raw": True, "quality": False}
    teachers = [BlobDetector(0.375), BlobDetector(0.55)]
    both = L.label_dataset(FakeTask(), teachers, ds.info, unlabeled, labeled, cfg, tmp_path / "both")
    alone = [load_raw(L.label_dataset(FakeTask(), t, ds.info, unlabeled, labeled, cfg, tmp_path / f"t{k}").raw_path)
             for k, t in enumerate(teachers)]
    raw = load_raw(both.raw_path)
    views = ["identity", "hflip", "scale_x0.75", "scale_x1.5"]
    assert raw.view_names == [f"teacher{k}/{v}" for k in (1, 2) for v in views]
    for img, a, b in zip(raw.images, *(r.images for r in alone)):
        for got, want in zip(img.views, a.views + b.views):
            assert torch.equal(got.boxes, want.boxes) and torch.equal(got.labels, want.labels)
    shas = [json.loads((tmp_path / f"t{k}" / "pseudo_labels.json").read_text())["info"]["teacher_sha256"]
            for k in (0, 1)]
    sha_both = json.loads(both.pseudo_path.read_text())["info"]["teacher_sha256"]
    assert sha_both not in shas and len(sha_both) == 64


def test_teacher_ensemble_keypoints_average_each_teachers_heatmaps(tmp_path):
    """Two keypoint teachers with the same boxes, the second's heatmaps three times the first's: the averaged maps
    are twice the first's, so every keypoint lies where the first teacher puts it, with twice its peak score."""

    class Louder(BlobDetector):
        def heatmaps(self, image, rois, size=14):
            return 3.0 * super().heatmaps(image, rois, size)

    ds, labeled, unlabeled = figures_splits()
    cfg = {"transforms": [{"name": "identity"}, {"name": "hflip"}], "aggregator": {"name": "nms"},
           "selector": {"name": "count_match"}, "batch_size": 8, "quality": False}
    L.label_dataset(FakeKeypointTask(), BlobDetector(num_keypoints=7), ds.info, unlabeled, labeled, cfg,
                    tmp_path / "one")
    L.label_dataset(FakeKeypointTask(), [BlobDetector(num_keypoints=7), Louder(num_keypoints=7)], ds.info,
                    unlabeled, labeled, cfg, tmp_path / "two")
    one, two = (load_shard(tmp_path / d / "shards" / "shard-00000-of-00001.pt")["ensemble"] for d in ("one", "two"))
    assert torch.equal(one["boxes"], two["boxes"]) and len(one["boxes"]) > 5  # NMS keeps one of each duplicate
    assert torch.allclose(one["keypoints"][..., :2], two["keypoints"][..., :2], atol=1e-3)
    assert torch.allclose(2.0 * one["keypoints"][..., 2], two["keypoints"][..., 2], rtol=1e-4)


def test_an_interrupted_relabel_with_other_views_leaves_nothing_of_the_old_recipe(tmp_path, caplog):
    """Another recipe's shards are removed with the pseudo-labels selected from them before the first new shard
    is written: a re-label stopped half-way leaves no old pseudo_labels.json beside new shards."""
    ds, labeled, unlabeled = shapes_splits()
    cfg = {**DET_CFG, "shard_size": 7}  # 4 shards
    L.label_dataset(FakeTask(), BlobDetector(), ds.info, unlabeled, labeled, cfg, tmp_path)
    assert (tmp_path / "pseudo_labels.json").is_file() and (tmp_path / "summary.json").is_file()
    other = {**cfg, "transforms": [{"name": "identity"}]}
    with caplog.at_level(logging.WARNING, logger="ddkit"):
        part = L.label_dataset(FakeTask(), BlobDetector(), ds.info, unlabeled, labeled, other, tmp_path,
                               max_shards=1)
    assert not part.complete and part.shards_done == [0]
    assert "4 shard(s) of another labelling recipe" in caplog.text
    assert not (tmp_path / "pseudo_labels.json").exists() and not (tmp_path / "summary.json").exists()
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["shard-00000-of-00004.pt"]
    done = L.label_dataset(FakeTask(), BlobDetector(), ds.info, unlabeled, labeled, other, tmp_path)
    assert done.complete and done.shards_done == [1, 2, 3]
    assert json.loads((tmp_path / "pseudo_labels.json").read_text())["info"]["views"] == ["identity"]


# --------------------------------------------------------------------------------------- the size views run at
COCO8 = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco8"


def _rcnn_below_the_image_size():
    """A tiny Faster R-CNN whose min_size (64) is far below coco8's 480 x 640 photos, scoring everything."""
    ds = get_registry().build("datasets", {"name": "yolo", "root": str(COCO8), "split": "val"})
    task = get_registry().build("tasks", "detection")
    torch.manual_seed(0)
    model = task.build_model({"name": "fasterrcnn", "backbone": "tiny", "min_size": 64, "max_size": 64,
                              "anchor_sizes": [16, 32, 64, 128, 256], "representation_size": 32,
                              "score_thresh": 0.0, "detections_per_img": 5}, ds.info).eval()
    return ds, task, model


def test_a_view_that_keeps_the_size_is_the_plain_prediction_and_a_factor_is_a_share_of_the_models_size():
    """``[identity, hflip]`` through the labeller: the identity view's own predictions are the plain model's
    (it ran at its 64-pixel input, not at the photo's 640); a scale factor runs at that share of the model's input
    size; a shorter side in pixels at that size (the paper's absolute scales)."""
    from ddkit.engine.label.frames import model_frames

    ds, task, model = _rcnn_below_the_image_size()
    images = [ds[i][0] for i in range(3)]
    strategies = L.build_strategies(L.parse_label_config({**DET_CFG, "transforms": [
        {"name": "identity"}, {"name": "hflip"}]}), task, ds.info)
    single = L.Labeller(task, model, ds.info, strategies).label_batch(images).single
    plain = task.predict(model, images)
    assert torch.equal(single["boxes"], torch.cat([p.boxes for p in plain]))
    assert torch.equal(single["scores"], torch.cat([p.scores for p in plain]))
    sizes = [tuple(x.shape[-2:]) for x in images]
    own = [task.input_size(model, s) for s in sizes]  # longer side 64
    assert all(max(o) == 64 for o in own)
    registry = get_registry()
    half = registry.build("transforms", {"name": "scale", "factors": [0.5]})[0]
    frames = model_frames(task, model, half, [half.forward_image(x) for x in images], sizes)
    assert frames.native and [tuple(x.shape[-2:]) for x in frames.images] == \
        [(round(h * 0.5), round(w * 0.5)) for h, w in own]
    pixels = registry.build("transforms", {"name": "scale", "sizes": [300]})[0]
    frames = model_frames(task, model, pixels, [pixels.forward_image(x) for x in images], sizes)
    assert frames.native and all(min(x.shape[-2:]) == 300 for x in frames.images) and frames.ratios == [None] * 3


def test_predictions_of_a_resized_view_come_back_in_the_views_frame():
    """A factor view's image is resized to the model's share here; its boxes come back in the view's own frame
    (then the view maps them to the original): the identity ensemble of a doubled image is the plain one's."""
    ds, task, model = _rcnn_below_the_image_size()
    images = [ds[i][0] for i in range(2)]
    strategies = L.build_strategies(L.parse_label_config({**DET_CFG, "transforms": [
        {"name": "scale", "factors": [1.0, 2.0]}], "aggregator": {"name": "nms", "iou_thr": 0.5}}), task, ds.info)
    labeller = L.Labeller(task, model, ds.info, strategies)
    _, _, back, _ = labeller._run(images)
    plain = task.predict(model, images)
    for b in range(2):  # factor 1: the model's own size, so the plain prediction, mapped back to the original
        assert torch.allclose(back[0][b].boxes, plain[b].boxes, atol=1e-3)
        assert back[1][b].image_size == plain[b].image_size and len(back[1][b]) > 0


def _coco_with_ground_truth(tmp_path: Path, shift: int, n: int = 6) -> Path:
    """``n`` shapes images and their boxes as a COCO file whose category ids are the dataset's + ``shift`` (the
    same names)."""
    from PIL import Image

    ds, _, _ = shapes_splits()
    images, anns = [], []
    for i in range(n):
        image, target = ds[i]
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype("uint8")).save(tmp_path / f"gt{i}.png")
        images.append({"id": i, "file_name": f"gt{i}.png", "height": 64, "width": 64})
        for box, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            x0, y0, x1, y1 = box
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(label) + shift, "iscrowd": 0,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)})
    cats = [{**c, "id": int(c["id"]) + shift} for c in ds.info.categories]
    path = tmp_path / f"gt{shift}.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def test_label_coco_quality_matches_categories_by_name(tmp_path, caplog):
    """A COCO file whose ids are not the teacher's (COCO's 1-90 for a YOLO-id teacher) is scored by name: the same
    report as under the teacher's ids, never a silent precision of 0."""
    ds, labeled, _ = shapes_splits()
    cfg = {**DET_CFG, "transforms": [{"name": "identity"}], "selector": {"name": "score_threshold", "threshold": 0.0}}
    reports = []
    for shift in (0, 30):
        res = L.label_dataset(FakeTask(), BlobDetector(), ds.info, None, labeled,
                              {**cfg, "coco": str(_coco_with_ground_truth(tmp_path, shift))}, tmp_path / f"o{shift}")
        reports.append(res.quality)
    assert reports[0]["ensemble"]["precision"] > 0.5 and reports[1] == reports[0]
    # a file of other classes altogether: one warning naming it, no report
    other = json.loads((tmp_path / "gt30.json").read_text())
    other["categories"] = [{**c, "name": f"other{c['id']}"} for c in other["categories"]]
    (tmp_path / "other.json").write_text(json.dumps(other))
    with caplog.at_level(logging.WARNING, logger="ddkit.label"):
        res = L.label_dataset(FakeTask(), BlobDetector(), ds.info, None, labeled,
                              {**cfg, "coco": str(tmp_path / "other.json")}, tmp_path / "o_other")
    assert res.quality is None
    said = [m for m in caplog.messages if "other.json" in m]
    assert len(said) == 1 and "3 of its categories are not the teacher's" in said[0] and "no quality report" in said[0]
