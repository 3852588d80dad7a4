"""Property tests (hypothesis): random malformed COCO files, YOLO folders and fuse inputs either load as valid data or
raise a DDKitError subclass, never another exception."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddkit.engine.coco_file import read_coco_file
from ddkit.engine.fuse import fuse_results
from ddkit.errors import DDKitError

# CI (``CI`` set, as ``.ci/run`` runs) draws the same cases every run, so a landing is not decided by chance; a
# developer's run draws new ones, which is how this file finds bugs (session 26: fuse's 10^400 image height)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                    derandomize=bool(os.environ.get("CI")))

scalars = (st.none() | st.booleans() | st.integers(-3, 3) | st.integers() | st.floats() | st.text(max_size=4)
           | st.just(10 ** 400))
anything = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=4), c,
                                                                                          max_size=3), max_leaves=8)
numbers = st.integers(-20, 120) | st.floats(-50, 200) | st.sampled_from([math.nan, math.inf, -math.inf, 0, 0.0])


def _maybe(value_strategy):
    """Mostly plausible values, sometimes anything at all."""
    return st.one_of(value_strategy, value_strategy, value_strategy, anything)


def _record(fields: dict) -> st.SearchStrategy:
    """A dict whose keys are each present or not, with values from their strategies."""
    return st.fixed_dictionaries({}, optional=fields)


coords = st.floats(-60, 160, allow_nan=False) | st.integers(-60, 160)
sizes = st.tuples(st.integers(1, 100), st.integers(1, 100))


@st.composite
def valid_coco(draw) -> dict:
    """A valid COCO dict whose boxes may stick out of (or lie outside) their images."""
    image_ids = draw(st.lists(st.integers(0, 50), min_size=1, max_size=3, unique=True))
    images = [{"id": i, "file_name": f"{i}.jpg", "height": h, "width": w}
              for i, (h, w) in zip(image_ids, draw(st.lists(sizes, min_size=len(image_ids),
                                                            max_size=len(image_ids))))]
    cats = [{"id": c, "name": str(c)} for c in draw(st.lists(st.integers(1, 5), min_size=1, max_size=2, unique=True))]
    if draw(st.booleans()):
        cats[0]["keypoints"] = ["left_a", "right_a"]
    anns = []
    for k in range(draw(st.integers(0, 5))):
        x, y = draw(coords), draw(coords)
        w, h = draw(st.floats(0, 120) | st.integers(0, 120)), draw(st.floats(0, 120) | st.integers(0, 120))
        ann = {"id": k + 1, "image_id": draw(st.sampled_from(image_ids)),
               "category_id": draw(st.sampled_from([c["id"] for c in cats])), "bbox": [x, y, w, h]}
        if draw(st.booleans()):
            ann["keypoints"] = [draw(coords), draw(coords), draw(st.integers(0, 2)), 0, 0, 0]
        anns.append(ann)
    return {"images": images, "annotations": anns, "categories": cats}


KEYS = {"images": ["id", "file_name", "width", "height"], "categories": ["id", "name", "keypoints"],
        "annotations": ["id", "image_id", "category_id", "bbox", "keypoints", "iscrowd", "area", "num_keypoints"]}
DELETE = object()
values = anything | numbers | st.lists(numbers, min_size=4, max_size=4) | st.just(DELETE) | st.sampled_from(
    ["../x.jpg", "/abs/x.jpg", "", [math.nan] * 6, [1, 2, 3, -4]])
mutations = st.lists(st.tuples(st.sampled_from(sorted(KEYS)), st.integers(0, 5), st.integers(0, 7), values),
                     max_size=3)


def _mutate(data: dict, muts) -> dict:
    """Set (or delete) one field of one record per mutation; an index past the end duplicates a record."""
    for section, index, key_index, value in muts:
        records = data[section]
        if not records:
            continue
        if index >= len(records) and index == 5:
            records.append(dict(records[0]))  # a duplicate id
            continue
        rec = records[index % len(records)]
        key = KEYS[section][key_index % len(KEYS[section])]
        if value is DELETE:
            rec.pop(key, None)
        else:
            rec[key] = value
    return data


images = _record({"id": _maybe(st.integers(0, 4)), "width": _maybe(st.integers(-1, 80)),
                  "height": _maybe(st.integers(-1, 60)),
                  "file_name": _maybe(st.sampled_from(["a.jpg", "../x.jpg", "/abs/x.jpg", "", "d/../b.png"]))})
annotations = _record({"id": _maybe(st.integers(0, 6)), "image_id": _maybe(st.integers(0, 4)),
                       "category_id": _maybe(st.integers(0, 3)),
                       "bbox": _maybe(st.lists(numbers, min_size=3, max_size=5)),
                       "keypoints": _maybe(st.lists(numbers, min_size=6, max_size=6)),
                       "iscrowd": _maybe(st.integers(0, 1)), "area": _maybe(numbers)})
categories = _record({"id": _maybe(st.integers(0, 3)), "name": _maybe(st.text(max_size=3)),
                      "keypoints": _maybe(st.just(["left_a", "right_a"]))})
coco_files = st.one_of(st.builds(_mutate, valid_coco(), mutations), st.builds(_mutate, valid_coco(), mutations),
                       st.builds(_mutate, valid_coco(), mutations), _record({
                           "images": _maybe(st.lists(images, max_size=4)),
                           "annotations": _maybe(st.lists(annotations, max_size=6)),
                           "categories": _maybe(st.lists(categories, max_size=3))}) | anything)


def _assert_valid_coco(coco) -> None:
    ids = [im["id"] for im in coco.images]
    assert len(ids) == len(set(ids))
    sizes = {im["id"]: (im["height"], im["width"]) for im in coco.images}
    cats = {c["id"] for c in coco.categories}
    for ann in coco.annotations:
        assert ann["image_id"] in sizes and ann["category_id"] in cats
        x, y, w, h = ann["bbox"]
        H, W = sizes[ann["image_id"]]
        assert all(math.isfinite(v) for v in (x, y, w, h)) and w > 0 and h > 0
        assert x >= 0 and y >= 0 and x + w <= W + 1 + 1e-6 and y + h <= H + 1 + 1e-6


@SETTINGS
@given(data=coco_files)
def test_random_coco_files_load_valid_data_or_raise_a_ddkit_error(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.json"
        path.write_text(json.dumps(data))
        try:
            coco = read_coco_file(path)
        except DDKitError as err:
            assert str(path) in str(err) and "\n" not in str(err)
            return
        _assert_valid_coco(coco)


tokens = st.sampled_from(["0", "1", "2", "0.5", "0.2", "-0.2", "1.5", "nan", "inf", "abc", "80", "1e400", "0.0",
                          "1e300", "3"])
norm = st.floats(-0.5, 1.5, allow_nan=False).map(lambda v: f"{v:.4f}")
size = st.floats(0, 1.5, allow_nan=False).map(lambda v: f"{v:.4f}")
YAMLS = {"": 0, "names: [a, b]\n": 0, "names: {0: a, 1: b}\nkpt_shape: [2, 3]\nflip_idx: [1, 0]\n": 6,
         "names: [a, b]\nkpt_shape: [2, 2]\n": 4, "kpt_shape: [1, 3]\nflip_idx: 5\n": 3, "names: [a\n": 0,
         "names: 3\n": 0, "- 1\n": 0, "names: [a, b]\nkpt_shape: [2, 3]\nflip_idx: [0, 0]\n": 6}


@st.composite
def yolo_cases(draw) -> tuple[str, list[str]]:
    """A data yaml (mostly one of a few, valid or not; sometimes random text) and label lines (mostly of the
    right shape for it, with coordinates in and out of the image; sometimes random tokens or text)."""
    pick = draw(st.integers(0, len(YAMLS)))
    yaml_text = sorted(YAMLS)[pick] if pick < len(YAMLS) else draw(st.text(max_size=20))
    n_kp = YAMLS.get(yaml_text, 0)
    vis = st.sampled_from(["0", "1", "2"])
    plausible = st.builds(lambda c, box, kps: " ".join([c, *box, *kps]), st.sampled_from(["0", "1"]),
                          st.tuples(norm, norm, size, size),
                          st.lists(norm | vis, min_size=n_kp, max_size=n_kp))
    odd = st.one_of(st.lists(tokens, max_size=12).map(" ".join), st.text(max_size=12))
    lines = draw(st.lists(plausible, max_size=4))
    if draw(st.integers(0, 3)) == 0:
        lines.insert(draw(st.integers(0, len(lines))), draw(odd))
    return yaml_text, lines


@SETTINGS
@given(case=yolo_cases())
def test_random_yolo_folders_load_valid_data_or_raise_a_ddkit_error(case):
    yaml_text, lines = case
    from PIL import Image

    from ddkit_plugins.datasets import YoloDataset

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images" / "train").mkdir(parents=True)
        (root / "labels" / "train").mkdir(parents=True)
        Image.new("RGB", (8, 6)).save(root / "images" / "train" / "a.png")
        (root / "labels" / "train" / "a.txt").write_text("\n".join(lines))
        (root / "data.yaml").write_text(yaml_text)
        try:
            ds = YoloDataset(str(root), check_images=False)
        except DDKitError as err:
            assert "\n" not in str(err)
            return
        t = ds.get_target(0)
        assert t["boxes"].dtype == torch.float32 and torch.isfinite(t["boxes"]).all()
        assert (t["boxes"] >= 0).all() and (t["boxes"][:, 2] <= 8).all() and (t["boxes"][:, 3] <= 6).all()
        assert ((t["boxes"][:, 2:] - t["boxes"][:, :2]) > 0).all()
        assert set(t["labels"].tolist()) <= {c["id"] for c in ds.info.categories}
        if ds.info.num_keypoints:
            assert t["keypoints"].shape == (len(t["boxes"]), ds.info.num_keypoints, 3)


@st.composite
def fuse_inputs(draw) -> tuple[list, dict]:
    """Valid results lists (boxes may stick out) and images, then up to 3 random mutations of entries / images."""
    coco = valid_coco().map(lambda d: {"images": d["images"],
                                       "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]})
    images = draw(coco)
    preds = []
    for _ in range(draw(st.integers(1, 3))):
        entries = []
        for _ in range(draw(st.integers(0, 4))):
            im = draw(st.sampled_from(images["images"]))
            x, y = draw(st.floats(0, im["width"] - 0.5)), draw(st.floats(0, im["height"] - 0.5))
            w, h = draw(st.floats(0.5, im["width"] - x)), draw(st.floats(0.5, im["height"] - y))
            entries.append({"image_id": im["id"], "category_id": draw(st.sampled_from([1, 2])),
                            "bbox": [x, y, w, h], "score": draw(st.floats(0, 1))})
        preds.append(entries)
    for _ in range(draw(st.integers(0, 3))):
        target = draw(st.sampled_from(["entry", "image", "list"]))
        value = draw(values)
        if target == "list":
            preds[draw(st.integers(0, len(preds) - 1))] = value if value is not DELETE else []
            continue
        records = images["images"] if target == "image" else preds[draw(st.integers(0, len(preds) - 1))]
        if not isinstance(records, list) or not records:
            continue
        rec = records[draw(st.integers(0, len(records) - 1))]
        if not isinstance(rec, dict):
            continue
        key = draw(st.sampled_from(["id", "height", "width"] if target == "image"
                                   else ["image_id", "category_id", "bbox", "score"]))
        if value is DELETE:
            rec.pop(key, None)
        else:
            rec[key] = value
    return preds, images


@SETTINGS
@given(case=fuse_inputs())
def test_random_fuse_inputs_fuse_or_raise_a_ddkit_error(case):
    preds, coco = case
    try:
        fused = fuse_results(preds, coco, "nms")
    except DDKitError:
        return
    sizes = {im["id"]: (im["height"], im["width"]) for im in coco["images"]}
    for e in fused:
        x, y, w, h = e["bbox"]
        H, W = sizes[e["image_id"]]
        assert 0 <= e["score"] <= 1 and x >= 0 and y >= 0 and x + w <= W + 1e-6 and y + h <= H + 1e-6


@pytest.mark.parametrize("text", ["{", "[]", "null", "\"images\"", "{\"images\": 5}"])
def test_degenerate_json_documents(tmp_path, text):
    path = tmp_path / "f.json"
    path.write_text(text)
    with pytest.raises(DDKitError):
        read_coco_file(path)
