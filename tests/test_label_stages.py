"""The labelling package's parts on their own: the label and select stages apart (and in the ``ddkit run`` plan),
one read of every shard per pass, the prediction kinds, the one COCO ground-truth builder, capabilities that
third-party transforms and selectors declare, and keypoint AP without declared sigmas."""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
import torch

from ddkit import ConfigError, DatasetInfo, Instances, hookimpl
from ddkit.engine import label as L
from ddkit.engine.coco_results import coco_ground_truth
from ddkit.engine.prediction_kinds import INSTANCES, PROBS, prediction_kind
from ddkit.engine.select import Selection
from ddkit.plugin_manager import make_plugin_manager, registry_from_plugin_manager
from test_label_engine import DET_CFG, BlobDetector, FakeTask, read_bytes, shapes_splits


# ------------------------------------------------------------------------------------------------ the two stages
def test_label_then_select_equals_label_dataset_and_a_new_selector_reuses_the_shards(tmp_path):
    ds, labeled, unlabeled = shapes_splits()
    ref = L.label_dataset(FakeTask(), BlobDetector(), ds.info, unlabeled, labeled, DET_CFG, tmp_path / "ref")
    task = FakeTask()
    sharded = L.label_stage(task, BlobDetector(), ds.info, unlabeled, DET_CFG, tmp_path / "two")
    assert sharded.complete and task.calls > 0 and not (tmp_path / "two" / "pseudo_labels.json").exists()
    # the stage result survives a JSON round trip (ddkit run keeps it in the label stage's marker)
    again = L.ShardedLabels.from_dict(json.loads(json.dumps(sharded.to_dict())))
    res = L.select_stage(again, task, ds.info, labeled, DET_CFG, tmp_path / "two")
    assert read_bytes(tmp_path / "two") == read_bytes(tmp_path / "ref") and res.summary == ref.summary
    # another selector: the label stage finds every shard done and runs no teacher call
    task = FakeTask()
    top1 = {**DET_CFG, "selector": {"name": "top_k", "k": 1}}
    sharded = L.label_stage(task, BlobDetector(), ds.info, unlabeled, top1, tmp_path / "two")
    assert task.calls == 0 and sharded.shards_done == []
    res = L.select_stage(sharded, task, ds.info, labeled, top1, tmp_path / "two")
    kept = json.loads(res.pseudo_path.read_text())["annotations"]
    assert max(Counter(a["image_id"] for a in kept).values()) == 1


def test_select_reads_every_shard_once_per_pass(tmp_path, monkeypatch):
    from ddkit.engine.label import selecting

    ds, labeled, unlabeled = shapes_splits()
    sharded = L.label_stage(FakeTask(), BlobDetector(), ds.info, unlabeled, DET_CFG, tmp_path)
    num_shards = sharded.shards.num_shards
    assert num_shards == 3  # 28 images, 10 per shard
    loads: Counter = Counter()
    real = selecting.load_shard
    monkeypatch.setattr(selecting, "load_shard",
                        lambda path, **k: (loads.update([Path(path).name]), real(path, **k))[1])
    passes = []
    real_iter, real_chunks = selecting.ShardStream.__iter__, selecting.ShardStream.chunks
    monkeypatch.setattr(selecting.ShardStream, "__iter__", lambda self: (passes.append(self.key), real_iter(self))[1])
    monkeypatch.setattr(selecting.ShardStream, "chunks", lambda self: (passes.append(self.key), real_chunks(self))[1])
    L.select_stage(sharded, FakeTask(), ds.info, labeled, DET_CFG, tmp_path)
    # a scan, the selectors' passes (count matching: ensemble and, for the quality report, the single view) and
    # one pass that selects, writes and scores quality: every shard is read exactly that often
    assert set(passes) == {"ensemble", "single"}
    assert set(loads.values()) == {2 + len(passes)} and len(loads) == num_shards


def test_run_plan_reads_teacher_label_select_student(tmp_path):
    from ddkit.config import load_config
    from ddkit.engine.run import Runner, _digest
    from omegaconf import OmegaConf

    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({
        "run": {"out_dir": str(tmp_path / "out"), "device": "cpu"}, "task": {"name": "classification"},
        "data": {"dataset": {"name": "digits"}, "split": {"labeled": 0.1, "unlabeled": 0.5, "test": 0.2}},
        "teacher": {"model": {"name": "mlp", "hidden": [8]}, "train": {"iterations": 2}},
        "student": {"model": {"name": "mlp", "hidden": [8]}, "train": {"iterations": 2}},
        "label": {"transforms": [{"name": "identity"}], "selector": {"name": "count_match"}}, "rounds": 2}))
    stages = Runner(load_config(recipe)).stages
    assert [s.name for s in stages] == ["teacher", "label", "select", "student", "label_r2", "select_r2",
                                        "student_r2"]
    label, select = stages[1], stages[2]
    assert "label.selector" not in label.inputs and "label" in select.inputs

    def key(stage, cfg):
        return _digest({k: OmegaConf.select(cfg, k) for k in stage.inputs})

    base, other = load_config(recipe), load_config(recipe, ["label.selector.name=top_k"])
    assert key(label, base) == key(label, other)  # a new selector keeps the shards
    assert key(select, base) != key(select, other)
    assert key(label, base) != key(label, load_config(recipe, ["label.batch_size=3"]))


# ------------------------------------------------------------------------------------------------ prediction kinds
def test_prediction_kinds_pack_and_unpack_round_trip():
    assert prediction_kind("probs") is PROBS and prediction_kind(FakeTask()) is INSTANCES
    with pytest.raises(ConfigError, match="prediction_type must be 'probs' or 'instances'"):
        prediction_kind(type("T", (), {"name": "odd", "prediction_type": "masks"})())
    images = {"image_id": torch.tensor([5, 6, 7]), "height": torch.tensor([10, 20, 30]),
              "width": torch.tensor([11, 21, 31])}
    insts = [Instances(torch.rand(n, 4) * 5 + torch.tensor([0, 0, 5, 5]), torch.rand(n),
                       torch.randint(1, 4, (n,)), torch.rand(n, 2, 3)) for n in (2, 0, 3)]
    back = INSTANCES.unpack(INSTANCES.pack_ensemble(insts, 2), images)
    for a, b, size in zip(insts, back, [(10, 11), (20, 21), (30, 31)]):
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.keypoints, b.keypoints) and b.image_size == size
        sp = INSTANCES.scored(b)
        assert torch.equal(sp.scores, a.scores) and torch.equal(sp.keypoint_scores, a.keypoints[..., 2])
    probs = torch.tensor([[0.1, 0.9], [0.7, 0.3], [0.5, 0.5]])
    agg = PROBS.aggregate(lambda x: (x.mean(0).argmax(1), x.mean(0).max(1).values), [probs, probs], None, [3, 8])
    assert [int(p[0][0]) for p in agg] == [8, 3, 3]  # column -> category id; a tie takes the first column
    packed = PROBS.pack_ensemble(agg)
    assert [(int(lab[0]), float(s[0])) for lab, s in PROBS.unpack(packed, images)] == \
        [(8, pytest.approx(0.9)), (3, pytest.approx(0.7)), (3, 0.5)]
    assert PROBS.pack_view(probs, [3, 8])["labels"].tolist() == [8, 3, 3]
    assert len(PROBS.empty_ensemble([3, 8])["labels"]) == 0 and PROBS.empty_view([3, 8])["probs"].shape == (0, 2)


def test_coco_ground_truth_builder_matches_a_hand_written_dict():
    t1 = {"boxes": torch.tensor([[1.0, 2.0, 4.0, 8.0], [0.0, 0.0, 2.0, 2.0]]), "labels": torch.tensor([3, 1]),
          "iscrowd": torch.tensor([0, 1]), "area": torch.tensor([-1.0, 7.5]),
          "keypoints": torch.tensor([[[1.0, 2.0, 2.0]], [[0.0, 0.0, 0.0]]])}
    cats = [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}]
    got = coco_ground_truth([(10, 20, 30, t1), (11, 5, 6, None)], cats)
    assert got == {
        "info": {},
        "images": [{"id": 10, "height": 20, "width": 30}, {"id": 11, "height": 5, "width": 6}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 3, "bbox": [1.0, 2.0, 3.0, 6.0], "area": 18.0, "iscrowd": 0,
             "keypoints": [1.0, 2.0, 2.0], "num_keypoints": 1},
            {"id": 2, "image_id": 10, "category_id": 1, "bbox": [0.0, 0.0, 2.0, 2.0], "area": 7.5, "iscrowd": 1,
             "keypoints": [0.0, 0.0, 0.0], "num_keypoints": 0}],
        "categories": cats}
    # no categories given: the ids the annotations use
    assert coco_ground_truth([(1, 9, 9, {"boxes": [[0, 0, 1, 1]], "labels": [4]})], [])["categories"] == \
        [{"id": 4, "name": "4"}]


# ------------------------------------------------------------------------------------------------ capabilities
class _PlainView:
    """A third-party untransformed view with another name: it declares ``is_identity``."""

    name = "plain"
    is_identity = True

    def forward_image(self, image):
        return image.clone()

    def forward_instances(self, inst, image_size):
        return inst

    def inverse_instances(self, inst, image_size):
        return inst

    def inverse_heatmaps(self, heatmaps):
        return heatmaps

    def inverse_probs(self, probs):
        return probs


class _MatchCounts:
    """A third-party selector that matches the labeled set's counts (it declares ``needs_labeled_stats``)."""

    needs_labeled_stats = True

    def fit(self, labeled, predictions):
        return {}

    def select(self, pred):
        return Selection(torch.ones(len(pred), dtype=torch.bool))


class _Plugin:
    @hookimpl
    def ddkit_transforms(self):
        from ddkit.types import TransformSpec

        yield TransformSpec(name="plain", factory=_PlainView, summary="the image as it is")

    @hookimpl
    def ddkit_selectors(self):
        from ddkit.types import SelectorSpec

        yield SelectorSpec(name="match_counts", factory=_MatchCounts, summary="keep all, needs the labeled set")


@pytest.fixture
def registry():
    return registry_from_plugin_manager(make_plugin_manager([_Plugin()]))


def test_the_single_view_is_the_one_that_declares_is_identity(registry):
    ds, _, _ = shapes_splits()
    cfg = L.parse_label_config({**DET_CFG, "transforms": [{"name": "hflip"}, {"name": "plain"}]})
    s = L.build_strategies(cfg, FakeTask(), ds.info, registry, need_single=True)
    assert s.single_index == 1 and s.ensemble_views == [0, 1] and len(s.views) == 2
    cfg = L.parse_label_config({**DET_CFG, "transforms": [{"name": "hflip"}]})
    s = L.build_strategies(cfg, FakeTask(), ds.info, registry, need_single=True)
    assert s.single_index == 1 and s.ensemble_views == [0]  # added for the quality report only
    assert s.fingerprint_views()[1] == {"name": "identity", "ddkit_single_only": True}
    s = L.build_strategies(cfg, FakeTask(), ds.info, registry, need_single=False)
    assert s.single_index is None and len(s.views) == 1


def test_a_selector_that_needs_labeled_stats_needs_a_data_section(tmp_path, registry):
    from ddkit.config import load_config
    from ddkit.engine.checkpoint import save_model
    from ddkit.engine.data import build_data

    splits = build_data({"dataset": {"name": "digits"}, "split": {"labeled": 0.1, "unlabeled": 0.1}})
    task = registry.build("tasks", "classification")
    teacher = save_model(task.build_model({"name": "mlp", "hidden": [4]}, splits.info), tmp_path / "t.pt")
    folder = tmp_path / "images"
    folder.mkdir()
    for name, extra in (("needs", {}), ("plain", {"selector": {"name": "top_k", "k": 1}})):
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(json.dumps({"run": {"out_dir": str(tmp_path / name), "device": "cpu"},
                                      "teacher": {"checkpoint": str(teacher)},
                                      "label": {"images": str(folder), "selector": {"name": "match_counts"},
                                                **extra}}))
        if name == "needs":
            with pytest.raises(ConfigError, match="'match_counts' matches the labeled set's counts"):
                L.run_label(load_config(recipe), registry=registry)
        else:  # a selector without the capability gets past that check (to the empty folder)
            with pytest.raises(Exception, match="label.images: nothing to label, .*images holds no images"):
                L.run_label(load_config(recipe), registry=registry)


# ------------------------------------------------------------------------------------------------ keypoint sigmas
def test_keypoint_quality_without_declared_sigmas_uses_a_default_and_warns_once(caplog, monkeypatch):
    from ddkit.engine.coco_eval import coco_evaluate
    from ddkit.engine.label import quality
    from ddkit.engine.label.quality import DEFAULT_KEYPOINT_SIGMA, InstanceQuality

    monkeypatch.setattr(quality, "_warned", set())

    info = DatasetInfo([{"id": 1, "name": "thing"}], num_keypoints=5)  # no keypoint_sigmas, not COCO's 17
    gt = {"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([1]),
          "iscrowd": torch.tensor([0]), "keypoints": torch.tensor([[[20.0 + 5 * k, 30.0, 2.0] for k in range(5)]])}
    kps = gt["keypoints"].clone()
    kps[..., 0] += 1.5  # off by 1.5 px
    pred = Instances(gt["boxes"], torch.tensor([0.9]), gt["labels"], kps, (80, 80))
    with caplog.at_level(logging.WARNING, logger="ddkit.label"):
        reports = []
        for _ in range(2):
            q = InstanceQuality(info)
            q.add(1, 80, 80, pred, torch.tensor([True]), gt)
            reports.append(q.report())
    assert sum("declares no keypoint_sigmas" in r.message for r in caplog.records) == 1
    res = [{"image_id": 1, "category_id": 1, "bbox": [10.0, 10.0, 40.0, 50.0], "score": 0.9,
            "keypoints": [v for xyz in kps[0].tolist() for v in (xyz[0], xyz[1], 1)]}]
    gt_coco = coco_ground_truth([(1, 80, 80, gt)], info.categories)
    want = coco_evaluate(gt_coco, res, "keypoints", sigmas=[DEFAULT_KEYPOINT_SIGMA] * 5)["AP"]
    assert reports[0]["kp_AP"] == pytest.approx(want) and 0 < want < 1 and reports[1] == reports[0]


def test_ddkit_run_redoes_only_selection_and_student_for_a_new_selector(tmp_path, capsys):
    from ddkit.config import load_config
    from ddkit.engine.run import run_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({
        "run": {"out_dir": str(tmp_path / "out"), "device": "cpu", "seed": 0}, "task": {"name": "classification"},
        "data": {"dataset": {"name": "digits"}, "split": {"labeled": 0.1, "unlabeled": 0.2, "test": 0.1}},
        "teacher": {"model": {"name": "mlp", "hidden": [16]}, "train": {"iterations": 20, "batch_size": 32}},
        "student": {"model": {"name": "mlp", "hidden": [16]}, "train": {"iterations": 4, "batch_size": 32}},
        "label": {"transforms": [{"name": "identity"}], "selector": {"name": "count_match"}, "batch_size": 64}}))
    first = run_recipe(load_config(recipe), source=str(recipe), progress=False)
    out = tmp_path / "out"
    shard = next((out / "label" / "shards").glob("*.pt"))
    mtime = shard.stat().st_mtime_ns
    assert (out / "select" / "stage.json").is_file() and (out / "label" / "summary.json").is_file()
    quality = json.loads((out / "label" / "quality.json").read_text())  # written by the select stage
    assert first["pseudo_label_quality"] == {k: quality[k] for k in ("single", "ensemble")}
    capsys.readouterr()
    run_recipe(load_config(recipe, ["label.selector={name: top_k, k: 1}"]), source=str(recipe), progress=False)
    printed = capsys.readouterr().out
    assert "label: done earlier" in printed and "select: running" in printed and "student: running" in printed
    assert shard.stat().st_mtime_ns == mtime  # the shards were not labelled again
    pseudo = json.loads((out / "label" / "pseudo_labels.json").read_text())
    assert pseudo["info"]["selector"] == {"name": "top_k", "k": 1}
    assert len(pseudo["annotations"]) == json.loads((out / "label" / "summary.json").read_text())["images"]["labelled"]


def test_regressed_keypoints_are_count_matched_like_heatmap_ones(tmp_path):
    """A task whose instances carry keypoints without a heatmap head (a pose model that regresses them): the
    select stage still matches the labeled set's visible keypoints per instance."""
    from ddkit.engine.data import Subset
    from test_label_engine import figures_splits

    ds, _, unlabeled = figures_splits()

    class ThreeVisible(Subset):  # 3 visible keypoints of 7 per labeled instance
        def get_target(self, i):
            t = super().get_target(i)
            t["keypoints"][:, 3:, 2] = 0
            return t

    cfg = {"transforms": [{"name": "identity"}, {"name": "hflip"}], "aggregator": {"name": "nms", "iou_thr": 0.5},
           "selector": {"name": "count_match"}, "batch_size": 4}
    task = FakeTask()  # no keypoint_heatmaps: the keypoints come with the instances
    res = L.label_dataset(task, BlobDetector(num_keypoints=7), ds.info, unlabeled, ThreeVisible(ds, range(8)), cfg,
                          tmp_path)
    assert res.summary["keypoints_per_instance"]["labeled"] == 3.0
    thr = res.summary["thresholds"]
    vis = [a["num_keypoints"] for a in json.loads(res.pseudo_path.read_text())["annotations"]]
    assert thr["keypoint_target"] == int(3.0 * len(vis)) and sum(vis) == thr["keypoint_target"] and min(vis) < 7
    assert "kp_AP" in res.quality["ensemble"]


def test_labeller_from_a_label_block_gives_what_the_shards_hold(tmp_path):
    ds, labeled, unlabeled = shapes_splits()
    sharded = L.label_stage(FakeTask(), BlobDetector(), ds.info, unlabeled, DET_CFG, tmp_path)
    rec = torch.load(sharded.shards.path(0), weights_only=True)
    images = [unlabeled[i][0] for i in range(len(rec["images"]["image_id"]))]
    preds = L.Labeller.from_block(FakeTask(), BlobDetector(), ds.info, DET_CFG).label(images)
    stored = INSTANCES.unpack(rec["ensemble"], rec["images"])
    assert len(preds) == len(stored) == 9 and sum(len(p) for p in preds) > 0  # shard 0: images 0..8 of 28
    for p, q in zip(preds, stored):
        assert torch.equal(p.boxes, q.boxes) and torch.equal(p.scores, q.scores) and torch.equal(p.labels, q.labels)
