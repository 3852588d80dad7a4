"""A recipe's detection / keypoint test and unlabeled parts take the train part's class ids by class name, as
``ddkit eval`` does: a test COCO file numbering the same classes otherwise (0-based, another tool's export) scores
the model against its own classes, and a class the training lacks is one error line before any file is written."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from ddkit.cli import main
from ddkit.engine.data import build_data, get_target
from ddkit.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CATS = [{"id": 5, "name": "square"}, {"id": 17, "name": "circle"}, {"id": 90, "name": "triangle"}]
MODEL = {"name": "fasterrcnn", "backbone": "tiny", "min_size": 64, "max_size": 64,
         "anchor_sizes": [16, 32, 64, 128, 256], "representation_size": 32, "box_batch_size_per_image": 16,
         "rpn_post_nms_top_n_test": 50, "score_thresh": 0.0, "detections_per_img": 50}


def _shapes(root: Path, n: int = 6) -> dict:
    """``root/img_k.png``: big coloured shapes (an untrained detector's boxes overlap them: AP above 0) and their
    COCO records under the category ids 5 / 17 / 90."""
    from PIL import Image, ImageDraw

    rng = random.Random(0)
    root.mkdir(parents=True)
    images, anns = [], []
    for k in range(n):
        im = Image.new("RGB", (64, 64), (40, 40, 40))
        draw = ImageDraw.Draw(im)
        for _ in range(2):
            cat, s = rng.choice(CATS)["id"], rng.randint(24, 40)
            x, y = rng.randint(0, 64 - s), rng.randint(0, 64 - s)
            draw.rectangle([x, y, x + s, y + s], fill={5: (255, 0, 0), 17: (0, 255, 0), 90: (0, 0, 255)}[cat])
            anns.append({"id": len(anns) + 1, "image_id": 100 + k, "category_id": cat, "bbox": [x, y, s, s],
                         "area": s * s, "iscrowd": 0})
        im.save(root / f"img_{k}.png")
        images.append({"id": 100 + k, "file_name": f"img_{k}.png", "width": 64, "height": 64})
    return {"images": images, "annotations": anns, "categories": CATS}


def _renumbered(coco: dict, ids: dict[str, int], path: Path) -> Path:
    """``coco`` with its categories under ``ids`` (by name), listed in another order; the annotations of those."""
    old = {int(c["id"]): c["name"] for c in coco["categories"]}
    out = {**coco, "categories": sorted(({"id": i, "name": n} for n, i in ids.items()), key=lambda c: c["name"]),
           "annotations": [{**a, "category_id": ids[old[int(a["category_id"])]]} for a in coco["annotations"]
                           if old[int(a["category_id"])] in ids]}
    path.write_text(json.dumps(out))
    return path


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    coco = _shapes(root / "images")
    (root / "train.json").write_text(json.dumps(coco))
    _renumbered(coco, {"square": 0, "circle": 1, "triangle": 2}, root / "test0.json")
    _renumbered(coco, {"circle": 3, "square": 1}, root / "some.json")  # no triangle: a subset
    listed = _renumbered(coco, {"square": 0, "circle": 1, "triangle": 2, "hexagon": 3}, root / "listed.json")
    other = json.loads(listed.read_text())  # the triangles annotated as hexagons, a class the training lacks
    other["annotations"] = [{**a, "category_id": 3 if a["category_id"] == 2 else a["category_id"]}
                            for a in other["annotations"]]
    (root / "other.json").write_text(json.dumps(other))
    return root


def _data(root: Path, test: str, unlabeled: str | None = None) -> dict:
    part = {"dataset": {"name": "coco", "annotations": str(root / "train.json"), "images": str(root / "images")}}
    out = {"train": part, "test": {"dataset": {**part["dataset"], "annotations": str(root / test)}}}
    if unlabeled:
        out["unlabeled"] = {"dataset": {**part["dataset"], "annotations": str(root / unlabeled)}}
    return out


def test_a_test_coco_file_of_other_ids_takes_the_train_parts_ids_by_name(shapes):
    splits = build_data(_data(shapes, "test0.json", unlabeled="some.json"))
    train = splits.labeled
    for part in (splits.test, splits.unlabeled.ground_truth):
        assert part.info.categories == splits.info.categories
        for i in range(len(part)):  # the same images: the same labels, in the train part's ids
            assert get_target(part, i)["labels"].tolist() == [
                c for c in get_target(train, i)["labels"].tolist() if part is splits.test or c != 90]
            assert part[i][1]["labels"].tolist() == get_target(part, i)["labels"].tolist()
    assert "labels" not in get_target(splits.unlabeled, 0)  # still hidden from training


def test_a_test_part_with_a_class_the_training_lacks_is_one_line(shapes, tmp_path, capsys):
    with pytest.raises(ConfigError) as err:
        build_data(_data(shapes, "other.json"))
    message = str(err.value)
    assert "\n" not in message and message.startswith("data.test.dataset (")
    assert str(shapes / "other.json") in message and str(shapes / "train.json") in message
    assert "'hexagon' not among" in message and "is its id 3" in message and "(square, circle, triangle)" in message
    assert "give it only classes the training data has" in message
    recipe = tmp_path / "r.yaml"
    recipe.write_text(_recipe(shapes, "other.json", tmp_path / "out"))
    assert main(["train", str(recipe), "--stage", "teacher", "--no-progress"]) == 2
    assert "'hexagon', is its id 3" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before the run folder is made


def test_a_class_a_test_file_lists_but_never_annotates_is_left_out(shapes):
    """A file listing more categories than it uses (COCO's 80 with only people annotated) is fine."""
    splits = build_data(_data(shapes, "listed.json"))
    assert splits.test.info.categories == splits.info.categories
    for i in range(len(splits.test)):
        assert get_target(splits.test, i)["labels"].tolist() == get_target(splits.labeled, i)["labels"].tolist()


def test_a_yolo_train_part_and_a_coco_test_file_match_by_name():
    """coco8 (YOLO ids, person = 0) with the COCO file's person (id 1, which is coco8's 'bicycle')."""
    coco8 = {"dataset": {"name": "yolo", "root": str(DATA / "coco8"), "split": "val"}}
    test = {"dataset": {"name": "coco", "annotations": str(DATA / "coco-val2017-mini" / "test_coco.json"),
                        "keypoints": False}}
    splits = build_data({"train": coco8, "test": test})
    person = next(int(c["id"]) for c in splits.info.categories if c["name"] == "person")
    assert person != 1
    assert {c for i in range(len(splits.test)) for c in get_target(splits.test, i)["labels"].tolist()} == {person}


def _recipe(root: Path, test: str, out: Path) -> str:
    data = json.dumps(_data(root, test))
    return (f"run: {{name: cls, seed: 0, out_dir: {json.dumps(str(out))}, device: cpu}}\n"
            f"task: {{name: detection}}\ndata: {data}\n"
            f"teacher:\n  model: {json.dumps(MODEL)}\n"
            "  train: {iterations: 30, batch_size: 2, lr: 0.01, clip_grad_norm: 5, log_every: 30}\n")


def test_training_time_ap_of_a_renumbered_test_file_is_evals_and_the_same_ids_ap(shapes, tmp_path, capsys):
    """One model (the same seed), the same test images under the train ids and under 0 / 1 / 2: the trainer's AP is
    the same for both, and ``ddkit eval`` of the stage folder scores it the same."""
    metrics = {}
    for test in ("train.json", "test0.json"):
        recipe = tmp_path / f"{test}.yaml"
        recipe.write_text(_recipe(shapes, test, tmp_path / test))
        assert main(["train", str(recipe), "--stage", "teacher", "--no-progress"]) == 0
        metrics[test] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["metrics"]
    assert metrics["train.json"]["AP50"] > 0  # else equal metrics would prove nothing
    assert metrics["test0.json"] == metrics["train.json"]
    assert main(["eval", str(tmp_path / "test0.json" / "teacher"), "-o", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["metrics"] == metrics["test0.json"]


def test_a_keypoint_test_file_of_other_ids_keeps_its_keypoints_under_the_train_ids(tmp_path):
    mini = DATA / "coco-val2017-mini"
    coco = json.loads((mini / "test_coco.json").read_text())
    coco["categories"] = [{**c, "id": 7} for c in coco["categories"]]
    coco["annotations"] = [{**a, "category_id": 7} for a in coco["annotations"]]
    (tmp_path / "seven.json").write_text(json.dumps(coco))
    part = {"dataset": {"name": "coco", "annotations": str(mini / "test_coco.json")}}
    seven = {"name": "coco", "annotations": str(tmp_path / "seven.json"), "images": str(mini)}
    splits = build_data({"train": part, "test": {"dataset": seven}})
    assert splits.test.info.categories == splits.info.categories
    assert splits.test.info.keypoint_sigmas == splits.info.keypoint_sigmas and splits.test.info.num_keypoints == 17
    for i in range(len(splits.test)):
        ours, theirs = get_target(splits.labeled, i), get_target(splits.test, i)
        assert set(theirs["labels"].tolist()) <= {1} and theirs["labels"].tolist() == ours["labels"].tolist()
        assert theirs["keypoints"].equal(ours["keypoints"])


MINI = DATA / "coco-val2017-mini"


def reversed_keypoints(path: Path, drop_last: bool = False) -> Path:
    """coco-val2017-mini's people with their 17 keypoints listed (and annotated) in reverse order (``drop_last``:
    the last one left out, 16 keypoints): the same poses in another tool's keypoint order."""
    coco = json.loads((MINI / "test_coco.json").read_text())
    n = 16 if drop_last else 17
    for cat in coco["categories"]:
        cat["keypoints"] = cat["keypoints"][::-1][:n]
        cat.pop("skeleton", None)
    for ann in coco["annotations"]:
        kps = ann["keypoints"]
        ann["keypoints"] = [v for j in reversed(range(17)) for v in kps[3 * j:3 * j + 3]][:3 * n]
        ann["num_keypoints"] = sum(v > 0 for v in ann["keypoints"][2::3])
    path.write_text(json.dumps(coco))
    return path


@pytest.mark.parametrize("drop_last, said", [
    (False, "keypoint 0 is 'right_ankle', in data.train.dataset ({train}) it is 'nose'"),
    (True, "16 keypoints per instance, data.train.dataset ({train}) has 17")])
def test_a_keypoint_test_or_unlabeled_file_in_another_keypoint_order_is_refused(tmp_path, drop_last, said):
    """Keypoints are scored index by index: a test file listing them in another order (or another number of them)
    would compare the model's nose with its right ankle; one error line, before any file is written."""
    other = reversed_keypoints(tmp_path / "other.json", drop_last)
    train = {"dataset": {"name": "coco", "annotations": str(MINI / "test_coco.json")}}
    for key in ("test", "unlabeled"):
        part = {"dataset": {"name": "coco", "annotations": str(other), "images": str(MINI)}}
        with pytest.raises(ConfigError) as err:
            build_data({"train": train, key: part})
        msg = str(err.value)
        assert msg.startswith(f"data.{key}.dataset ({other}): ") and "\n" not in msg
        assert said.format(train=MINI / "test_coco.json") in msg and "export it with the train file's keypoints" in msg
    assert build_data({"train": train, "test": train}).test.info.num_keypoints == 17  # the train order: fine
    pose = {"dataset": {"name": "yolo", "root": str(DATA / "coco8-pose"), "split": "val"}}  # unnamed: a count
    part = {"dataset": {"name": "coco", "annotations": str(other), "images": str(MINI)}}
    if drop_last:
        with pytest.raises(ConfigError, match="16 keypoints per instance"):
            build_data({"train": pose, "test": part})
    else:
        assert build_data({"train": pose, "test": part}).test.info.num_keypoints == 17
