"""``ddkit fuse``: parity with ensemble_boxes / ddkit.ops.ensemble WBF, evaluation equal to pycocotools by hand,
and bad input reported entry by entry (never clipped)."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from ddkit import ConfigError, DataError
from ddkit.cli import main
from ddkit.engine.fuse import fuse_results, validate_results
from ddkit.testing import registered

SHARED = Path(__file__).parents[1].parent / "shared" / "data"
COCO_MINI = SHARED / "coco-val2017-mini" / "test_coco.json"


def _random_case(seed=0, n_models=3, n_images=5):
    """A COCO images dict and one results list per model: boxes clustered around a few objects (so that fusion
    merges), random scores, two categories, all inside their image."""
    rng = np.random.default_rng(seed)
    images = [{"id": 10 + i, "height": int(rng.integers(200, 500)), "width": int(rng.integers(300, 700))}
              for i in range(n_images)]
    coco = {"images": images, "categories": [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}]}
    preds = [[] for _ in range(n_models)]
    for img in images:
        H, W = img["height"], img["width"]
        for _ in range(int(rng.integers(1, 5))):
            w, h = rng.uniform(0.1, 0.4) * W, rng.uniform(0.1, 0.4) * H
            x, y = rng.uniform(0, W - w), rng.uniform(0, H - h)
            cat = int(rng.choice([1, 3]))
            for m in range(n_models):
                for _ in range(int(rng.integers(0, 3))):
                    b = np.array([x, y, x + w, y + h]) + rng.normal(0, 0.05, 4) * [w, h, w, h]
                    b[0::2] = np.clip(b[0::2], 0, W)
                    b[1::2] = np.clip(b[1::2], 0, H)
                    if b[2] - b[0] < 1 or b[3] - b[1] < 1:
                        continue
                    preds[m].append({"image_id": img["id"], "category_id": cat if rng.random() > 0.1 else 4 - cat,
                                     "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                                     "score": float(rng.uniform(0.05, 1.0))})
    return coco, preds


def _normalized_rows(entries, sizes):
    """Per image: rows (label, score, x1, y1, x2, y2) with the box divided by the image size, sorted."""
    out = {}
    for e in entries:
        H, W = sizes[e["image_id"]]
        x, y, w, h = e["bbox"]
        out.setdefault(e["image_id"], []).append((e["category_id"], e["score"], x / W, y / H, (x + w) / W,
                                                  (y + h) / H))
    return {k: np.array(sorted(v)) for k, v in out.items()}


def _ensemble_boxes_wbf(coco, preds, weights, iou_thr, conf_type):
    from ensemble_boxes import weighted_boxes_fusion

    out = []
    for img in coco["images"]:
        H, W = img["height"], img["width"]
        boxes, scores, labels = [], [], []
        for p in preds:
            mine = [e for e in p if e["image_id"] == img["id"]]
            boxes.append([[e["bbox"][0] / W, e["bbox"][1] / H, (e["bbox"][0] + e["bbox"][2]) / W,
                           (e["bbox"][1] + e["bbox"][3]) / H] for e in mine])
            scores.append([e["score"] for e in mine])
            labels.append([e["category_id"] for e in mine])
        if not any(len(s) for s in scores):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            b, s, lab = weighted_boxes_fusion([np.array(x).reshape(-1, 4) for x in boxes], scores, labels,
                                              weights=weights, iou_thr=iou_thr, skip_box_thr=0.0,
                                              conf_type=conf_type)
        for bb, ss, ll in zip(b, s, lab):
            out.append({"image_id": img["id"], "category_id": int(ll), "score": float(ss),
                        "bbox": [bb[0] * W, bb[1] * H, (bb[2] - bb[0]) * W, (bb[3] - bb[1]) * H]})
    return out


@pytest.mark.parametrize("weights,iou_thr,conf_type", [([2, 1, 1], 0.55, "avg"), (None, 0.6, "max")])
def test_cli_reproduces_weighted_boxes_fusion(tmp_path, capsys, weights, iou_thr, conf_type):
    coco, preds = _random_case(seed=1)
    (tmp_path / "images.json").write_text(json.dumps(coco))
    files = []
    for i, p in enumerate(preds):
        files.append(tmp_path / f"model{i}.json")
        files[-1].write_text(json.dumps(p))
    out = tmp_path / "fused.json"
    args = ["fuse", *map(str, files), "--images", str(tmp_path / "images.json"), "--method", "wbf",
            "--iou-thr", str(iou_thr), "--param", f"conf_type={conf_type}", "-o", str(out)]
    if weights:
        args += ["--weights", *map(str, weights)]
    assert main(args) == 0, capsys.readouterr().err
    fused = json.loads(out.read_text())
    sizes = {img["id"]: (img["height"], img["width"]) for img in coco["images"]}
    expected = _ensemble_boxes_wbf(coco, preds, weights, iou_thr, conf_type)
    assert len(fused) == len(expected) and len(fused) < sum(map(len, preds))  # boxes were merged
    got, want = _normalized_rows(fused, sizes), _normalized_rows(expected, sizes)
    assert got.keys() == want.keys()
    for iid in want:
        np.testing.assert_allclose(got[iid], want[iid], atol=1e-5)

    # and the library's own op (ensemble_boxes parity, normalised coordinates) gives the same boxes
    from ddkit.ops import ensemble

    fn = ensemble.weighted_boxes_fusion
    lib = []
    for img in coco["images"]:
        H, W = sizes[img["id"]]
        args_ = [[], [], []]
        for p in preds:
            mine = [e for e in p if e["image_id"] == img["id"]]
            args_[0].append(np.array([[e["bbox"][0] / W, e["bbox"][1] / H, (e["bbox"][0] + e["bbox"][2]) / W,
                                       (e["bbox"][1] + e["bbox"][3]) / H] for e in mine]).reshape(-1, 4))
            args_[1].append(np.array([e["score"] for e in mine]))
            args_[2].append(np.array([e["category_id"] for e in mine]))
        b, s, lab = fn(*args_, weights=weights, iou_thr=iou_thr, skip_box_thr=0.0, conf_type=conf_type)
        b, s, lab = (np.asarray(x) for x in (b, s, lab))
        lib += [{"image_id": img["id"], "category_id": int(ll), "score": float(ss),
                 "bbox": [bb[0] * W, bb[1] * H, (bb[2] - bb[0]) * W, (bb[3] - bb[1]) * H]}
                for bb, ss, ll in zip(b, s, lab)]
    lib_rows = _normalized_rows(lib, sizes)
    for iid in want:
        np.testing.assert_allclose(got[iid], lib_rows[iid], atol=1e-5)


def _cocoeval_by_hand(gt_path, results):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        ev = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def _jittered_gt(seed):
    """Detections made from the real ground truth: jittered boxes, a missed person, a false positive."""
    rng = np.random.default_rng(seed)
    coco = json.loads(COCO_MINI.read_text())
    sizes = {img["id"]: (img["height"], img["width"]) for img in coco["images"]}
    out = []
    for i, ann in enumerate(coco["annotations"]):
        if rng.random() < 0.15:
            continue
        H, W = sizes[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        b = np.array([x, y, x + w, y + h]) + rng.normal(0, 0.06, 4) * [w, h, w, h]
        b[0::2] = np.clip(b[0::2], 0, W)
        b[1::2] = np.clip(b[1::2], 0, H)
        out.append({"image_id": ann["image_id"], "category_id": 1, "score": float(rng.uniform(0.3, 1.0)),
                    "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
    for iid, (H, W) in sizes.items():
        out.append({"image_id": iid, "category_id": 1, "score": float(rng.uniform(0.0, 0.6)),
                    "bbox": [0.1 * W, 0.1 * H, 0.2 * W, 0.2 * H]})
    return out


def test_cli_evaluation_matches_pycocotools(tmp_path, capsys):
    files = []
    for seed in (0, 1, 2):
        files.append(tmp_path / f"det{seed}.json")
        files[-1].write_text(json.dumps(_jittered_gt(seed)))
    out = tmp_path / "fused.json"
    rc = main(["fuse", *map(str, files), "--images", str(COCO_MINI), "--method", "soft_nms", "--gt", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "fused.eval.json").read_text())
    assert list(report["metrics"]) == [*map(str, files), "fused (soft_nms)"]
    aps = []
    for name, path in [*((str(f), f) for f in files), ("fused (soft_nms)", out)]:
        stats = _cocoeval_by_hand(COCO_MINI, json.loads(path.read_text()))
        m = report["metrics"][name]
        for key, idx in (("AP", 0), ("AP50", 1), ("AP75", 2), ("APs", 3), ("APm", 4), ("APl", 5), ("AR@100", 8)):
            assert m[key] == pytest.approx(stats[idx], abs=1e-9), (name, key)
        assert f"{100 * m['AP']:.1f}" in printed
        aps.append(stats[0])
    assert 0.1 < min(aps) and len(set(aps)) == len(aps)  # the inputs and the fusion differ


def _write(tmp_path, name, obj):
    path = tmp_path / name
    path.write_text(json.dumps(obj))
    return path


def test_bad_entries_are_reported_not_clipped(tmp_path, capsys):
    good = {"image_id": 785, "category_id": 1, "bbox": [10.0, 10.0, 50.0, 60.0], "score": 0.9}
    bad = [
        good,
        {**good, "image_id": 999},                                  # 1: unknown image
        {**good, "bbox": [600.0, 10.0, 50.0, 60.0]},                # 2: x + w = 650 > 640
        {**good, "score": float("nan")},                            # 3: non-finite score
        {**good, "bbox": [10.0, 10.0, 50.0]},                       # 4: 3 numbers
        {k: v for k, v in good.items() if k != "score"},            # 5: missing score
        "not an entry",                                             # 6
        {**good, "category_id": 7},                                 # 7: not a category of the file
        {**good, "bbox": [10.0, -3.0, 5.0, 5.0]},                   # 8: y < 0
    ]
    pred = _write(tmp_path, "bad.json", bad)
    other = _write(tmp_path, "ok.json", [good])
    out = tmp_path / "fused.json"
    rc = main(["fuse", str(other), str(pred), "--images", str(COCO_MINI), "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    lines = err.strip().splitlines()
    assert "8 bad predictions" in lines[0] and len(lines) == 10
    assert lines[-1].count("--box-tolerance") == 1 and err.count("--box-tolerance") == 1  # once, for both boxes
    for i, text in [(1, "image_id 999 is not in the COCO images file"), (2, "outside image 785"),
                    (3, "score is not a finite number"), (4, "not a list of 4 numbers"), (5, "missing score"),
                    (6, "not an object"), (7, "category_id 7"), (8, "outside image 785")]:
        line = next(ln for ln in lines if f"bad.json[{i}]:" in ln)
        assert text in line, line
    assert '"bbox": [600.0, 10.0, 50.0, 60.0]' in next(ln for ln in lines if "bad.json[2]:" in ln)
    assert "ok.json" not in err

    # a box 0.05 px outside is past the default 0.01 px; an explicit tolerance accepts it (and clamps it)
    edge = _write(tmp_path, "edge.json", [{**good, "bbox": [600.0, 10.0, 40.05, 60.0]}])
    assert main(["fuse", str(edge), "--images", str(COCO_MINI), "-o", str(out)]) == 2
    assert main(["fuse", str(edge), "--images", str(COCO_MINI), "--box-tolerance", "0.1", "--method", "nms",
                 "-o", str(out)]) == 0
    x, y, w, h = json.loads(out.read_text())[0]["bbox"]
    assert x + w == pytest.approx(640.0)


def test_problem_list_is_capped(tmp_path, capsys):
    entries = [{"image_id": 1000 + i, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5} for i in range(27)]
    rc = main(["fuse", str(_write(tmp_path, "p.json", entries)), "--images", str(COCO_MINI), "-o",
               str(tmp_path / "o.json")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "27 bad predictions" in lines[0]
    assert len(lines) == 22 and lines[-1].strip() == "... and 7 more"


def test_cli_user_errors(tmp_path, capsys):
    ok = _write(tmp_path, "ok.json", [{"image_id": 785, "category_id": 1, "bbox": [1, 1, 5, 5], "score": 0.5}])
    out = str(tmp_path / "o.json")
    base = ["fuse", str(ok), str(ok), "--images", str(COCO_MINI), "-o", out]
    assert main(base + ["--weights", "1"]) == 2
    assert "--weights has 1 values for 2 input files" in capsys.readouterr().err
    assert main(base + ["--method", "prob_mean"]) == 2
    assert "ensembles probs, not boxes" in capsys.readouterr().err
    assert main(base + ["--method", "wbff"]) == 2
    assert "Did you mean 'wbf'" in capsys.readouterr().err
    assert main(base + ["--param", "not_a_key=1"]) == 2
    assert "unknown key 'not_a_key'" in capsys.readouterr().err
    assert main(["fuse", str(COCO_MINI), "--images", str(COCO_MINI), "-o", out]) == 2
    assert "ground-truth file" in capsys.readouterr().err


INSTANCE_AGGS = [e.spec.name for e in registered("aggregators") if e.spec.input == "instances"]


@pytest.mark.parametrize("name", INSTANCE_AGGS)
def test_fuse_results_with_every_box_aggregator(name):
    coco, preds = _random_case(seed=2, n_models=2)
    fused = fuse_results(preds, coco, {"name": name})
    sizes = {img["id"]: (img["height"], img["width"]) for img in coco["images"]}
    assert fused and not validate_results(fused, sizes, "fused", [1, 3])  # in the images, finite, well formed
    assert {e["image_id"] for e in fused} <= {e["image_id"] for p in preds for e in p}
    assert all(0 <= e["score"] <= 1 + 1e-6 and not math.isnan(e["score"]) for e in fused)


def test_fuse_results_api_errors():
    coco, preds = _random_case(seed=3, n_models=2)
    with pytest.raises(ConfigError):
        fuse_results([], coco, "wbf")
    broken = [list(preds[0]), [dict(preds[1][0], score="high")]]
    with pytest.raises(DataError, match=r"input1\[0\]: score is not a finite number"):
        fuse_results(broken, coco, "wbf")


@pytest.mark.parametrize("score", [-0.5, 7.0, 1.0001, -1e-9])
def test_scores_outside_0_1_are_refused_naming_file_index_and_entry(tmp_path, capsys, score):
    good = {"image_id": 785, "category_id": 1, "bbox": [10.0, 10.0, 50.0, 60.0], "score": 0.9}
    pred = _write(tmp_path, "scores.json", [good, {**good, "score": score}, {**good, "score": 1.0}])
    out = tmp_path / "fused.json"
    rc = main(["fuse", str(pred), "--images", str(COCO_MINI), "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists() and "Traceback" not in err
    line = next(ln for ln in err.splitlines() if "scores.json[1]:" in ln)
    assert f"score {score} is outside [0, 1]" in line and '"score": ' in line
    assert "scores.json[0]" not in err and "scores.json[2]" not in err  # 0.9 and 1.0 are fine
    with pytest.raises(DataError, match=r"scores\.json\[1\]: score"):
        fuse_results([[good, {**good, "score": score}]], json.loads(COCO_MINI.read_text()), "nms",
                     sources=["scores.json"])


@pytest.mark.parametrize("bbox,text", [
    ([10.0, 10.0, 0.0, 5.0], "bbox is empty"),            # zero width: a training reader would drop it
    ([5000.0, 5000.0, 10.0, 10.0], "wholly outside"),      # nowhere near the 640x425 image
    ([630.0, 10.0, 20.0, 5.0], "outside image 785"),       # a reader would clip it
    ([1.0, 2.0, 3.0, 10 ** 400], "non-finite"),            # an int too large for a float
])
def test_boxes_follow_the_shared_box_rule(bbox, text):
    sizes = {785: (425, 640)}
    entry = {"image_id": 785, "category_id": 1, "bbox": bbox, "score": 0.5}
    problems = validate_results([entry, {**entry, "bbox": [1.0, 2.0, 3.0, 4.0]}], sizes, "p.json")
    assert len(problems) == 1 and problems[0].index == 0 and text in str(problems[0])


@pytest.mark.parametrize("which", ["images", "pred", "gt", "eval"])
def test_output_that_is_an_input_is_refused_and_nothing_changes(tmp_path, capsys, which):
    """pass 22 H1: -o naming the --images / --gt file or an input results file overwrote it silently."""
    coco, preds = _random_case(seed=4, n_models=2)
    gt = copy.deepcopy(coco)
    gt["annotations"] = []
    images, gt_path = _write(tmp_path, "images.json", coco), _write(tmp_path, "gt.json", gt)
    a, b = _write(tmp_path, "a.json", preds[0]), _write(tmp_path, "b.json", preds[1])
    out = {"images": images, "pred": b, "gt": gt_path, "eval": tmp_path / "x.json"}[which]
    if which == "eval":  # -o x.json with --gt writes x.eval.json: here that is the --gt file
        gt_path = _write(tmp_path, "x.eval.json", gt)
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    rc = main(["fuse", str(a), str(b), "--images", str(images), "-o", str(out), "--gt", str(gt_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "choose another output" in err, err
    want = {"images": "is the --images file", "pred": "is input file 2", "gt": "is the --gt file",
            "eval": "writes " + str(gt_path) + ", which is the --gt file"}[which]
    assert want in err, err
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_output_that_is_a_folder_is_one_line(tmp_path, capsys):
    """pass 22 M4: -o FOLDER ended in a traceback (IsADirectoryError) from the atomic writer."""
    coco, preds = _random_case(seed=4, n_models=1)
    images, a = _write(tmp_path, "images.json", coco), _write(tmp_path, "a.json", preds[0])
    (tmp_path / "out").mkdir()
    rc = main(["fuse", str(a), "--images", str(images), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "is a folder; give a file name" in err
    assert not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("extra,text", [
    (["--param", "weights=[1]"], "--param weights=[1] has 1 values for 2 input files"),
    (["--param", "weights=[1,2,3]"], "--param weights=[1, 2, 3] has 3 values for 2 input files"),
    (["--method", "nms", "--param", "weights=[2]"], "has 1 values for 2 input files"),
    (["--box-tolerance", "-3"], "--box-tolerance must be a number of pixels >= 0, got -3.0"),
    (["--box-tolerance", "nan"], "--box-tolerance must be a number of pixels >= 0"),
])
def test_bad_weights_param_and_negative_tolerance_are_one_line(tmp_path, capsys, extra, text):
    """pass 22 M3 / L6: --param weights= of the wrong count was a traceback; a negative --box-tolerance called every
    valid box "outside image"."""
    coco, preds = _random_case(seed=5, n_models=2)
    images, a, b = (_write(tmp_path, n, o) for n, o in [("i.json", coco), ("a.json", preds[0]), ("b.json", preds[1])])
    out = tmp_path / "o.json"
    rc = main(["fuse", str(a), str(b), "--images", str(images), "-o", str(out)] + extra)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and text in err and not out.exists(), err
    with pytest.raises(ConfigError, match="box_tolerance must be"):
        fuse_results(preds, coco, "wbf", box_tolerance=-1.0)


def test_float32_boxes_clipped_by_the_detector_are_accepted_by_default(tmp_path, capsys):
    """pass 22 M2: detectron2 / mmdet clip float32 xyxy to the image and write x, y, w, h in float32: x + w comes back
    640.00002 for a 640-pixel image, which the old default tolerance (0) refused."""
    import torch

    coco, preds = _random_case(seed=6, n_models=2)
    sizes = {img["id"]: (img["height"], img["width"]) for img in coco["images"]}
    d2 = []
    for e in preds[1]:
        x, y, w, h = e["bbox"]
        H, W = sizes[e["image_id"]]
        b = torch.tensor([[x - 2.3, y - 1.7, x + w + W, y + h + H]], dtype=torch.float32)  # overshoot, then clip
        b[:, 0::2] = b[:, 0::2].clamp(0, W)
        b[:, 1::2] = b[:, 1::2].clamp(0, H)
        b[:, 2:] -= b[:, :2]
        d2.append({**e, "bbox": b[0].tolist()})
    past = sum(e["bbox"][0] + e["bbox"][2] > sizes[e["image_id"]][1] or
               e["bbox"][1] + e["bbox"][3] > sizes[e["image_id"]][0] for e in d2)
    assert past >= 2  # the case the default must accept: float32 noise past the border
    images, a, b = (_write(tmp_path, n, o) for n, o in [("i.json", coco), ("a.json", preds[0]), ("d2.json", d2)])
    out = tmp_path / "o.json"
    assert main(["fuse", str(a), str(b), "--images", str(images), "-o", str(out)]) == 0, capsys.readouterr().err
    assert not validate_results(json.loads(out.read_text()), sizes, "fused")  # its own float32 noise passes too
    assert main(["fuse", str(a), str(b), "--images", str(images), "-o", str(out), "--box-tolerance", "0"]) == 2
    assert "outside image" in capsys.readouterr().err


def test_an_empty_or_partial_input_is_warned_naming_it(tmp_path, capsys, caplog):
    """pass 22 M5: `[]` as one of two inputs halved every WBF score (avg over the model count), without a word."""
    coco, preds = _random_case(seed=7, n_models=2)
    images = _write(tmp_path, "i.json", coco)
    a, empty = _write(tmp_path, "a.json", preds[0]), _write(tmp_path, "empty.json", [])
    first = min(e["image_id"] for e in preds[1])
    part = _write(tmp_path, "part.json", [e for e in preds[1] if e["image_id"] == first])
    out = tmp_path / "o.json"
    with caplog.at_level("WARNING", logger="ddkit.fuse"):
        assert main(["fuse", str(a), str(empty), str(part), "--images", str(images), "-o", str(out)]) == 0
    lines = [r.getMessage() for r in caplog.records]
    n_a = len({e["image_id"] for e in preds[0]})
    assert len(lines) == 2 and n_a > 2
    assert lines[0].startswith(f"{empty}: 0 detections") and "average over the 3 inputs" in lines[0]
    assert lines[1].startswith(f"{part}: detections on only 1 of the 5 images of {images} (another input covers "
                               f"{n_a})")
    caplog.clear()
    most = [e for e in preds[0] if e["image_id"] != first]  # one image fewer than a: normal between detectors
    with caplog.at_level("WARNING", logger="ddkit.fuse"):  # inputs that cover (nearly) the same images: no word
        assert main(["fuse", str(a), str(a), "--images", str(images), "-o", str(out)]) == 0
        assert main(["fuse", str(a), str(_write(tmp_path, "most.json", most)), "--images", str(images), "-o",
                     str(out)]) == 0
    assert not caplog.records


def _with_keypoints(preds, k=3, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for p in preds:
        rows = []
        for e in p:
            x, y, w, h = e["bbox"]
            kps = [v for _ in range(k) for v in (x + rng.uniform(0, w), y + rng.uniform(0, h), rng.uniform(0.1, 1))]
            rows.append({**e, "keypoints": kps})
        out.append(rows)
    return out


def test_keypoints_are_carried_by_aggregators_that_keep_or_fuse_them(tmp_path, caplog):
    """pass 22 M1: fuse dropped `keypoints` even with --method keypoint_fusion or nms."""
    from ddkit.engine.fuse import results_to_instances
    from ddkit.engine.aggregation import build_instance_aggregator

    coco, preds = _random_case(seed=8, n_models=2)
    kp = _with_keypoints(preds)
    sizes = {img["id"]: (img["height"], img["width"]) for img in coco["images"]}
    inputs = [e for p in kp for e in p]
    kept = fuse_results(kp, coco, "nms")
    assert kept
    for e in kept:  # nms keeps the kept box's own keypoints (float32), confidences included
        src = [i for i in inputs if i["image_id"] == e["image_id"] and i["score"] == pytest.approx(e["score"])
               and np.allclose(i["bbox"], e["bbox"], atol=1e-3)]
        assert len(src) == 1 and e["keypoints"] == pytest.approx(src[0]["keypoints"], abs=1e-3)
    fused = fuse_results(kp, coco, "keypoint_fusion")
    ids = sorted({e["image_id"] for p in kp for e in p})
    views = [results_to_instances(p, sizes, ids, 3) for p in kp]
    agg = build_instance_aggregator("keypoint_fusion")
    want = [v for i in ids for v in agg([views[0][i], views[1][i]], sizes[i]).keypoints.reshape(-1).tolist()]
    assert [v for e in fused for v in e["keypoints"]] == pytest.approx(want, abs=1e-4)
    with caplog.at_level("WARNING", logger="ddkit.fuse"):
        fused = fuse_results(kp, coco, "wbf")
    assert not any("keypoints" in e for e in fused)
    assert len(caplog.records) == 1 and "keypoints are dropped: the aggregator wbf" in caplog.text
    assert "keypoint_fusion" in caplog.text and "nms" in caplog.text


def test_keypoints_of_two_kinds_or_malformed_and_segmentation(tmp_path, caplog):
    coco, preds = _random_case(seed=9, n_models=2)
    kp = _with_keypoints(preds)
    with pytest.raises(DataError, match=r"^input0 has results with 3 keypoints and input1 results with no keypoints"):
        fuse_results([kp[0], preds[1]], coco, "nms")
    with pytest.raises(DataError, match=r"input1 results with 2 keypoints"):
        fuse_results([kp[0], _with_keypoints(preds[1:], k=2)[0]], coco, "nms")
    bad = [dict(kp[1][0], keypoints=[1.0, 2.0]), dict(kp[1][1], keypoints=[1.0, 2.0, float("nan")])]
    with pytest.raises(DataError, match=r"input1\[0\]: keypoints is not a list of K x 3 finite numbers"):
        fuse_results([kp[0], bad], coco, "nms")
    with caplog.at_level("WARNING", logger="ddkit.fuse"):
        fuse_results([preds[0], [dict(e, segmentation=[[0, 0, 1, 1, 2, 2]]) for e in preds[1]]], coco, "wbf",
                     sources=["a.json", "m.json"])
    assert caplog.text.count("\n") == 1 and "m.json: the 'segmentation' of the results is dropped" in caplog.text


def test_gt_is_checked_before_out_is_written_and_the_row_names_the_method_run(tmp_path, capsys):
    """pass 22 L3: a --gt without annotations or lacking images failed after OUT.json was written; L5: with --param
    name=nms the table row said 'fused (wbf)'."""
    coco, preds = _random_case(seed=10, n_models=2)
    images, a, b = (_write(tmp_path, n, o) for n, o in [("i.json", coco), ("a.json", preds[0]), ("b.json", preds[1])])
    out = tmp_path / "o.json"
    base = ["fuse", str(a), str(b), "--images", str(images), "-o", str(out)]
    assert main(base + ["--gt"]) == 2  # the --images file has no annotations
    assert "has no 'annotations'" in capsys.readouterr().err and not out.exists()
    gt = copy.deepcopy(coco)
    gt["annotations"] = []
    gt["images"] = gt["images"][1:]
    assert main(base + ["--gt", str(_write(tmp_path, "gt.json", gt))]) == 2
    assert "lacks 1 image(s)" in capsys.readouterr().err and not out.exists()
    gt = copy.deepcopy(coco)
    gt["annotations"] = [{"id": j + 1, "image_id": e["image_id"], "category_id": e["category_id"],
                          "bbox": e["bbox"], "area": e["bbox"][2] * e["bbox"][3], "iscrowd": 0}
                         for j, e in enumerate(preds[0][:5])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(base + ["--param", "name=nms", "--gt", str(_write(tmp_path, "gt.json", gt))]) == 0
    printed = capsys.readouterr().out
    assert "| fused (nms) |" in printed and "fused (wbf)" not in printed
    assert "fused (nms)" in json.loads((tmp_path / "o.eval.json").read_text())["metrics"]


def test_images_file_problems_name_the_file(tmp_path, capsys):
    """pass 22 L2 / L8 / L10: a bad or duplicate image record did not name the --images file (a duplicate id was
    taken silently, the last one winning), an empty 'images' list made every prediction 'not in the COCO images
    file', an empty file was 'not valid JSON: Expecting value', a folder 'no such file', string ids had no hint."""
    coco, preds = _random_case(seed=11, n_models=1)
    a = _write(tmp_path, "a.json", preds[0])
    out = tmp_path / "o.json"

    def err_of(pred, images) -> str:
        assert main(["fuse", str(pred), "--images", str(images), "-o", str(out)]) == 2
        return capsys.readouterr().err

    noh = copy.deepcopy(coco)
    del noh["images"][1]["height"]
    assert f"{tmp_path / 'noh.json'}:images[1]: needs integer id" in err_of(a, _write(tmp_path, "noh.json", noh))
    huge = copy.deepcopy(coco)  # an int no float holds (found by the property test): one line, not OverflowError
    huge["images"][1]["height"] = 10 ** 400
    assert "images[1]: needs integer id (int64), height and width in 1..2147483647 pixels" in err_of(
        a, _write(tmp_path, "huge.json", huge))
    dup = copy.deepcopy(coco)
    dup["images"].append({**dup["images"][0], "height": 100, "width": 100})
    err = err_of(a, _write(tmp_path, "dup.json", dup))
    assert f"dup.json:images[5]: image id {coco['images'][0]['id']} again (first at images[0])" in err
    err = err_of(a, _write(tmp_path, "none.json", {**coco, "images": []}))
    assert err.count("\n") == 1 and "none.json: the 'images' list is empty" in err
    (tmp_path / "empty.json").write_text("")
    assert "empty.json: the file is empty" in err_of(tmp_path / "empty.json", _write(tmp_path, "i.json", coco))
    assert "empty.json: the file is empty" in err_of(a, tmp_path / "empty.json")
    (tmp_path / "folder").mkdir()
    assert "folder: is a folder, not a JSON file" in err_of(tmp_path / "folder", tmp_path / "i.json")
    strid = _write(tmp_path, "s.json", [{**e, "image_id": str(e["image_id"])} for e in preds[0]])
    err = err_of(strid, tmp_path / "i.json")
    assert err.count("COCO image ids are integers") == 1 and "s.json[0]: image_id is not an integer" in err
    assert not out.exists()


def test_results_classes_the_gt_file_lacks_are_warned_naming_the_file_and_ids(tmp_path, capsys, caplog):
    """pass 22 fuse L4: pycocotools scores only the --gt file's categories; results of other classes were left out
    of the AP without a word."""
    images = json.loads(COCO_MINI.read_text())
    images["categories"] = images["categories"] + [{"id": 7, "name": "train"}, {"id": 9, "name": "boat"}]
    preds = _jittered_gt(0)
    extra = [dict(d, category_id=7) for d in preds[:3]] + [dict(d, category_id=9) for d in preds[3:4]]
    files = [_write(tmp_path, "i.json", images), _write(tmp_path, "a.json", preds + extra),
             _write(tmp_path, "b.json", _jittered_gt(1))]
    base = ["fuse", str(files[1]), str(files[2]), "--images", str(files[0]), "-o", str(tmp_path / "o.json")]
    with caplog.at_level("WARNING", logger="ddkit.fuse"):
        assert main(base + ["--gt", str(COCO_MINI)]) == 0
    lines = [r.getMessage() for r in caplog.records if "category ids" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(f"{COCO_MINI}: the results' category ids 7, 9 (2 ids, 4 "
                                                   f"detections) are not in"), lines
    caplog.clear()
    with caplog.at_level("WARNING", logger="ddkit.fuse"):  # every class listed: no line
        assert main(["fuse", str(files[2]), "--images", str(COCO_MINI), "-o", str(tmp_path / "p.json"),
                     "--gt", str(COCO_MINI)]) == 0
    assert "category ids" not in caplog.text


def _gt_as_keypoint_results(seed=None):
    """The mini COCO file's person annotations with keypoints (pycocotools ignores the others) as results (score 1:
    keypoint AP 1.0), or with ``seed`` a copy with jittered keypoints and boxes, random scores and one person
    missed."""
    coco = json.loads(COCO_MINI.read_text())
    sizes = {img["id"]: (img["height"], img["width"]) for img in coco["images"]}
    rng = np.random.default_rng(seed)
    out = []
    for i, ann in enumerate(coco["annotations"]):
        kps, (x, y, w, h) = np.array(ann["keypoints"], dtype=float).reshape(-1, 3), ann["bbox"]
        if ann["num_keypoints"] == 0 or (seed is not None and i == 2):
            continue
        if seed is not None:
            kps[:, :2] += rng.normal(0, 0.04, (len(kps), 2)) * [w, h]
            H, W = sizes[ann["image_id"]]
            x1, y1 = max(0.0, x + rng.normal(0, 0.03) * w), max(0.0, y + rng.normal(0, 0.03) * h)
            x, y, w, h = x1, y1, min(W - x1, w * rng.uniform(0.95, 1.05)), min(H - y1, h * rng.uniform(0.95, 1.05))
        out.append({"image_id": ann["image_id"], "category_id": 1, "bbox": [x, y, w, h],
                    "score": 1.0 if seed is None else float(rng.uniform(0.3, 1.0)),
                    "keypoints": kps.reshape(-1).tolist()})
    return out


@pytest.mark.parametrize("method", ["nms", "keypoint_fusion", "wbf"])
def test_gt_with_keypoints_scores_the_keypoints_of_every_input_and_the_fusion(tmp_path, capsys, method):
    """--gt scored boxes only, even when the ground truth and the results have keypoints."""
    from ddkit.engine.coco_eval import coco_evaluate

    a, b = _write(tmp_path, "a.json", _gt_as_keypoint_results()), _write(tmp_path, "b.json", _gt_as_keypoint_results(5))
    out = tmp_path / "f.json"
    assert main(["fuse", str(a), str(b), "--images", str(COCO_MINI), "--method", method, "--gt", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "f.eval.json").read_text())
    gt, fused_name = json.loads(COCO_MINI.read_text()), f"fused ({method})"
    ids = [img["id"] for img in gt["images"]]
    kp = report["keypoint_metrics"]
    named = {str(a): a, str(b): b, **({} if method == "wbf" else {fused_name: out})}
    assert list(kp) == list(named) and "keypoints (OKS):" in printed
    for name, path in named.items():
        want = coco_evaluate(COCO_MINI, json.loads(path.read_text()), iou_type="keypoints", image_ids=ids)
        assert kp[name]["AP"] == pytest.approx(want["AP"], abs=1e-9), name
        assert kp[name] == pytest.approx(want, abs=1e-9), name
    assert kp[str(a)]["AP"] == pytest.approx(1.0) and 0.1 < kp[str(b)]["AP"] < 0.99
    assert report["keypoint_sigmas"] == pytest.approx([0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072,
                                                       0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089])
    assert list(report["metrics"]) == [str(a), str(b), fused_name]  # boxes: every row as before
    dropped = "no fused keypoint row: wbf drops the inputs' keypoints (boxes only)"
    assert (dropped in printed) == (method == "wbf")


def test_gt_keypoints_boxes_only_inputs_and_unknown_keypoint_names(tmp_path, capsys, caplog):
    """Boxes-only results give no keypoint metrics; keypoint names ddkit does not know get the default sigma,
    warned."""
    from ddkit.engine.keypoint_meta import DEFAULT_SIGMA

    boxes = [{k: v for k, v in e.items() if k != "keypoints"} for e in _gt_as_keypoint_results(6)]
    a, b = _write(tmp_path, "a.json", boxes), _write(tmp_path, "b.json", _jittered_gt(1))
    out = tmp_path / "f.json"
    assert main(["fuse", str(a), str(b), "--images", str(COCO_MINI), "--method", "nms", "--gt", "-o", str(out)]) == 0
    assert "keypoints (OKS)" not in capsys.readouterr().out
    assert "keypoint_metrics" not in json.loads((tmp_path / "f.eval.json").read_text())
    gt = json.loads(COCO_MINI.read_text())
    gt["categories"][0]["keypoints"] = [f"p{i}" for i in range(17)]
    gt_path = _write(tmp_path, "gt.json", gt)
    a = _write(tmp_path, "a.json", _gt_as_keypoint_results())
    with caplog.at_level("WARNING"):
        assert main(["fuse", str(a), "--images", str(COCO_MINI), "--method", "nms", "--gt", str(gt_path),
                     "-o", str(out)]) == 0
    report = json.loads((tmp_path / "f.eval.json").read_text())
    assert report["keypoint_sigmas"] == [DEFAULT_SIGMA] * 17 and report["keypoint_metrics"][str(a)]["AP"] == 1.0
    assert "OKS sigmas unknown for these 17 keypoints" in caplog.text and "flip" not in caplog.text


def test_the_ground_truths_keypoints_are_those_of_its_first_category_by_id_as_datasets_read_them():
    """``fuse --gt`` takes the keypoint names (and so the sigmas) from the category a COCO dataset takes them from
    (:attr:`CocoFile.keypoint_names`: the first by id), not the first in file order."""
    from ddkit.commands.fuse import gt_keypoint_sigmas

    gt = {"categories": [{"id": 2, "name": "b", "keypoints": ["x", "y", "z"]},
                         {"id": 1, "name": "a", "keypoints": [f"k{i}" for i in range(5)]}]}
    assert len(gt_keypoint_sigmas(gt, "gt.json")) == 5
    assert gt_keypoint_sigmas({"categories": [{"id": 1, "name": "a"}]}, "gt.json") is None
