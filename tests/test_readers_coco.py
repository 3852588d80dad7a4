"""The one validating COCO reader (ddkit.engine.coco_file) and the box rule (ddkit.engine.box_rule): every class of
bad input with several members gives one DataError line naming the file and the field; impossible boxes are
clipped / dropped with one warning, never silently; pseudo-labels read back follow the same rule."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

import ddkit
from ddkit.engine.box_rule import CLIPPED, DROPPED, NONFINITE, OK, BoxCheck, box_rule
from ddkit.engine.coco_eval import coco_evaluate
from ddkit.engine.coco_file import read_coco_file, validate_coco
from ddkit.engine.data import build_data, get_target
from ddkit.engine.pseudo import load_pseudo_dataset
from ddkit.errors import DataError

DATA = Path(__file__).parents[1].parent / "shared" / "data"
COCO_JSON = DATA / "coco-val2017-mini" / "test_coco.json"
pytestmark = pytest.mark.skipif(not COCO_JSON.is_file(), reason="shared/data fixtures are not beside the repository")


def _coco(tmp_path: Path, mutate=None, images: bool = False) -> Path:
    data = json.loads(COCO_JSON.read_text())
    if mutate is not None:
        mutate(data)
    if images:
        for im in json.loads(COCO_JSON.read_text())["images"]:
            shutil.copy(COCO_JSON.parent / im["file_name"], tmp_path / im["file_name"])
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    return path


def _error(path: Path, **kw) -> str:
    with pytest.raises(DataError) as err:
        read_coco_file(path, **kw)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg and "Traceback" not in msg
    return msg


def test_the_fixture_reads_unchanged():
    coco = read_coco_file(COCO_JSON)
    raw = json.loads(COCO_JSON.read_text())
    assert [a["bbox"] for a in coco.annotations] == [a["bbox"] for a in raw["annotations"]]
    assert coco.boxes_clipped == coco.boxes_dropped == 0 and len(coco.keypoint_names) == 17
    by_image = coco.annotations_by_image()
    assert set(by_image) == {im["id"] for im in raw["images"]} and sum(map(len, by_image.values())) == 14
    assert coco.image_path(raw["images"][0]) == COCO_JSON.parent / raw["images"][0]["file_name"]


# ------------------------------------------------------------------------------------------- duplicate ids
@pytest.mark.parametrize("key,what", [("images", "image"), ("annotations", "annotation"), ("categories", "category")])
def test_duplicate_ids_name_the_id_and_both_records(tmp_path, key, what):
    def dup(d):
        if key == "categories":
            d["categories"].append({**d["categories"][0], "name": "other"})
        else:
            d[key][2]["id"] = d[key][0]["id"]

    path = _coco(tmp_path, dup)
    rid = json.loads(COCO_JSON.read_text())[key][0]["id"]
    second = 1 if key == "categories" else 2
    msg = _error(path)
    assert f"{what} id {rid} is not unique" in msg and f"{key}[0]" in msg and f"{key}[{second}]" in msg


def test_duplicate_image_ids_never_train_on_the_wrong_boxes(tmp_path):
    path = _coco(tmp_path, lambda d: d["images"][1].__setitem__("id", d["images"][0]["id"]), images=True)
    with pytest.raises(DataError, match="image id .* is not unique"):
        ddkit.build("datasets", {"name": "coco", "annotations": str(path)})


def test_two_image_records_of_one_file_are_refused(tmp_path):
    """The second record's boxes would be trained on the first record's picture; ``./x`` is ``x``."""
    raw = json.loads(COCO_JSON.read_text())["images"]
    path = _coco(tmp_path, lambda d: d["images"][2].__setitem__("file_name", "./" + d["images"][0]["file_name"]))
    msg = _error(path)
    assert f"images {raw[0]['id']} and {raw[2]['id']} both have file_name" in msg
    assert raw[0]["file_name"] in msg and "one image record" in msg


def test_two_categories_of_one_name_are_refused(tmp_path):
    """ddkit matches classes by name (eval, predict --coco, a recipe's test part): a name is one class."""
    path = _coco(tmp_path, lambda d: d["categories"].append({"id": 7, "name": d["categories"][0]["name"]}))
    msg = _error(path)
    assert "categories 1 and 7 are both named 'person'" in msg and "its own name" in msg


# ------------------------------------------------------------------------------------ incomplete image records
@pytest.mark.parametrize("field", ["id", "file_name", "width", "height"])
def test_image_record_without_a_field(tmp_path, field):
    msg = _error(_coco(tmp_path, lambda d: d["images"][3].pop(field)))
    assert "images[3]" in msg and f"missing field {field!r}" in msg


@pytest.mark.parametrize("field,value", [("width", 0), ("height", -3), ("width", "640"), ("id", "785"),
                                         ("file_name", 17), ("height", 1.5)])
def test_image_record_with_a_bad_value(tmp_path, field, value):
    msg = _error(_coco(tmp_path, lambda d: d["images"][1].__setitem__(field, value)))
    assert "images[1]" in msg and field in msg


@pytest.mark.parametrize("mutate,field", [
    (lambda d: d.pop("images"), "'images'"),
    (lambda d: d.__setitem__("annotations", {"a": 1}), "'annotations'"),
    (lambda d: d["annotations"].__setitem__(0, "x"), "annotations[0]"),
    (lambda d: d["annotations"][0].__setitem__("image_id", [1]), "image_id"),
    (lambda d: d["annotations"][0].__setitem__("category_id", None), "category_id"),
    (lambda d: d["annotations"][0].__setitem__("keypoints", [1] * 50 + [float("nan")]), "keypoints"),
    (lambda d: d["annotations"][0].__setitem__("iscrowd", "no"), "iscrowd"),
    (lambda d: d["categories"][0].__setitem__("keypoints", "nose"), "keypoints"),
])
def test_malformed_structure_is_one_line(tmp_path, mutate, field):
    assert field in _error(_coco(tmp_path, mutate))


def test_not_json_and_not_an_object(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{\"images\": [")
    assert "not valid JSON" in _error(bad)
    bad.write_text("[1, 2]")
    assert "JSON object" in _error(bad)
    assert "not found" in _error(tmp_path / "missing.json")


# ------------------------------------------------------------------------------------- file_name outside root
@pytest.mark.parametrize("name", ["../../x.jpg", "sub/../../x.jpg", "/etc/passwd"])
def test_file_name_outside_the_image_root_is_refused(tmp_path, name):
    path = _coco(tmp_path, lambda d: d["images"][2].__setitem__("file_name", name))
    msg = _error(path)
    assert "images[2]" in msg and "outside the image root" in msg and "allow_outside_root" in msg
    coco = read_coco_file(path, allow_outside_root=True)
    assert coco.images[2]["file_name"] == name


def test_allow_outside_root_is_a_dataset_option(tmp_path):
    inner = tmp_path / "json"
    inner.mkdir()
    path = _coco(inner, lambda d: [im.__setitem__("file_name", "../" + im["file_name"]) for im in d["images"]])
    _coco(tmp_path, images=True)
    with pytest.raises(DataError, match="outside the image root"):
        ddkit.build("datasets", {"name": "coco", "annotations": str(path)})
    ds = ddkit.build("datasets", {"name": "coco", "annotations": str(path), "allow_outside_root": True})
    assert len(ds) == 4 and ds.skipped == []
    # an absolute file_name inside the root is fine
    absolute = _coco(tmp_path, lambda d: [im.__setitem__("file_name", str(tmp_path / im["file_name"]))
                                          for im in d["images"]])
    assert len(read_coco_file(absolute).images) == 4


# ----------------------------------------------------------------------------------------- impossible boxes
def test_box_rule_against_a_slow_reference():
    gen = torch.Generator().manual_seed(0)
    boxes = torch.rand(500, 4, generator=gen) * 140 - 20
    boxes[::7, 2] = boxes[::7, 0]  # zero width
    boxes[3, 1] = float("nan")
    boxes[5, 2] = float("inf")
    sizes = torch.randint(50, 100, (500, 2), generator=gen)
    out, status = box_rule(boxes, sizes, tolerance=1.0)
    for b, s, o, st in zip(boxes.tolist(), sizes.tolist(), out.tolist(), status.tolist()):
        h, w = s
        if not all(abs(v) < float("inf") for v in b):
            assert st == NONFINITE
            continue
        c = [min(max(b[0], 0), w), min(max(b[1], 0), h), min(max(b[2], 0), w), min(max(b[3], 0), h)]
        if c[2] - c[0] <= 0 or c[3] - c[1] <= 0:
            expect = DROPPED
        else:
            expect = CLIPPED if max(abs(x - y) for x, y in zip(b, c)) > 1.0 else OK
            assert o == pytest.approx(c, abs=1e-4)
        assert st == expect, (b, s)
    assert {OK, CLIPPED, DROPPED, NONFINITE} <= set(status.tolist())


def test_box_check_counts_and_names_the_first_offender(caplog):
    check = BoxCheck("f.json")
    boxes = torch.tensor([[0, 0, 10, 10], [-5, 0, 10, 10], [200, 200, 210, 210], [5, 5, 5, 9], [-0.5, 0, 100.5, 50]])
    with caplog.at_level(logging.WARNING):
        kept, keep = check.apply(boxes, (50, 100), lambda i: f"box #{i}")
        check.warn()
    assert keep.tolist() == [True, True, False, False, True]
    torch.testing.assert_close(kept, torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 100, 50.]]))
    assert (check.clipped, check.dropped) == (1, 2)
    assert "f.json: clipped 1 box(es)" in caplog.text and "first: box #1" in caplog.text
    assert "dropped 2 instance(s)" in caplog.text and "first: box #2" in caplog.text
    with pytest.raises(DataError, match=r"f.json: box #0: bbox has a non-finite value"):
        check.apply(torch.tensor([[float("nan"), 0, 1, 1]]), (50, 100), lambda i: f"box #{i}")


@pytest.mark.parametrize("bbox,clipped,dropped", [
    ([5000, 5000, 10, 10], 0, 1),      # wholly outside a 640x425 image
    ([-100, -100, 50, 50], 0, 1),      # wholly outside, the other side
    ([10, 10, 0, 20], 0, 1),           # zero width
    ([600, 10, 100, 10], 1, 0),        # sticks out 60 px: clipped to x2 = 640
    ([-20, 400, 50, 50], 1, 0),        # both sides
    ([0, 0, 640.4, 425.3], 0, 0),      # within the 1 px tolerance: silent
])
def test_impossible_boxes_are_clipped_or_dropped_with_a_warning(tmp_path, caplog, bbox, clipped, dropped):
    raw = json.loads(COCO_JSON.read_text())
    first = raw["images"][0]  # 000000000785.jpg, 640x425
    assert (first["width"], first["height"]) == (640, 425)
    ann_id = next(a["id"] for a in raw["annotations"] if a["image_id"] == first["id"])
    path = _coco(tmp_path, lambda d: next(a for a in d["annotations"] if a["id"] == ann_id).__setitem__("bbox", bbox),
                 images=True)
    with caplog.at_level(logging.WARNING):
        coco = read_coco_file(path)
        ds = ddkit.build("datasets", {"name": "coco", "annotations": str(path)})
    assert (coco.boxes_clipped, coco.boxes_dropped) == (clipped, dropped)
    assert len(coco.annotations) == 14 - dropped
    n_boxes = sum(len(get_target(ds, i)["boxes"]) for i in range(len(ds)))
    assert n_boxes == 14 - dropped
    if clipped or dropped:
        assert str(path) in caplog.text and f"annotation id {ann_id}" in caplog.text
        assert ("clipped 1" in caplog.text) == bool(clipped) and ("dropped 1" in caplog.text) == bool(dropped)
    else:
        assert "clipped" not in caplog.text and "dropped" not in caplog.text
    for t in (get_target(ds, i) for i in range(len(ds))):
        h, w = t["size"]
        assert (t["boxes"][:, 2] <= w).all() and (t["boxes"][:, 3] <= h).all() and (t["boxes"] >= 0).all()
        assert len(t["keypoints"]) == len(t["boxes"]) == len(t["labels"])


@pytest.mark.parametrize("bbox", [[float("nan"), 1, 2, 3], [1, 2, float("inf"), 3], [1, 2, 3, -4], [1, 2, 3]])
def test_non_finite_or_malformed_boxes_are_errors(tmp_path, bbox):
    msg = _error(_coco(tmp_path, lambda d: d["annotations"][4].__setitem__("bbox", bbox)))
    assert "annotations[4]" in msg and "bbox" in msg


# ------------------------------------------------------------------------------------------ crowdpose style
def test_crowdpose_style_file_without_num_keypoints_loads_and_evaluates(tmp_path):
    path = _coco(tmp_path, lambda d: [a.pop("num_keypoints") for a in d["annotations"]])
    coco = read_coco_file(path)
    raw = json.loads(COCO_JSON.read_text())
    assert [a["num_keypoints"] for a in coco.annotations] == [a["num_keypoints"] for a in raw["annotations"]]
    results = [{"image_id": a["image_id"], "category_id": 1, "score": 0.5 + 0.01 * i, "bbox": a["bbox"],
                "keypoints": [v + (i % 3) for v in a["keypoints"]]} for i, a in enumerate(raw["annotations"])]
    crowd = json.loads(path.read_text())
    got = coco_evaluate(crowd, results, "keypoints")  # raised pycocotools' KeyError 'num_keypoints' before
    assert got == coco_evaluate(raw, results, "keypoints")


# --------------------------------------------------------------------------------- pseudo-labels read back
def _pseudo(tmp_path: Path, anns: list[dict]) -> Path:
    data = {"info": {"image_root": str(tmp_path)}, "categories": [{"id": 1, "name": "a"}],
            "images": [{"id": 1, "file_name": "a.png", "height": 50, "width": 100, "ddkit_index": 0}],
            "annotations": anns}
    path = tmp_path / "pseudo_labels.json"
    path.write_text(json.dumps(data))
    return path


def test_pseudo_labels_read_back_follow_the_box_rule(tmp_path, caplog):
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [90, 10, 30, 10], "score": 0.9},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [300, 10, 5, 5], "score": 0.8},
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.7}]
    with caplog.at_level(logging.WARNING):
        ds = load_pseudo_dataset(_pseudo(tmp_path, anns))
    t = ds.get_target(0)
    torch.testing.assert_close(t["boxes"], torch.tensor([[90., 10, 100, 20], [1, 2, 4, 6]]))
    assert "clipped 1" in caplog.text and "dropped 1" in caplog.text and "annotation id 2" in caplog.text


@pytest.mark.parametrize("ann,field", [
    ({"id": 1, "image_id": 1, "category_id": 1, "bbox": [float("nan"), 1, 2, 2]}, "bbox"),
    ({"id": 1, "image_id": 9, "category_id": 1, "bbox": [1, 1, 2, 2]}, "image_id"),
    ({"id": 1, "image_id": 1, "category_id": 4, "bbox": [1, 1, 2, 2]}, "category_id"),
])
def test_bad_pseudo_labels_are_errors(tmp_path, ann, field):
    path = _pseudo(tmp_path, [ann])
    with pytest.raises(DataError) as err:
        load_pseudo_dataset(path)
    assert str(path) in str(err.value) and field in str(err.value)


def test_validate_coco_does_not_modify_its_input(tmp_path):
    data = json.loads(COCO_JSON.read_text())
    data["annotations"][0]["bbox"] = [600, 10, 100, 10]
    del data["annotations"][1]["num_keypoints"]
    before = json.dumps(data)
    coco = validate_coco(data, COCO_JSON)
    assert json.dumps(data) == before and coco.boxes_clipped == 1


def test_crowdpose_style_dataset_evaluates_through_the_keypoint_task(tmp_path):
    from ddkit.types import Instances

    path = _coco(tmp_path, lambda d: [a.pop("num_keypoints") for a in d["annotations"]], images=True)
    crowd = ddkit.build("datasets", {"name": "coco", "annotations": str(path)})
    orig = ddkit.build("datasets", {"name": "coco", "annotations": str(COCO_JSON)})
    task = ddkit.build("tasks", "keypoints")
    scores = []
    for ds in (crowd, orig):
        preds = []
        for i in range(len(ds)):
            t = get_target(ds, i)
            kps = t["keypoints"].clone()
            kps[..., :2] += 3.0  # not perfect, so that AP says something
            kps[..., 2] = 1.0
            preds.append(Instances(t["boxes"], torch.ones(len(kps)), t["labels"], kps, t["size"]))
        scores.append(task.evaluate_predictions(preds, ds))
    assert scores[0] == scores[1] and 0.2 < scores[0]["AP"] < 1.0


def test_pseudo_keypoints_of_the_wrong_length_and_non_objects_are_errors(tmp_path):
    path = _pseudo(tmp_path, [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2],
                               "keypoints": [1, 1, 2] * 4}])
    data = json.loads(path.read_text())
    data["info"]["dataset_info"] = {"num_keypoints": 3, "flip_indices": [0, 2, 1]}
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"keypoints must be 9 finite numbers \(3 keypoints x 3\), got 12"):
        load_pseudo_dataset(path)
    for text in ("[1, 2]", '{"info": 3}'):
        path.write_text(text)
        with pytest.raises(DataError, match="not a pseudo-label file"):
            load_pseudo_dataset(path)


@pytest.mark.parametrize("mutate,text", [
    (lambda d: d["annotations"][0].__setitem__("bbox", [float("nan"), 1, 2, 3]), "non-finite"),
    (lambda d: d["images"][1].__setitem__("id", d["images"][0]["id"]), "is not unique"),
    (lambda d: d["images"][2].pop("file_name"), "missing field 'file_name'"),
    (lambda d: d["images"][2].__setitem__("file_name", "../../x.jpg"), "outside the image root"),
])
def test_label_coco_ground_truth_is_validated_like_training_data(tmp_path, mutate, text):
    from ddkit.engine.label import CocoSource

    path = _coco(tmp_path, mutate, images=True)
    with pytest.raises(DataError, match=text):
        CocoSource(path)


def test_label_coco_ground_truth_follows_the_box_rule(tmp_path, caplog):
    from ddkit.engine.label import CocoSource

    path = _coco(tmp_path, lambda d: d["annotations"][0].__setitem__("bbox", [5000, 5000, 10, 10]), images=True)
    with caplog.at_level(logging.WARNING):
        src = CocoSource(path)
    assert sum(len(v) for v in src.anns.values()) == 13 and "dropped 1" in caplog.text


@pytest.mark.parametrize("name", [None, "", "  ", 3])
def test_category_without_a_name_is_refused(tmp_path, name):
    def mutate(d):
        d["categories"][0].pop("name") if name is None else d["categories"][0].update(name=name)
    msg = _error(_coco(tmp_path, mutate))
    assert "categories[0] (id 1)" in msg and "'name'" in msg


@pytest.mark.parametrize("skeleton", [[[0, 1]], [[1, 18]], [[1, 2, 3]], [1, 2], "1-2", [[1.5, 2]]])
def test_skeleton_must_be_one_based_pairs_within_the_keypoints(tmp_path, skeleton):
    msg = _error(_coco(tmp_path, lambda d: d["categories"][0].update(skeleton=skeleton)))
    assert "categories[0] (id 1)" in msg and "'skeleton'" in msg and "1-based" in msg


def test_keypoint_categories_written_for_a_dataset_read_back_as_the_file_had_them():
    """``coco_categories`` (what pseudo-label files carry) gives back the COCO file's own keypoint names and
    1-based skeleton, so a keypoint pseudo-label file reads as a keypoint dataset; without names: keypoint_<i>."""
    from ddkit.engine.pseudo import coco_categories
    from ddkit.types import DatasetInfo

    ds = ddkit.build("datasets", {"name": "coco", "annotations": str(COCO_JSON)})
    want = [{k: c[k] for k in ("id", "name", "keypoints", "skeleton")}
            for c in json.loads(COCO_JSON.read_text())["categories"]]
    assert coco_categories(ds.info) == want
    bare = DatasetInfo(categories=[{"id": 3, "name": "hand"}], num_keypoints=2)
    assert coco_categories(bare) == [{"id": 3, "name": "hand", "keypoints": ["keypoint_0", "keypoint_1"],
                                      "skeleton": []}]
    boxes = DatasetInfo(categories=[{"id": 1, "name": "car", "supercategory": "vehicle"}])
    assert coco_categories(boxes) == [{"id": 1, "name": "car"}]


def test_evaluation_works_with_pycocotools_that_requires_info(monkeypatch):
    """pycocotools 2.0.10 (inside the supported range) reads ``dataset['info']`` in ``loadRes`` unconditionally;
    ground truth without an ``info`` key (ddkit's own, most hand-made files) must still evaluate."""
    from pycocotools.coco import COCO

    real = COCO.loadRes

    def load_res_2_0_10(self, res):
        self.dataset["info"]  # KeyError without it, as in 2.0.10
        return real(self, res)

    monkeypatch.setattr(COCO, "loadRes", load_res_2_0_10)
    gt = {"images": [{"id": 1, "height": 20, "width": 20}], "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 8, 8]}]}
    stats = coco_evaluate(gt, [{"image_id": 1, "category_id": 1, "bbox": [2, 2, 8, 8], "score": 0.9}])
    assert stats["AP"] == pytest.approx(1.0)


def test_a_ddkit_pseudo_label_file_finds_its_images_through_info_image_root(tmp_path):
    """A pseudo_labels.json lives in the run folder, its images elsewhere: read as a labeled COCO dataset without
    'images:', it uses the info.image_root it records (only ddkit's own files: another file's info is not trusted)."""
    from ddkit.engine.coco_file import PSEUDO_DESCRIPTION

    raw = json.loads(COCO_JSON.read_text())
    run = tmp_path / "run"
    run.mkdir()
    path = run / "pseudo_labels.json"
    raw["info"] = {"description": PSEUDO_DESCRIPTION, "image_root": str(COCO_JSON.parent)}
    path.write_text(json.dumps(raw))
    ds = ddkit.build("datasets", {"name": "coco", "annotations": str(path)})
    assert len(ds) == 4 and ds.skipped == [] and {f.parent for f in ds.files} == {COCO_JSON.parent}
    raw["info"]["description"] = "someone else's file"
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"pseudo_labels.json has no \(readable\) images; add 'images: DIR' to the "
                                        r"dataset block"):
        build_data({"train": {"dataset": {"name": "coco", "annotations": str(path)}}})


# ------------------------------------------------------------------------------------- keypoint values
def _set_kp(i: int, j: int, v) -> callable:
    def mutate(d):
        d["annotations"][i]["keypoints"][3 * j + 2] = v
    return mutate


@pytest.mark.parametrize("mutate,text", [
    (_set_kp(0, 3, 7), "field keypoints: visibility 7 of keypoint 3 must be 0 (not labelled), 1"),
    (_set_kp(0, 3, -1), "field keypoints: visibility -1 of keypoint 3"),
    (lambda d: d["annotations"][1].__setitem__("num_keypoints", 0), "field num_keypoints is 0 but"),
    (lambda d: d["annotations"][1].__setitem__("num_keypoints", d["annotations"][1]["num_keypoints"] + 1),
     "field num_keypoints is"),
])
def test_keypoint_visibility_and_num_keypoints_are_checked(tmp_path, mutate, text):
    """pycocotools skips a person with num_keypoints 0: a count that disagrees with v > 0 changes the AP."""
    raw = json.loads(COCO_JSON.read_text())
    i = 0 if "visibility" in text else 1
    msg = _error(_coco(tmp_path, mutate))
    assert f"annotation id {raw['annotations'][i]['id']} (annotations[{i}])" in msg and text in msg
    if "num_keypoints" in text:
        assert f"set num_keypoints to {raw['annotations'][1]['num_keypoints']}" in msg
    assert all(a["num_keypoints"] == sum(v > 0 for v in a["keypoints"][2::3]) for a in raw["annotations"])


def test_a_category_keypoint_list_of_the_wrong_length_is_blamed_not_the_annotations(tmp_path):
    def sixteen(d, skeleton: bool):
        d["categories"][0]["keypoints"] = d["categories"][0]["keypoints"][:16]
        if not skeleton:
            del d["categories"][0]["skeleton"]
    for skeleton in (False, True):
        msg = _error(_coco(tmp_path, lambda d: sixteen(d, skeleton)))
        assert "categories[0] (id 1): field 'keypoints' lists 16 names but every annotation of the category has 51 " \
               "values (17 keypoints x 3)" in msg
    # one annotation of another length is still that annotation's error
    msg = _error(_coco(tmp_path, lambda d: d["annotations"][2].__setitem__("keypoints", [0] * 48)))
    assert "annotations[2]" in msg and "field keypoints must be 51" in msg


def test_a_wrong_image_size_is_the_only_message(tmp_path, caplog):
    """A JSON width of 64 for a 640-wide file once warned 'dropped N instance(s)' (boxes clipped to the wrong
    width) before the real error; the box rule's warning now comes after the size check."""
    path = _coco(tmp_path, lambda d: d["images"][0].__setitem__("width", 64), images=True)
    with caplog.at_level(logging.WARNING), pytest.raises(DataError, match=r"width x height differ"):
        ddkit.build("datasets", {"name": "coco", "annotations": str(path)})
    assert "dropped" not in caplog.text and "clipped" not in caplog.text
    path = _coco(tmp_path, lambda d: d["annotations"][0].__setitem__("bbox", [-500, 10, 20, 20]), images=True)
    with caplog.at_level(logging.WARNING):
        ddkit.build("datasets", {"name": "coco", "annotations": str(path)})
    assert "dropped 1 instance(s)" in caplog.text


class _Items(torch.utils.data.Dataset):
    """A dataset of black 50x100 images: not the pseudo-label file's white one."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.zeros(3, 50, 100), {}


def _pseudo_from(tmp_path: Path, source: dict) -> Path:
    from PIL import Image

    Image.new("RGB", (100, 50), (255, 255, 255)).save(tmp_path / "a.png")
    path = _pseudo(tmp_path, [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "score": 0.9}])
    data = json.loads(path.read_text())
    data["info"]["source"] = source
    path.write_text(json.dumps(data))
    return path


def test_pseudo_labels_of_a_folder_read_its_files_not_the_unlabeled_part(tmp_path):
    # label.images labelled a folder: ddkit_index is a position in that folder, so a recipe's unlabeled part given as
    # source (ddkit run, ddkit train --stage student) must not be read at that position
    path = _pseudo_from(tmp_path, {"kind": "folder", "root": str(tmp_path), "num_images": 1})
    ds = load_pseudo_dataset(path, source=_Items(4))
    assert ds.load_image(0).float().mean() > 0.5  # the white file, not the black dataset item


def test_pseudo_labels_of_a_dataset_read_it_and_refuse_another_split(tmp_path):
    path = _pseudo_from(tmp_path, {"kind": "dataset", "name": "unlabeled", "num_images": 1})
    assert load_pseudo_dataset(path, source=_Items(1)).load_image(0).float().mean() == 0
    with pytest.raises(DataError, match="made from 1 unlabeled images, but this data's unlabeled part holds 3"):
        load_pseudo_dataset(path, source=_Items(3))
