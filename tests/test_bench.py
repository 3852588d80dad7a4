"""``ddkit bench``: the grid against values computed directly (pycocotools by hand, direct counts), third-party
strategies joining the grid, classification, raw-prediction formats and the CLI on the synthetic recipe."""
from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
from pathlib import Path

import pytest
import torch

from ddkit import ConfigError, hookimpl
from ddkit.engine import bench as B
from ddkit.engine.select import LabeledStats, ListStream, ScoredPredictions
from ddkit.plugin_manager import get_registry, make_plugin_manager, registry_from_plugin_manager

REPO = Path(__file__).resolve().parents[1]
BOX_AGGS = {"wbf": [{"iou_thr": 0.55}, {"iou_thr": 0.55, "conf_type": "max"}], "nms": None, "soft_nms": None,
            "box_voting": None}
SELECTORS = {"count_match": None, "count_match_global": None, "score_threshold": [{"threshold": 0.5}]}


# ------------------------------------------------------------------------------------------------ oracles
def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _count_tp(boxes, scores, labels, gt_boxes, gt_labels, thr=0.5):
    """Plain-Python greedy matching: by descending score, the best unmatched same-class GT with IoU >= thr."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    used = set()
    tp = 0
    for i in order:
        best, best_j = -1.0, None
        for j in range(len(gt_labels)):
            if j in used or gt_labels[j] != labels[i]:
                continue
            v = _iou(boxes[i], gt_boxes[j])
            if v > best:
                best, best_j = v, j
        if best_j is not None and best >= thr:
            used.add(best_j)
            tp += 1
    return tp


def _cocoeval_by_hand(gt_coco, results):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt_coco)
        coco.createIndex()
        dt = coco.loadRes(copy.deepcopy(results))
        ev = COCOeval(coco, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


@pytest.fixture(scope="module")
def synthetic():
    return B.make_synthetic_detection(num_images=12, num_views=4, num_categories=2, seed=3)


# ------------------------------------------------------------------------------------------------ the grid
@pytest.fixture(scope="module")
def box_bench(synthetic):
    gt_coco, raw = synthetic
    return B.run_bench(raw, B.GroundTruth.from_coco(gt_coco), aggregators=BOX_AGGS, selectors=SELECTORS,
                       include_unlisted=False)


def test_grid_covers_every_listed_aggregator_and_selector(box_bench):
    aggs = {r["aggregator"] for r in box_bench.rows}
    sels = {r["selector"] for r in box_bench.rows}
    assert aggs == {"wbf(iou_thr=0.55)", "wbf(iou_thr=0.55,conf_type=max)", "nms", "soft_nms", "box_voting"}
    assert sels == {"count_match", "count_match_global", "score_threshold(threshold=0.5)"}
    assert len(box_bench.rows) == len(aggs) * len(sels)
    # the aggregators really differ (a grid of copies of one cell would pass the checks below)
    assert len({round(r["AP"], 6) for r in box_bench.rows}) >= 3


@pytest.mark.parametrize("agg_label,block", [("wbf(iou_thr=0.55)", {"name": "wbf", "iou_thr": 0.55}),
                                             ("soft_nms", {"name": "soft_nms"})])
def test_cell_matches_pycocotools_and_direct_counts(box_bench, synthetic, agg_label, block):
    gt_coco, raw = synthetic
    agg = get_registry().build("aggregators", block)
    fused = [agg(img.views, img.image_size) for img in raw.images]  # per image, not the batch path
    results = []
    for img, inst in zip(raw.images, fused):
        for b, s, c in zip(inst.boxes.tolist(), inst.scores.tolist(), inst.labels.tolist()):
            results.append({"image_id": img.image_id, "category_id": c, "score": s,
                            "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
    stats = _cocoeval_by_hand(gt_coco, results)
    rows = {r["selector"]: r for r in box_bench.rows if r["aggregator"] == agg_label}
    for row in rows.values():
        assert row["AP"] == pytest.approx(stats[0], abs=1e-6)
        assert row["AP50"] == pytest.approx(stats[1], abs=1e-6)
        assert row["AR"] == pytest.approx(stats[8], abs=1e-6)
    assert 0.2 < stats[0] < 0.99  # a meaningful, not degenerate, case

    gts = {img["id"]: ([], []) for img in gt_coco["images"]}
    for a in gt_coco["annotations"]:
        x, y, w, h = a["bbox"]
        gts[a["image_id"]][0].append([x, y, x + w, y + h])
        gts[a["image_id"]][1].append(a["category_id"])
    n_gt = len(gt_coco["annotations"])
    counts = {c["id"]: sum(a["category_id"] == c["id"] for a in gt_coco["annotations"])
              for c in gt_coco["categories"]}
    labeled = LabeledStats(num_images=len(raw.images), instances=counts)
    for sel_label, sel_block in [("count_match", {"name": "count_match"}),
                                 ("score_threshold(threshold=0.5)", {"name": "score_threshold", "threshold": 0.5})]:
        selector = get_registry().build("selectors", sel_block)
        preds = [ScoredPredictions(f.scores, f.labels) for f in fused]
        selector.fit(labeled, ListStream(preds))
        kept = tp = 0
        for img, inst, p in zip(raw.images, fused, preds):
            keep = selector.select(p).keep
            kept += int(keep.sum())
            gb, gl = gts[img.image_id]
            tp += _count_tp(inst.boxes[keep].tolist(), inst.scores[keep].tolist(), inst.labels[keep].tolist(), gb, gl)
        row = rows[sel_label]
        assert row["kept"] == kept and row["tp"] == tp
        assert row["precision"] == pytest.approx(tp / kept)
        assert row["recall"] == pytest.approx(tp / n_gt)
        assert row["inst_per_image"] == pytest.approx(kept / len(raw.images))
        assert row["agg_ms_per_image"] > 0
    # count matching keeps about as many pseudo-labels as there are ground-truth boxes
    assert abs(rows["count_match"]["kept"] - n_gt) <= 3


def test_outputs_sorted_by_the_chosen_metric(box_bench, tmp_path):
    paths = B.write_outputs(box_bench, tmp_path, "t")
    md = (tmp_path / "bench.md").read_text().splitlines()
    table = [line for line in md if line.startswith("| ") and not line.startswith("| aggregator")]
    ap_col = md[[i for i, line in enumerate(md) if line.startswith("| aggregator")][0]].split("|").index(" AP ")
    aps = [float(line.split("|")[ap_col]) for line in table]
    assert aps == sorted(aps, reverse=True) and len(aps) == len(box_bench.rows)
    with open(paths["csv"]) as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["AP"]) for r in rows] == sorted((float(r["AP"]) for r in rows), reverse=True)
    for name in ("bench_ap_vs_time.png", "bench_selection_pr.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["sort_by"] == "AP" and len(data["rows"]) == len(box_bench.rows)
    by_time = B.sort_rows(box_bench.rows, "agg_ms_per_image")
    assert [r["agg_ms_per_image"] for r in by_time] == sorted(r["agg_ms_per_image"] for r in box_bench.rows)


def test_greedy_match_follows_score_order():
    # a high-scoring loose box takes the only ground truth; the tight, lower-scoring one is a false positive
    gt_boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 13.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    scores = torch.tensor([0.9, 0.8, 0.95])
    labels = torch.tensor([1, 1, 2])
    tp = B.greedy_match(boxes, scores, labels, gt_boxes, torch.tensor([1]))
    assert tp.tolist() == [True, False, False]  # the class-2 box never matches a class-1 ground truth
    assert not B.greedy_match(boxes[:1], scores[:1], labels[:1], gt_boxes, torch.tensor([1]), iou_thr=0.8).any()


# ------------------------------------------------------------------------------------------------ extensibility
class _ExtraPlugin:
    """A third-party plugin object: one box aggregator and one selector."""

    class FirstView:
        def __call__(self, views, image_size):
            return views[0].sorted_by_score()

    class KeepAll:
        def fit(self, labeled, predictions):
            return {"rule": "keep_all"}

        def select(self, pred):
            from ddkit.engine.select import Selection

            return Selection(torch.ones(len(pred), dtype=torch.bool))

    @hookimpl
    def ddkit_aggregators(self):
        from ddkit.types import AggregatorSpec

        yield AggregatorSpec(name="first_view", factory=_ExtraPlugin.FirstView, summary="view 0 only")

    @hookimpl
    def ddkit_selectors(self):
        from ddkit.types import SelectorSpec

        yield SelectorSpec(name="keep_all", factory=_ExtraPlugin.KeepAll, summary="keep everything")


def test_third_party_strategies_join_the_grid(synthetic, tmp_path, monkeypatch, capsys):
    from ddkit.cli import main

    registry = registry_from_plugin_manager(make_plugin_manager([_ExtraPlugin()]))
    monkeypatch.setattr("ddkit.plugin_manager._registry", registry)  # the process-wide registry, restored after
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"run: {{out_dir: {tmp_path / 'run'}}}\n"
                      "bench:\n  synthetic: {kind: detection, num_images: 12, num_views: 4, num_categories: 2, "
                      "seed: 3}\n  exclude_aggregators: [nmw, wbf, box_voting, soft_nms]\n"
                      "  selectors: {score_threshold: [{threshold: 0.5}]}\n")
    assert main(["bench", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "| first_view | keep_all |" in out and "| nms | keep_all |" in out
    rows = json.loads((tmp_path / "run" / "bench" / "bench.json").read_text())["rows"]
    cell = next(r for r in rows if r["aggregator"] == "first_view" and r["selector"] == "keep_all")
    gt_coco, raw = synthetic  # the recipe generates the very same data
    results = [{"image_id": img.image_id, "category_id": c, "score": s, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]}
               for img in raw.images for b, s, c in zip(img.views[0].boxes.tolist(), img.views[0].scores.tolist(),
                                                        img.views[0].labels.tolist())]
    assert cell["AP"] == pytest.approx(_cocoeval_by_hand(gt_coco, results)[0], abs=1e-6)
    assert cell["kept"] == len(results)
    assert not any(r["aggregator"] in ("wbf", "soft_nms") for r in rows)


def test_bench_config_errors(synthetic):
    gt_coco, raw = synthetic
    gt = B.GroundTruth.from_coco(gt_coco)
    with pytest.raises(ConfigError, match="Did you mean 'wbf'"):
        B.run_bench(raw, gt, aggregators={"wfb": None})
    with pytest.raises(ConfigError, match="takes probs"):
        B.run_bench(raw, gt, aggregators={"prob_mean": None})
    with pytest.raises(ConfigError, match="unknown key 'iou'"):
        B.run_bench(raw, gt, aggregators={"wbf": [{"iou": 0.5}]})
    with pytest.raises(ConfigError, match="not a metric"):
        B.run_bench(raw, gt, aggregators={"nms": None}, selectors={"top_k": None}, include_unlisted=False,
                    sort_by="accuracy")
    with pytest.raises(ConfigError, match="Did you mean 'synthetic'"):
        B.parse_bench_config({"synthetc": {}})


# ------------------------------------------------------------------------------------------------ classification
def test_classification_bench_against_direct_accuracy():
    raw = B.make_synthetic_classification(num_images=150, num_views=5, num_categories=4, seed=1)
    res = B.run_bench(raw, selectors={"score_threshold": [{"threshold": 0.6}]}, include_unlisted=True,
                      exclude_selectors=["top_k", "count_match_global"])
    assert {"prob_mean", "prob_max", "majority_vote"} <= {r["aggregator"] for r in res.rows}
    assert not any(r["aggregator"] in ("wbf", "nms", "heatmap_mean") for r in res.rows)
    probs = torch.stack([img.probs for img in raw.images])  # [N, V, C]
    truth = torch.tensor([img.target["label"] for img in raw.images])
    mean = probs.mean(1)
    correct = mean.argmax(1) == truth
    row = next(r for r in res.rows if r["aggregator"] == "prob_mean" and r["selector"].startswith("score_threshold"))
    assert row["accuracy"] == pytest.approx(float(correct.double().mean()))
    keep = mean.max(1).values >= 0.6
    assert row["selected"] == int(keep.sum()) and 0 < row["selected"] < len(raw.images)
    assert row["selected_accuracy"] == pytest.approx(float(correct[keep].double().mean()))
    assert row["coverage"] == pytest.approx(float(keep.double().mean()))
    vote = next(r for r in res.rows if r["aggregator"] == "majority_vote")
    votes = torch.nn.functional.one_hot(probs.argmax(2), 4).sum(1)  # [N, C]
    unique_winner = (votes == votes.max(1, keepdim=True).values).sum(1) == 1
    assert (votes.argmax(1) == truth)[unique_winner].sum() <= round(vote["accuracy"] * len(raw.images))
    assert res.sort_by == "accuracy"


# ------------------------------------------------------------------------------------------------ formats
def test_raw_file_round_trip(synthetic, tmp_path):
    gt_coco, raw = synthetic
    path = B.save_raw(raw, tmp_path / "run" / "label" / B.RAW_FILE)  # where `ddkit label` keeps it
    assert torch.load(path, weights_only=True)["format"] == B.RAW_FORMAT
    back = B.load_raw(tmp_path / "run")  # a labelling run folder is accepted too
    assert back.prediction_type == "instances" and back.num_views == 4
    for a, b in zip(raw.images, back.images):
        assert a.image_id == b.image_id and a.image_size == b.image_size
        for va, vb in zip(a.views, b.views):
            assert torch.equal(va.boxes, vb.boxes) and torch.equal(va.labels, vb.labels)
            assert torch.equal(va.scores, vb.scores)
    # ground truth from the file's targets == ground truth from the COCO json
    kw = dict(aggregators={"nms": None}, selectors={"top_k": None}, include_unlisted=False)
    res_a = B.run_bench(back, **kw)
    res_b = B.run_bench(raw, B.GroundTruth.from_coco(gt_coco), **kw)
    for key in ("AP", "precision", "recall", "kept"):
        assert res_a.rows[0][key] == pytest.approx(res_b.rows[0][key])


def test_malformed_raw_file_is_a_data_error(tmp_path):
    from ddkit import DataError

    bad = tmp_path / "bad.pt"
    torch.save({"format": B.RAW_FORMAT, "images": [{"image_id": 1, "image_size": [10, 10],
                                                    "views": [{"boxes": torch.zeros(2, 4)}]}]}, bad)
    with pytest.raises(DataError, match=r"images\[0\] is malformed"):
        B.load_raw(bad)
    with pytest.raises(DataError, match="no such"):
        B.load_raw(tmp_path / "missing.pt")


# ------------------------------------------------------------------------------------------------ the CLI
def test_cli_bench_synthetic_recipe(tmp_path, capsys):
    from ddkit.cli import main

    recipe = REPO / "configs" / "bench_synthetic.yaml"
    rc = main(["bench", str(recipe), f"run.out_dir={tmp_path}", "bench.synthetic.num_images=6",
               "bench.timing_repeats=1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "SYNTHETIC" in out and "| aggregator | selector |" in out
    bench_dir = tmp_path / "bench"
    for name in ("bench.csv", "bench.md", "bench.json", "bench_ap_vs_time.png", "bench_selection_pr.png",
                 "raw_predictions.pt", "gt.json", "config.yaml"):
        assert (bench_dir / name).is_file(), name
    rows = json.loads((bench_dir / "bench.json").read_text())["rows"]
    assert len({r["aggregator_name"] for r in rows}) >= 4 and len({r["selector_name"] for r in rows}) >= 2
    # bench.raw re-uses the kept raw predictions: same table without regenerating
    rc = main(["bench", str(recipe), f"run.out_dir={tmp_path / 'again'}", "bench.synthetic=null",
               f"bench.raw={bench_dir / 'raw_predictions.pt'}", f"bench.gt={bench_dir / 'gt.json'}",
               "bench.timing_repeats=1"])
    assert rc == 0
    again = json.loads((tmp_path / "again" / "bench" / "bench.json").read_text())["rows"]
    key = lambda r: (r["aggregator"], r["selector"])  # noqa: E731
    assert sorted((key(r), r["AP"], r["kept"]) for r in again) == sorted((key(r), r["AP"], r["kept"]) for r in rows)


# ------------------------------------------------------------------------------------------------ through labelling
def test_bench_runs_labelling_with_raw_kept(tmp_path, capsys):
    """No bench.raw: the recipe's labelling runs with keep_raw (a tiny MLP teacher on the 8x8 digits), then the
    probs grid; its prob_mean x count_match cell is the labelling run's own quality report."""
    import torch.nn.functional as F

    from ddkit.cli import main
    from ddkit.engine.checkpoint import save_model
    from ddkit.engine.data import build_data

    data = {"dataset": {"name": "digits"}, "split": {"labeled": 0.2, "unlabeled": 0.3, "seed": 0}}
    torch.manual_seed(0)
    task = get_registry().build("tasks", "classification")
    splits = build_data(data)
    model = task.build_model({"name": "mlp", "hidden": [32]}, splits.info)
    x = torch.stack([splits.labeled[i][0] for i in range(len(splits.labeled))])
    y = torch.tensor([splits.labeled[i][1]["label"] for i in range(len(splits.labeled))])
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(40):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    teacher = save_model(model, tmp_path / "teacher.pt")
    cfg = {"run": {"out_dir": str(tmp_path / "run"), "seed": 0, "device": "cpu"}, "data": data,
           "teacher": {"checkpoint": str(teacher)},
           "label": {"transforms": [{"name": "identity"}, {"name": "translate", "shifts": [[1, 0], [-1, 0]]}],
                     "aggregator": {"name": "prob_mean"}, "selector": {"name": "count_match"}, "batch_size": 128},
           "bench": {"selectors": {"score_threshold": [{"threshold": 0.9}]}, "exclude_selectors": ["top_k"]}}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(cfg))
    assert main(["bench", str(recipe)]) == 0
    assert "| prob_mean | count_match |" in capsys.readouterr().out
    label_dir = tmp_path / "run" / "label"
    quality = json.loads((label_dir / "quality.json").read_text())["ensemble"]
    summary = json.loads((label_dir / "summary.json").read_text())
    rows = json.loads((tmp_path / "run" / "bench" / "bench.json").read_text())["rows"]
    assert {r["aggregator"] for r in rows} >= {"prob_mean", "prob_max", "majority_vote"}
    cell = next(r for r in rows if r["aggregator"] == "prob_mean" and r["selector"] == "count_match")
    assert cell["accuracy"] == pytest.approx(quality["accuracy"])
    assert cell["selected"] == summary["pseudo_labels"] == quality["selected"]
    assert cell["selected_accuracy"] == pytest.approx(quality["selected_accuracy"])
    assert 0.5 < cell["accuracy"] < 1.0


def test_classification_raw_without_labels_says_how_to_get_them_and_writes_nothing(tmp_path, capsys):
    """Predictions on a folder of images carry no classes: the one-line error names the fix that works for
    classification (bench.gt is a COCO json of boxes, no help here), and the bench folder stays empty."""
    from ddkit.cli import main

    raw = B.make_synthetic_classification(num_images=6, num_views=2, num_categories=3, seed=0)
    for img in raw.images:
        img.target = None
    path = B.save_raw(raw, tmp_path / "raw.pt")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"run": {"out_dir": str(tmp_path / "run")}, "bench": {"raw": str(path)}}))
    assert main(["bench", str(recipe)]) != 0
    err = capsys.readouterr().err
    assert "no ground truth" in err and "data.split" in err and "bench.gt" not in err
    assert not (tmp_path / "run" / "bench").exists()


# ------------------------------------------------------------------------------------------------ broken strategies
class _BrokenPlugin:
    """An installed plugin whose strategies fail: each failing cell becomes a row with its reason."""

    class Raises:
        def __call__(self, probs):
            raise RuntimeError("boom from agg_raise")

    class OutOfRange:
        def __call__(self, probs):
            return torch.full((probs.shape[1],), 99, dtype=torch.int64), torch.ones(probs.shape[1])

    class NoSelect:
        needs_labeled_stats = False

        def fit(self, labeled, predictions):
            return {}

    @hookimpl
    def ddkit_aggregators(self):
        from ddkit.types import AggregatorSpec

        yield AggregatorSpec(name="zz_agg_raise", factory=_BrokenPlugin.Raises, input="probs", summary="raises")
        yield AggregatorSpec(name="zz_agg_oob", factory=_BrokenPlugin.OutOfRange, input="probs", summary="99")

    @hookimpl
    def ddkit_selectors(self):
        from ddkit.types import SelectorSpec

        yield SelectorSpec(name="zz_sel_noselect", factory=_BrokenPlugin.NoSelect, summary="no select()")


def test_a_strategy_that_raises_is_a_failed_row_and_the_others_are_measured(tmp_path):
    registry = registry_from_plugin_manager(make_plugin_manager([_BrokenPlugin()]))
    raw = B.make_synthetic_classification(num_images=30, num_views=3, num_categories=4, seed=2)
    result = B.run_bench(raw, aggregators={"prob_mean": None, "zz_agg_raise": None, "zz_agg_oob": None},
                         selectors={"top_k": None, "zz_sel_noselect": None}, include_unlisted=False,
                         registry=registry)
    cells = {(r["aggregator"], r["selector"]): r for r in result.rows}
    assert len(cells) == 6 and all(set(r) == set(result.rows[0]) for r in result.rows)
    good = cells[("prob_mean", "top_k")]
    assert good["error"] == "" and 0 < good["accuracy"] <= 1
    assert cells[("zz_agg_raise", "top_k")]["error"] == "aggregator 'zz_agg_raise': RuntimeError: boom from agg_raise"
    oob = cells[("zz_agg_oob", "top_k")]["error"]
    assert oob.startswith("aggregator 'zz_agg_oob': PluginContractError:") and "labels 99..99 for 4 classes" in oob
    assert cells[("prob_mean", "zz_sel_noselect")]["error"].startswith(
        "selector 'zz_sel_noselect': AttributeError:")
    assert all(r["accuracy"] != r["accuracy"] for k, r in cells.items() if k != ("prob_mean", "top_k"))  # NaN
    assert result.sorted_rows()[0]["aggregator"] == "prob_mean" and "5 of 6 cells failed" in result.notes[-1]
    paths = B.write_outputs(result, tmp_path, "t")
    md = paths["markdown"].read_text()
    assert "| error |" in md and "boom from agg_raise" in md
    rows = json.loads(paths["json"].read_text())["rows"]
    assert len(rows) == 6 and rows[0]["error"] == ""


@pytest.mark.parametrize("override,text", [
    ("bench.aggregators.wbff=null", "bench_synthetic.yaml: bench.aggregators.wbff: Unknown aggregator 'wbff'. "
                                    "Did you mean 'wbf'?"),
    ("bench.sort_by=APX", "bench_synthetic.yaml: bench.sort_by: 'APX' is not a metric of this bench"),
    ("bench.aggregators.nms.0.iou_thr=7", "bench_synthetic.yaml: bench.aggregators.nms: "),
    ("bench.selectors.top_kk=null", "bench_synthetic.yaml: bench.selectors.top_kk: Unknown selector"),
])
def test_a_bad_grid_or_sort_by_is_refused_before_anything_is_written(tmp_path, capsys, override, text):
    """pass 22 M7: gt.json and raw_predictions.pt were written before the grid was checked (sort_by only after
    every aggregator ran), and an unknown aggregator's error named neither the field nor the recipe."""
    from ddkit.cli import main

    recipe = REPO / "configs" / "bench_synthetic.yaml"
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "bench.md").write_text("an earlier table")
    rc = main(["bench", str(recipe), f"run.out_dir={tmp_path}", "bench.synthetic.num_images=4", override])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and text in err, err
    assert [p.name for p in (tmp_path / "bench").iterdir()] == ["bench.md"]  # nothing new beside the old table


def test_a_file_that_is_no_raw_predictions_says_what_it_must_be(tmp_path):
    """pass 22 L1: bench.raw= a COCO results JSON repeated torch's advice to retry with weights_only=False."""
    from ddkit import DataError

    results = tmp_path / "pred.json"
    results.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}]))
    with pytest.raises(DataError) as info:
        B.load_raw(results)
    text = str(info.value)
    assert text.startswith(f"{results}: not a ddkit raw-predictions file (a torch .pt written by ddkit label")
    assert "this is JSON" in text and "ddkit fuse" in text and "\n" not in text
    assert "weights_only" not in text and "file an issue" not in text
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00\x01 not torch")
    with pytest.raises(DataError, match=r"junk\.pt: not a ddkit raw-predictions file .*not a torch file"):
        B.load_raw(junk)


def test_no_synthetic_no_raw_and_no_teacher_names_bench_raw(tmp_path, capsys):
    """pass 22 fuse L1 (note): bench.synthetic=null without bench.raw talked only of teacher.checkpoint."""
    from ddkit.cli import main

    recipe = REPO / "configs" / "bench_synthetic.yaml"
    rc = main(["bench", str(recipe), f"run.out_dir={tmp_path / 'run'}", "bench.synthetic=null"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "bench_synthetic.yaml: bench has no raw predictions to bench: give bench.raw (a raw-predictions file" \
        in err[0] and "or a teacher to label with (teacher.checkpoint" in err[0], err
    assert not (tmp_path / "run").exists()
