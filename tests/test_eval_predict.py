"""``ddkit eval`` and ``ddkit predict`` on tiny models: the printed / written metrics are the task's own, the TTA
ensemble is the labelling engine's (checked against a hand-computed mean of the views), predictions are written
as COCO results or YOLO txt lines that map back to the model's own boxes."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import ddkit
from ddkit import ConfigError, DataError
from ddkit.cli import main
from ddkit.config import load_config
from ddkit.engine.checkpoint import load_model, save_model
from ddkit.engine.data import build_data, read_image
from ddkit.engine.evaluate import evaluate_dataset
from ddkit.engine.label import adapt_image
from ddkit.engine.run import run_recipe
from ddkit.types import Instances

pytestmark = pytest.mark.usefixtures("one_thread")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY = {"backbone": "tiny", "min_size": 64, "max_size": 64, "anchor_sizes": [16, 32, 64, 128, 256],
        "representation_size": 32, "box_batch_size_per_image": 16, "rpn_post_nms_top_n_test": 50,
        "score_thresh": 0.0, "detections_per_img": 5}

RECIPE = """
run: {{name: tiny, out_dir: "{out}", seed: 0, device: cpu}}
task: {{name: classification}}
data:
  dataset: {{name: digits}}
  split: {{labeled: 0.2, unlabeled: 0.3, test: 0.2, seed: 0}}
teacher:
  model: {{name: mlp, hidden: [16]}}
  train: {{iterations: 30, batch_size: 32, lr: 0.1, log_every: 30}}
label:
  transforms: [{{name: identity}}, {{name: translate, shifts: [[1, 0]]}}]
  aggregator: {{name: prob_mean}}
  selector: {{name: count_match}}
  batch_size: 64
student:
  model: {{name: mlp, hidden: [16]}}
  train: {{iterations: 30, batch_size: 32, lr: 0.1, ratio: [6, 4], log_every: 30}}
"""


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("eval_run")
    recipe = tmp / "tiny.yaml"
    recipe.write_text(RECIPE.format(out=tmp / "out"))
    return recipe, Path(run_recipe(load_config(recipe), source=str(recipe), progress=False)["run_dir"])


def _yolo(root: str, split: str = "val"):
    return ddkit.build("datasets", {"name": "yolo", "root": str(DATA / root), "split": split})


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> Path:
    """An untrained tiny Faster R-CNN for coco8's 80 classes (score threshold 0: it always predicts boxes)."""
    torch.manual_seed(0)
    model = ddkit.build("tasks", "detection").build_model({"name": "fasterrcnn", **TINY}, _yolo("coco8").info)
    return save_model(model, tmp_path_factory.mktemp("det") / "model.pt")


# --------------------------------------------------------------------------------------------------------- eval
def test_eval_run_writes_the_final_students_task_metrics(digits_run, capsys):
    recipe, run = digits_run
    assert main(["eval", str(run)]) == 0
    printed = capsys.readouterr().out
    assert "the data distillation student" in printed and "| 1 view |" in printed
    record = json.loads((run / "eval.json").read_text())
    task, model, _ = load_model(run / "student" / "model.pt")
    test = build_data(load_config(recipe).data).test
    assert record["metrics"] == pytest.approx(task.evaluate(model, test))
    assert record["items"] == len(test) and record["tta"] is None
    # one row per class, from the same predictions: the share of each class's test items predicted right
    said = torch.stack(task.predict(model, [test[i][0] for i in range(len(test))])).argmax(1)
    truth = torch.tensor([test[i][1]["label"] for i in range(len(test))])
    assert [r["id"] for r in record["per_class"]] == list(range(10)) and "per class, 1 view (10 of the 10" in printed
    for r in record["per_class"]:
        assert r["instances"] == int((truth == r["id"]).sum())
        assert r["accuracy"] == pytest.approx(float((said[truth == r["id"]] == r["id"]).float().mean()))
    assert main(["eval", str(run), "--checkpoint", str(run / "teacher")]) == 0  # another model: its own folder
    assert json.loads((run / "teacher" / "eval.json").read_text())["model"] == str(run / "teacher" / "model.pt")


def test_eval_on_other_data_keeps_the_recipe_splits_eval_json(digits_run, tmp_path, capsys):
    """``eval.json`` is the recipe's test split's; ``--data`` writes ``eval_<stem>[_<split>].json`` beside it and
    ``--split labeled`` ``eval_labeled.json``, for a run and a stage folder: no evaluation replaces another's."""
    _, run = digits_run
    for model, folder in ((run, run), (run / "teacher", run / "teacher")):
        assert main(["eval", str(model)]) == 0
        assert f"wrote {folder / 'eval.json'}" in capsys.readouterr().out
        first = (folder / "eval.json").read_text()
        assert main(["eval", str(model), "--data", "{name: digits}"]) == 0
        assert f"wrote {folder / 'eval_digits.json'}" in capsys.readouterr().out
        assert main(["eval", str(model), "--split", "labeled"]) == 0
        assert (folder / "eval.json").read_text() == first
        test, other, labeled = (json.loads((folder / f).read_text())
                                for f in ("eval.json", "eval_digits.json", "eval_labeled.json"))
        assert other["items"] == len(ddkit.build("datasets", {"name": "digits"})) != test["items"]
        assert "split test" in test["data"] and "split labeled" in labeled["data"] and "digits" in other["data"]
        # other data of the same stem gets its own file, named by a digest of its description; again: replaced
        for _ in range(2):
            assert main(["eval", str(model), "--data", "{name: digits, test_fraction: 0.5}"]) == 0
            wrote = capsys.readouterr().out.split("wrote ")[-1].strip()
            assert re.fullmatch(r"eval_digits-[0-9a-f]{8}\.json", Path(wrote).name) and Path(wrote).parent == folder
        assert json.loads((folder / "eval_digits.json").read_text()) == other
        assert "test_fraction" in json.loads(Path(wrote).read_text())["data"]
    # the name: the file's stem or the folder's name, with a YOLO split; odd characters made safe
    from argparse import Namespace

    from ddkit.commands.eval import output_name

    (tmp_path / "coco8-pose.yaml").write_text("path: .\nval: images\nnames: {0: a}\n")
    (tmp_path / "my data (v2).json").write_text("{}")
    (tmp_path / "yolo set" / "labels").mkdir(parents=True)
    named = {spec: output_name(Namespace(data=spec, split=split)) for spec, split in (
        (str(tmp_path / "coco8-pose.yaml"), None), (str(tmp_path / "my data (v2).json"), None),
        (f"{tmp_path / 'yolo set'}/", "train"), (f"{{name: coco, annotations: {tmp_path / 'a.json'}}}", None))}
    assert list(named.values()) == ["eval_coco8-pose_val.json", "eval_my-data-v2.json", "eval_yolo-set_train.json",
                                    "eval_a.json"]
    assert output_name(Namespace(data=None, split=None)) == output_name(Namespace(data=None, split="test")) \
        == "eval.json"


def test_eval_tta_is_the_mean_of_the_views_probabilities(digits_run, tmp_path):
    recipe, run = digits_run
    out = tmp_path / "e.json"
    assert main(["eval", str(recipe), "--checkpoint", str(run / "teacher"), "--split", "labeled", "--tta",
                 "--transforms", "[{name: identity}, {name: hflip}]", "-o", str(out)]) == 0
    record = json.loads(out.read_text())
    task, model, _ = load_model(run / "teacher" / "model.pt")
    labeled = build_data(load_config(recipe).data).labeled
    images = [labeled[i][0] for i in range(len(labeled))]
    labels = torch.tensor([labeled[i][1]["label"] for i in range(len(labeled))])
    plain = torch.stack(task.predict(model, images))
    mirrored = torch.stack(task.predict(model, [x.flip(-1) for x in images]))
    assert record["metrics"]["accuracy"] == pytest.approx(float((plain.argmax(1) == labels).float().mean()))
    tta = float((((plain + mirrored) / 2).argmax(1) == labels).float().mean())
    assert record["tta"]["metrics"]["accuracy"] == pytest.approx(tta)
    assert [v["name"] for v in record["tta"]["views"]] == ["identity", "hflip"]
    # the ensemble is batched as the run's TTA stages batch it (label.batch_size), the single view as its stage
    assert record["tta"]["batch_size"] == load_config(recipe).label.batch_size == 64 != record["batch_size"]
    assert main(["eval", str(recipe), "-o", str(out)]) == 0  # a recipe alone: its run folder's final student
    assert json.loads(out.read_text())["model"] == str(run / "student" / "model.pt")


def test_eval_tta_views_default_to_the_recipes(digits_run, tmp_path, capsys):
    _, run = digits_run
    assert main(["eval", str(run), "--tta", "-o", str(tmp_path / "e.json")]) == 0
    assert "TTA (2 views: identity, translate" in capsys.readouterr().out


def test_eval_a_checkpoint_on_a_yolo_folder(detector, tmp_path):
    out = tmp_path / "e.json"
    assert main(["eval", str(detector), "--data", str(DATA / "coco8"), "--split", "val", "-o", str(out)]) == 0
    record = json.loads(out.read_text())
    task, model, _ = load_model(detector)
    assert record["metrics"] == pytest.approx(task.evaluate(model, _yolo("coco8")), nan_ok=True)
    assert set(record["metrics"]) >= {"AP", "AP50"} and record["items"] == 4
    # per class: coco8 val's classes with boxes get an AP, the other classes null (no ground truth), as JSON allows
    with_boxes = [r for r in record["per_class"] if r["instances"]]
    assert len(record["per_class"]) == 80 and sum(r["instances"] for r in with_boxes) == \
        sum(len(_yolo("coco8")[i][1]["boxes"]) for i in range(4))
    assert all(0 <= r["AP"] <= 1 for r in with_boxes)
    assert all(r["AP"] is None for r in record["per_class"] if not r["instances"])
    assert "NaN" not in out.read_text()


DET_RECIPE = """
run: {{name: det, out_dir: "{out}", seed: 0, device: cpu}}
task: {{name: detection}}
data:
  train: {{dataset: {{name: yolo, root: "{data}/coco8", split: val}}}}
  test: {{dataset: {{name: yolo, root: "{data}/coco8", split: val}}}}
teacher:
  model: {model}
  train: {train}
"""


def _det_run(tmp_path: Path, name: str, train: str, extra: str = "") -> Path:
    model = json.dumps({"name": "fasterrcnn", **TINY, "max_size": 96, "detections_per_img": 50})
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(DET_RECIPE.format(out=tmp_path / name, data=DATA, model=model, train=train) + extra)
    assert main(["run", str(recipe), "--no-progress"]) == 0
    return tmp_path / name


def test_eval_of_a_ddkit_train_folder_uses_the_recipe_it_saved(digits_run, tmp_path, capsys):
    """A `ddkit train` folder holds its recipe (config.yaml) and model: its test split is evaluated, to the
    metrics the training reported."""
    recipe, _ = digits_run
    assert main(["train", str(recipe), "--stage", "teacher", f"run.out_dir={tmp_path}", "--no-progress"]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", str(tmp_path / "teacher"), "-o", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["metrics"] == trained["metrics"]


def test_eval_of_a_stage_uses_the_batch_size_the_run_evaluated_it_with(tmp_path, capsys):
    """A detector's AP depends on the batch (coco8's images differ in size and are padded to one): ``ddkit eval``
    of a stage folder, and a ``teacher.checkpoint`` teacher, reproduce the run's own metrics exactly."""
    # a schedule that learns something on AVX2 and AVX-512 CPUs alike (lr 0.02 without clipping diverged on one)
    run = _det_run(tmp_path, "trained", "{iterations: 80, batch_size: 1, lr: 0.01, clip_grad_norm: 5, log_every: 40}")
    reported = json.loads((run / "teacher" / "stage.json").read_text())["result"]["metrics"]
    assert reported["AP50"] > 0  # else equal metrics below would prove nothing
    assert main(["eval", str(run / "teacher"), "-o", str(tmp_path / "a.json")]) == 0
    record = json.loads((tmp_path / "a.json").read_text())
    assert record["metrics"] == reported and record["batch_size"] == 1
    assert main(["eval", str(run / "teacher"), "--batch-size", "4", "-o", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["metrics"] != reported  # batching matters here
    given = tmp_path / "given.pt"
    shutil.copy(run / "teacher" / "model.pt", given)
    again = _det_run(tmp_path, "given", "{iterations: 1, batch_size: 4, eval_batch_size: 1}",
                     f"  checkpoint: {given}\n")
    assert json.loads((again / "teacher" / "stage.json").read_text())["result"]["metrics"] == reported
    assert main(["eval", str(again / "teacher"), "-o", str(tmp_path / "c.json")]) == 0
    assert json.loads((tmp_path / "c.json").read_text())["metrics"] == reported


def test_eval_refuses_a_dataset_of_no_readable_image(detector, tmp_path, capsys):
    """A COCO file whose images lie elsewhere is one error line (exit 2, nothing written), not a table of zeros;
    the images root its fix text names is then taken."""
    ann = tmp_path / "elsewhere" / "test.json"
    ann.parent.mkdir()
    coco = json.loads((DATA / "coco-val2017-mini" / "test_coco.json").read_text())
    for record in coco["annotations"] + coco["categories"]:  # boxes only: the detector predicts no keypoints
        record.pop("keypoints", None), record.pop("num_keypoints", None), record.pop("skeleton", None)
    ann.write_text(json.dumps(coco))
    out = tmp_path / "eval.json"
    assert main(["eval", str(detector), "--data", str(ann), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--data {ann}: 0 items to evaluate" in err and f"under the JSON's folder ({ann.parent})" in err
    assert "images: DIR}" in err and not out.exists()
    block = f"{{name: coco, annotations: {ann}, images: {DATA / 'coco-val2017-mini'}}}"
    assert main(["eval", str(detector), "--data", block, "-o", str(out)]) == 0
    assert json.loads(out.read_text())["items"] == 4


def test_eval_refuses_a_dataset_of_other_classes(digits_run, tmp_path, capsys):
    _, run = digits_run
    with pytest.raises(ConfigError, match="categories .* are not the model's"):
        from ddkit.commands.eval import run as eval_run
        from ddkit.cli import build_parser

        eval_run(build_parser().parse_args(["eval", str(run), "--data", str(DATA / "coco8")]))
    alone = tmp_path / "model.pt"  # a checkpoint outside any run folder has no data
    alone.write_bytes((run / "student" / "model.pt").read_bytes())
    assert main(["eval", str(alone), "--split", "test"]) == 2
    assert "pass --data" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------ predict
def test_predict_coco_results_are_the_models_own(detector, tmp_path):
    images = DATA / "coco8" / "images" / "val"
    assert main(["predict", str(detector), str(images), "-o", str(tmp_path / "p")]) == 0
    results = json.loads((tmp_path / "p" / "predictions.json").read_text())
    index = json.loads((tmp_path / "p" / "images.json").read_text())
    assert [im["file_name"] for im in index["images"]] == sorted(p.name for p in images.glob("*.jpg"))
    assert "info" in index  # pycocotools 2.0.10's loadRes needs it
    task, model, _ = load_model(detector)
    for im in index["images"]:
        inst = task.predict(model, [read_image(images / im["file_name"])])[0]
        mine = [r for r in results if r["image_id"] == im["id"]]
        assert len(mine) == len(inst) > 0
        xywh = torch.tensor([r["bbox"] for r in mine])
        assert torch.allclose(xywh[:, :2], inst.boxes[:, :2].double().float(), atol=1e-3)
        assert [r["category_id"] for r in mine] == inst.labels.tolist()


def test_predict_yolo_pose_lines_map_back_to_the_boxes(tmp_path):
    torch.manual_seed(0)
    info = _yolo("coco8-pose").info
    model = ddkit.build("tasks", "keypoints").build_model({"name": "keypointrcnn", **TINY, "keypoint_head": [8]},
                                                         info)
    ckpt = save_model(model, tmp_path / "pose.pt")
    images = DATA / "coco8-pose" / "images" / "val"
    assert main(["predict", str(ckpt), str(images), "--format", "yolo", "-o", str(tmp_path / "p")]) == 0
    import yaml

    data = yaml.safe_load((tmp_path / "p" / "data.yaml").read_text())
    assert data["kpt_shape"] == [17, 3] and data["flip_idx"] == info.flip_indices
    task, model, _ = load_model(ckpt)
    for path in sorted(images.glob("*.jpg")):
        image = read_image(path)
        h, w = image.shape[-2:]
        inst = task.predict(model, [image])[0]
        rows = [list(map(float, line.split())) for line in
                (tmp_path / "p" / "labels" / f"{path.stem}.txt").read_text().splitlines()]
        assert len(rows) == len(inst) > 0 and all(len(r) == 1 + 4 + 17 * 3 + 1 for r in rows)
        got = torch.tensor([r[1:5] for r in rows])
        x1 = (got[:, 0] - got[:, 2] / 2) * w
        assert torch.allclose(x1, inst.boxes[:, 0], atol=1e-2)
        assert torch.allclose(torch.tensor([r[-1] for r in rows]), inst.scores, atol=1e-5)


def test_predict_tta_of_a_classifier_is_the_labelling_ensemble(digits_run, tmp_path):
    _, run = digits_run
    images = DATA / "coco8" / "images" / "val"
    assert main(["predict", str(run), str(images), "--tta", "--transforms", "[{name: identity}, {name: hflip}]",
                 "-o", str(tmp_path / "p")]) == 0
    results = json.loads((tmp_path / "p" / "predictions.json").read_text())
    task, model, info = load_model(run / "student" / "model.pt")  # the run's final student
    for r in results:
        x = adapt_image(read_image(images / r["file_name"]), info.extra["image_shape"])
        mean = (task.predict(model, [x])[0] + task.predict(model, [x.flip(-1)])[0]) / 2
        assert r["category_id"] == int(mean.argmax()) and r["score"] == pytest.approx(float(mean.max()), abs=1e-5)
    assert main(["predict", str(run), str(images), "--format", "yolo", "-o", str(tmp_path / "q")]) == 2


def test_predict_one_image_file(detector, tmp_path, capsys):
    """IMAGES may be one image file (as ``yolo predict source=img.jpg``): image id 0, file name its name."""
    image = DATA / "coco8" / "images" / "val" / "000000000042.jpg"
    assert main(["predict", str(detector), str(image), "-o", str(tmp_path / "p")]) == 0
    index = json.loads((tmp_path / "p" / "images.json").read_text())
    task, model, _ = load_model(detector)
    x = read_image(image)
    assert index["images"] == [{"id": 0, "file_name": image.name, "height": x.shape[-2], "width": x.shape[-1]}]
    inst = task.predict(model, [x])[0]
    results = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert len(results) == len(inst) > 0 and {r["image_id"] for r in results} == {0}
    assert torch.allclose(torch.tensor([r["bbox"][:2] for r in results]), inst.boxes[:, :2], atol=1e-3)
    assert main(["predict", str(detector), str(image), "--format", "yolo", "-o", str(tmp_path / "y")]) == 0
    assert len((tmp_path / "y" / "labels" / "000000000042.txt").read_text().splitlines()) == len(inst)
    capsys.readouterr()
    assert main(["predict", str(detector), str(DATA / "coco8" / "coco8.yaml"), "-o", str(tmp_path / "q")]) == 2
    assert "neither an image file" in capsys.readouterr().err


def test_predict_save_images_draws_each_images_predictions(detector, digits_run, tmp_path, caplog):
    """``--save-images`` (Ultralytics' ``save=True``): OUT/images/<name>.jpg at the image's own size, in its
    EXIF-rotated frame, with each box drawn in its class colour; a classifier's label framed; same-named images get
    their own files."""
    from PIL import Image

    from ddkit.engine.draw import category_colors

    def decode(path: Path) -> torch.Tensor:
        return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)

    images = tmp_path / "in"
    (images / "cam2").mkdir(parents=True)
    shutil.copy(DATA / "coco8" / "images" / "val" / "000000000042.jpg", images / "frame.jpg")
    Image.open(DATA / "coco8" / "images" / "val" / "000000000036.jpg").save(images / "cam2" / "frame.png")
    shutil.copy(DATA / "coco8" / "images" / "val" / "000000000061.jpg", images / "cam2" / "frame.jpg")
    with caplog.at_level("WARNING"):
        assert main(["predict", str(detector), str(images), "--save-images", "-o", str(tmp_path / "p")]) == 0
    out = tmp_path / "p" / "images"
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.jpg")) == \
        ["cam2/frame.jpg", "cam2/frame_1.jpg", "frame.jpg"]
    assert "1 drawn image(s) named after the image id" in caplog.text
    index = json.loads((tmp_path / "p" / "images.json").read_text())
    results = json.loads((tmp_path / "p" / "predictions.json").read_text())
    _, _, info = load_model(detector)
    colors = category_colors(sorted(int(c["id"]) for c in info.categories))
    for im in index["images"]:
        stem = str(Path(im["file_name"]).with_suffix(""))
        drawn = decode(out / f"{stem}{'_1' if im['file_name'].endswith('.png') else ''}.jpg")
        assert tuple(drawn.shape) == (3, im["height"], im["width"])
        top = max((r for r in results if r["image_id"] == im["id"]), key=lambda r: r["score"])
        x, y, w, h = (int(round(v)) for v in top["bbox"])
        if w > 8 and h > 8 and y > 0:
            want = torch.tensor([int(colors[top["category_id"]][i:i + 2], 16) for i in (1, 3, 5)]).float()
            on_edge = drawn[:, y, x + 2:x + w - 2].float().mean(1)  # the box's top line, in its class colour
            assert float((on_edge - want).abs().max()) < 60, (im["file_name"], on_edge, want)
    _, run = digits_run
    assert main(["predict", str(run), str(images / "frame.jpg"), "--save-images", "-o", str(tmp_path / "c")]) == 0
    framed = decode(tmp_path / "c" / "images" / "frame.jpg")
    row = json.loads((tmp_path / "c" / "predictions.json").read_text())[0]
    label = row["category_id"]
    names = {int(c["id"]): str(c["name"]) for c in load_model(run / "student" / "model.pt")[2].categories}
    assert row["category_name"] == names[label]  # the class by name, not only its id
    # a 32 x 32 picture is drawn enlarged (x 8), so that its label covers a strip of it, not half
    small = tmp_path / "small"
    small.mkdir()
    Image.open(DATA / "coco8" / "images" / "val" / "000000000042.jpg").resize((32, 32)).save(small / "s.png")
    assert main(["predict", str(run), str(small), "--save-images", "-o", str(tmp_path / "d")]) == 0
    assert tuple(decode(tmp_path / "d" / "images" / "s.jpg").shape) == (3, 256, 256)
    want = torch.tensor([int(category_colors(list(range(10)))[label][i:i + 2], 16) for i in (1, 3, 5)]).float()
    assert float((framed[:, -1, 20:-20].float().mean(1) - want).abs().max()) < 60  # the frame's bottom edge


def test_predict_into_a_folder_of_an_earlier_prediction_says_which_files_are_not_its_own(detector, tmp_path, capsys):
    """A second prediction into the same -o leaves the first one's drawings / label files of other images (they are
    not deleted) and says so; predicting the same images again rewrites them and says nothing."""
    val = DATA / "coco8" / "images" / "val"
    out = tmp_path / "p"
    for fmt in ("coco", "yolo"):
        assert main(["predict", str(detector), str(val), "--format", fmt, "--save-images", "-o", str(out)]) == 0
        assert "earlier prediction" not in capsys.readouterr().out
    assert main(["predict", str(detector), str(val / "000000000042.jpg"), "--format", "yolo", "-o", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"{out / 'labels'} holds 3 file(s) of an earlier prediction" in said
    assert f"{out / 'images'} holds 4 file(s) of an earlier prediction" in said
    assert len(list((out / "labels").glob("*.txt"))) == 4  # nothing deleted


def test_predict_refuses_when_no_image_is_readable_and_an_output_that_is_a_file(detector, tmp_path, capsys):
    """Nothing readable is an error, not an empty (successful-looking) result; ``-o`` names a folder."""
    corrupt = tmp_path / "bad.jpg"
    corrupt.write_bytes(b"not a jpeg")
    assert main(["predict", str(detector), str(corrupt), "-o", str(tmp_path / "p")]) == 2
    assert "none of the 1 image(s) could be read" in capsys.readouterr().err
    assert not (tmp_path / "p" / "predictions.json").exists()
    image = DATA / "coco8" / "images" / "val" / "000000000042.jpg"
    assert main(["predict", str(detector), str(image), "-o", str(corrupt)]) == 2
    err = capsys.readouterr().err
    assert "-o" in err and "an existing file" in err and "Traceback" not in err


def test_predict_yolo_gives_images_of_one_name_their_own_label_files(detector, tmp_path, caplog):
    """x.jpg and x.png once wrote one labels/x.txt (the last won): names are made unique as the pseudo-label YOLO
    export makes them (``yolo_export.unique_name``)."""
    from PIL import Image

    images = tmp_path / "cam2"
    images.mkdir()
    shutil.copy(DATA / "coco8" / "images" / "val" / "000000000042.jpg", images / "frame.jpg")
    Image.open(DATA / "coco8" / "images" / "val" / "000000000036.jpg").save(images / "frame.png")
    with caplog.at_level("WARNING"):
        assert main(["predict", str(detector), str(tmp_path), "--format", "yolo", "-o", str(tmp_path / "y")]) == 0
    labels = tmp_path / "y" / "labels" / "cam2"
    assert sorted(p.name for p in labels.iterdir()) == ["frame.txt", "frame_1.txt"]
    from ddkit.commands.predict import _yolo_line

    task, model, info = load_model(detector)
    index = {int(c["id"]): k for k, c in enumerate(info.categories)}
    texts = [(labels / name).read_text() for name in ("frame.txt", "frame_1.txt")]
    for text, image in zip(texts, ("frame.jpg", "frame.png")):
        x = read_image(images / image)
        inst = task.predict(model, [x])[0]
        assert len(inst) > 0 and text == "".join(_yolo_line(inst, j, index[int(inst.labels[j])], *x.shape[-2:]) + "\n"
                                                 for j in range(len(inst)))
    assert texts[0] != texts[1]
    assert "1 label file(s) named after the image id" in caplog.text and "cam2/frame.png -> labels/cam2/frame_1.txt" \
        in caplog.text


def _coco_of(root: Path, path: Path, info, records: list[tuple[int, str]]) -> Path:
    """A COCO file (images only) of ``(id, file_name under root)``; a missing file gets a made-up size."""
    from PIL import Image

    images = []
    for image_id, name in records:
        w, h = Image.open(root / name).size if (root / name).is_file() else (10, 10)
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
    path.write_text(json.dumps({"images": images, "categories": info.categories}))
    return path


def test_predict_coco_images_carry_the_coco_files_ids(detector, digits_run, tmp_path, capsys):
    """``--coco``: the COCO file's images (file names under IMAGES) and ids, so ``ddkit fuse --images`` takes the
    results; an image missing under IMAGES is skipped and named; boxes, keypoints, YOLO txt and labels all work."""
    root = DATA / "coco8" / "images"
    task, model, info = load_model(detector)
    coco = _coco_of(root, tmp_path / "coco.json", info, [(42, "val/000000000042.jpg"), (7, "val/000000000036.jpg"),
                                           (99, "val/missing.jpg")])
    assert main(["predict", str(detector), str(root), "--coco", str(coco), "-o", str(tmp_path / "p")]) == 0
    assert "skipped 1 unreadable or missing image(s): val/missing.jpg (not found under" in capsys.readouterr().out
    index = json.loads((tmp_path / "p" / "images.json").read_text())
    assert [(im["id"], im["file_name"]) for im in index["images"]] == [(42, "val/000000000042.jpg"),
                                                                       (7, "val/000000000036.jpg")]
    results = json.loads((tmp_path / "p" / "predictions.json").read_text())
    for im in index["images"]:
        inst = task.predict(model, [read_image(root / im["file_name"])])[0]
        assert len([r for r in results if r["image_id"] == im["id"]]) == len(inst) > 0
    pred = str(tmp_path / "p" / "predictions.json")
    assert main(["fuse", pred, pred, "--images", str(coco), "-o", str(tmp_path / "fused.json")]) == 0
    assert {r["image_id"] for r in json.loads((tmp_path / "fused.json").read_text())} == {42, 7}
    assert main(["predict", str(detector), str(root), "--coco", str(coco), "--format", "yolo",
                 "-o", str(tmp_path / "y")]) == 0
    assert sorted(p.name for p in (tmp_path / "y" / "labels" / "val").glob("*.txt")) == \
        ["000000000036.txt", "000000000042.txt"]

    torch.manual_seed(0)  # keypoints: the results carry the ids too
    pose_info = _yolo("coco8-pose").info
    pose = save_model(ddkit.build("tasks", "keypoints").build_model(
        {"name": "keypointrcnn", **TINY, "keypoint_head": [8]}, pose_info), tmp_path / "pose.pt")
    pose_root = DATA / "coco8-pose" / "images"
    pose_coco = _coco_of(pose_root, tmp_path / "pose.json", pose_info, [(5, "val/000000000113.jpg")])
    assert main(["predict", str(pose), str(pose_root), "--coco", str(pose_coco), "-o", str(tmp_path / "k")]) == 0
    kps = json.loads((tmp_path / "k" / "predictions.json").read_text())
    assert kps and {r["image_id"] for r in kps} == {5} and all(len(r["keypoints"]) == 17 * 3 for r in kps)

    _, run = digits_run  # a classifier: one label per COCO image, with its id
    assert main(["predict", str(run), str(root), "--coco", str(coco), "-o", str(tmp_path / "c")]) == 0
    labels = json.loads((tmp_path / "c" / "predictions.json").read_text())
    assert [(r["image_id"], r["file_name"]) for r in labels] == [(42, "val/000000000042.jpg"),
                                                                 (7, "val/000000000036.jpg")]
    capsys.readouterr()
    assert main(["predict", str(detector), str(root), "--coco", str(tmp_path / "nope.json"), "-o", "x"]) == 2
    assert "--coco" in capsys.readouterr().err


def test_predict_tta_of_a_run_uses_the_recipes_views_as_eval_does(digits_run, tmp_path, capsys):
    """A run folder (or one of its stage folders): ``--tta`` takes the recipe's label views and aggregator, as
    ``ddkit eval RUN --tta``; a bare model file keeps the image and its mirror."""
    _, run = digits_run
    images = DATA / "coco8" / "images" / "val"
    assert main(["eval", str(run), "--tta", "-o", str(tmp_path / "e.json")]) == 0
    views = [v["name"] for v in json.loads((tmp_path / "e.json").read_text())["tta"]["views"]]
    assert views == ["identity", "translate"]
    capsys.readouterr()
    assert main(["predict", str(run), str(images), "--tta", "-o", str(tmp_path / "p")]) == 0
    assert "2 views (identity, translate" in capsys.readouterr().out
    explicit = ["--transforms", "[{name: identity}, {name: translate, shifts: [[1, 0]]}]",
                "--aggregator", "{name: prob_mean}"]
    assert main(["predict", str(run), str(images), "--tta", *explicit, "-o", str(tmp_path / "q")]) == 0
    ours = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert ours == json.loads((tmp_path / "q" / "predictions.json").read_text())
    assert main(["predict", str(run / "teacher"), str(images), "--tta", "-o", str(tmp_path / "s")]) == 0
    assert "2 views (identity, translate" in capsys.readouterr().out
    # views given, the aggregator the recipe's: the line says which came from the recipe
    assert main(["predict", str(run), str(images), "--tta", *explicit[:2], "-o", str(tmp_path / "t")]) == 0
    assert "(aggregator as the recipe " in capsys.readouterr().out
    assert main(["predict", str(run / "student" / "model.pt"), str(images), "--tta", "-o", str(tmp_path / "m")]) == 0
    assert "2 views (identity, hflip) (ddkit's default views (no recipe beside the model)" in capsys.readouterr().out


def test_tta_says_when_its_views_are_the_defaults_of_a_recipe_without_label_views():
    """A KD recipe has no label section: eval / predict --tta then mirror digits by default, and say so."""
    from argparse import Namespace

    from ddkit.commands.eval import tta_origin

    none_given = Namespace(transforms=None, aggregator=None)
    kd = tta_origin(none_given, {"task": {"name": "classification"}}, "r/config.yaml")
    assert "ddkit's default views (the recipe sets none); choose them with --transforms" in kd
    assert "the task's default aggregator" in kd
    dd = tta_origin(none_given, {"label": {"transforms": [{"name": "identity"}], "aggregator": {"name": "prob_mean"}}},
                    "r/config.yaml")
    assert dd == " (views and aggregator as the recipe r/config.yaml sets)"
    assert tta_origin(Namespace(transforms="[x]", aggregator="y"), {"label": {}}, "r") == ""


# ------------------------------------------------------------------------------------------------- end to end
COCO8_RECIPE = """
run: {{name: coco8, out_dir: "{out}", seed: 0, device: cpu}}
task: {{name: detection}}
data:
  train: {{dataset: {{name: yolo, root: "{data}/coco8", split: train}}}}
  unlabeled: {{dataset: {{name: yolo, root: "{data}/coco8", split: val}}}}
  test: {{dataset: {{name: yolo, root: "{data}/coco8", split: val}}}}
teacher:
  model: {{name: fasterrcnn, backbone: mobilenet_v3_large, pretrained: true, norm: frozen_bn, min_size: 96,
          max_size: 128, score_thresh: 0.0, detections_per_img: 10, rpn_post_nms_top_n_test: 50}}
  train: {{iterations: 2, batch_size: 2, lr: 0.001, log_every: 1}}
label:
  transforms: [{{name: identity}}, {{name: hflip}}]
  selector: {{name: score_threshold, threshold: 0.0}}
  batch_size: 4
student:
  model: ${{teacher.model}}
  train: {{iterations: 2, batch_size: 2, lr: 0.001, ratio: [1, 1], log_every: 1}}
"""


@pytest.mark.slow
def test_coco8_dd_from_cached_pretrained_weights_then_eval_and_predict(tmp_path, monkeypatch, capsys):
    """A torchvision detector started from COCO weights found in the torch hub cache (never the network), a data
    distillation run on coco8, then ``ddkit eval`` and ``ddkit predict`` on its student."""
    import urllib.error

    import torchvision
    from ddkit_plugins.pretrained import torch_hub_cache_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("offline (test)")))
    weights = torchvision.models.detection.FasterRCNN_MobileNet_V3_Large_FPN_Weights.DEFAULT
    torch.manual_seed(0)
    coco = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None)
    cached = torch_hub_cache_file(weights.url)
    cached.parent.mkdir(parents=True)
    state = coco.state_dict()
    for k in [k for k in state if k.endswith(("running_mean", "running_var"))]:  # not a fresh init's 0 / 1
        state[k] = torch.rand(state[k].shape) * 0.1 + (1.0 if k.endswith("var") else 0.0)
    torch.save(state, cached)
    recipe = tmp_path / "coco8.yaml"
    recipe.write_text(COCO8_RECIPE.format(out=tmp_path / "run", data=DATA))
    assert main(["run", str(recipe), "--no-progress"]) == 0
    run = tmp_path / "run"
    teacher = torch.load(run / "teacher" / "checkpoints" / "last.pt", weights_only=True)
    assert teacher["iteration"] == 2 and teacher["model_cfg"]["pretrained"] is True
    stat = "backbone.body.3.block.1.1.running_var"  # frozen BN: still the cached file's after training
    assert torch.equal(teacher["model"][stat], state[stat])
    pseudo = json.loads((run / "label" / "pseudo_labels.json").read_text())
    assert pseudo["annotations"]  # the teacher labelled the unlabeled images
    cached.unlink()  # eval and predict read the student's own file, not the cache
    assert main(["eval", str(run), "--tta"]) == 0
    record = json.loads((run / "eval.json").read_text())
    assert "AP" in record["metrics"] and "AP" in record["tta"]["metrics"] and "student" in record["what"]
    assert main(["predict", str(run), str(DATA / "coco8" / "images" / "val"), "--format", "yolo",
                 "-o", str(tmp_path / "pred")]) == 0
    assert len(list((tmp_path / "pred" / "labels").glob("*.txt"))) == 4


def test_data_on_the_command_line_is_a_dataset_block(tmp_path):
    from ddkit.engine.evaluate import dataset_block

    ann = tmp_path / "a.json"
    ann.write_text("{}")
    (tmp_path / "classes" / "cat").mkdir(parents=True)
    assert dataset_block(str(ann)) == {"name": "coco", "annotations": str(ann)}
    assert dataset_block(str(DATA / "coco8")) == {"name": "yolo", "root": str(DATA / "coco8"), "split": "val"}
    assert dataset_block(str(DATA / "coco8"), "train")["split"] == "train"
    assert dataset_block(str(tmp_path / "classes")) == {"name": "image_folder", "root": str(tmp_path / "classes")}
    assert dataset_block("{name: coco, annotations: x.json, images: i/}") == \
        {"name": "coco", "annotations": "x.json", "images": "i/"}
    with pytest.raises(ConfigError, match="neither a COCO .json file, a YOLO data .yaml nor a folder"):
        dataset_block(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="needs a 'name'"):
        dataset_block("{annotations: x.json}")


def test_data_given_as_an_ultralytics_data_yaml_is_its_val_split():
    """``ddkit eval --data coco8.yaml``, as ``yolo val data=coco8.yaml``: the yaml's val: entry, its names."""
    import ddkit
    from ddkit.engine.evaluate import dataset_block

    yaml_file = DATA / "coco8" / "coco8.yaml"
    block = dataset_block(str(yaml_file))
    assert block == {"name": "yolo", "data_yaml": str(yaml_file), "split": "val"}
    ds = ddkit.build("datasets", block)
    assert [f.parent for f in ds.files] == [DATA / "coco8" / "images" / "val"] * 4
    assert ds.info.categories[0] == {"id": 0, "name": "person"} and ds.info.num_classes == 80


def test_eval_a_stage_folder_of_a_run_takes_the_runs_data_and_views(digits_run, tmp_path, capsys):
    """``ddkit eval RUN/teacher`` is ``ddkit eval RUN --checkpoint RUN/teacher``: no --data needed."""
    _, run = digits_run
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["eval", str(run / "teacher"), "--tta", "-o", str(a)]) == 0
    assert "TTA (2 views: identity, translate" in capsys.readouterr().out
    assert main(["eval", str(run), "--checkpoint", str(run / "teacher"), "--tta", "-o", str(b)]) == 0
    first, second = json.loads(a.read_text()), json.loads(b.read_text())
    assert first["metrics"] == second["metrics"] and first["tta"] == second["tta"] and first["items"] == second["items"]


def _renumbered_coco(tmp_path: Path, ids: dict[str, int]) -> dict:
    """coco-val2017-mini's person boxes (keypoints left out) under the category ids ``ids`` (name -> id)."""
    coco = json.loads((DATA / "coco-val2017-mini" / "test_coco.json").read_text())
    coco["categories"] = [{"id": i, "name": n} for n, i in ids.items()]
    for ann in coco["annotations"]:
        ann["category_id"] = ids["person"]
        ann.pop("keypoints", None)
        ann.pop("num_keypoints", None)
    path = tmp_path / f"coco_{'_'.join(f'{n}{i}' for n, i in ids.items())}.json"
    path.write_text(json.dumps(coco))
    return {"name": "coco", "annotations": str(path), "images": str(DATA / "coco-val2017-mini")}


class _GroundTruthPredictor:
    """Predicts each image's true boxes as the model's class ``label``, plus one wrong box of class ``junk``."""

    def __init__(self, task, dataset, label: int, junk: int):
        self.task, self.n = task, 0
        self.truth = [dataset[i][1] for i in range(len(dataset))]
        self.label, self.junk = label, junk

    def predict(self, images):
        out = []
        for _ in images:
            boxes = self.truth[self.n]["boxes"].float()
            self.n += 1
            n = len(boxes)
            out.append(Instances(torch.cat([boxes, torch.tensor([[0.0, 0.0, 30.0, 30.0]])]),
                                 torch.cat([torch.full((n,), 0.9), torch.tensor([0.95])]),
                                 torch.tensor([self.label] * n + [self.junk])))
        return out


def test_eval_maps_categories_by_name_when_the_ids_differ(detector, tmp_path, capsys):
    """A model trained on YOLO files (person = 1 of 80) scored on a COCO file where person is 7: boxes of the
    model's person count as the file's person, its other classes are dropped, and the ids do not change the AP."""
    from ddkit.engine.evaluate import category_map

    task = ddkit.build("tasks", "detection")
    model_info = load_model(detector)[2]
    person = next(int(c["id"]) for c in model_info.categories if c["name"] == "person")
    junk = next(int(c["id"]) for c in model_info.categories if c["name"] == "car")
    # person under a new id, under the model's own id, and under the id of the model's car (the junk box's class:
    # matched by id instead of name, it would be a false person above every true one)
    for person_id in (7, person, junk):
        dataset = ddkit.build("datasets", _renumbered_coco(tmp_path, {"person": person_id}))
        categories = category_map(model_info, dataset.info, "model", "data", by_name=True)
        assert categories == {person: person_id}
        metrics = evaluate_dataset(_GroundTruthPredictor(task, dataset, person, junk), dataset, 2, categories)
        assert metrics["AP"] == pytest.approx(1.0), person_id
        if person_id != person:  # without the map the ids are compared as they are
            assert evaluate_dataset(_GroundTruthPredictor(task, dataset, person, junk), dataset, 2)["AP"] < 0.9
    with pytest.raises(ConfigError, match="the model has no class named 'unicorn'"):
        unicorn = ddkit.build("datasets", _renumbered_coco(tmp_path, {"person": 1, "unicorn": 2}))
        category_map(model_info, unicorn.info, "model", "data", by_name=True)
    out = tmp_path / "e.json"
    block = json.dumps(_renumbered_coco(tmp_path, {"person": 7}))
    assert main(["eval", str(detector), "--data", block, "-o", str(out)]) == 0
    assert "categories matched by name: the dataset's 1 of the model's 80 classes" in capsys.readouterr().out
    assert json.loads(out.read_text())["categories_by_name"] == {str(person): 7}


def test_predict_coco_results_carry_the_files_category_ids_matched_by_name(detector, tmp_path, capsys):
    """``--coco`` naming one of the model's classes under id 7: the results are the model's boxes of that class,
    written as category 7, so they score against that file; the model's other classes are left out."""
    images = DATA / "coco-val2017-mini"
    assert main(["predict", str(detector), str(images), "-o", str(tmp_path / "b")]) == 0
    plain = json.loads((tmp_path / "b" / "predictions.json").read_text())
    ours = max({r["category_id"] for r in plain}, key=[r["category_id"] for r in plain].count)  # a class it predicts
    name = next(c["name"] for c in load_model(detector)[2].categories if int(c["id"]) == ours)
    coco = json.loads((images / "test_coco.json").read_text())
    coco["categories"] = [{"id": 7, "name": name}]
    coco["annotations"] = [{k: v for k, v in a.items() if "keypoints" not in k} | {"category_id": 7}
                           for a in coco["annotations"]]
    (tmp_path / "c.json").write_text(json.dumps(coco))
    capsys.readouterr()
    assert main(["predict", str(detector), str(images), "--coco", str(tmp_path / "c.json"), "-o",
                 str(tmp_path / "a")]) == 0
    assert "the results carry its category ids, matched by name" in capsys.readouterr().out

    def by_file(folder: Path, category: int) -> list[tuple]:
        names = {im["id"]: im["file_name"] for im in json.loads((folder / "images.json").read_text())["images"]}
        return sorted((names[r["image_id"]], tuple(round(v, 3) for v in r["bbox"]), round(r["score"], 5))
                      for r in json.loads((folder / "predictions.json").read_text()) if r["category_id"] == category)

    written = json.loads((tmp_path / "a" / "predictions.json").read_text())
    assert written and {r["category_id"] for r in written} == {7}
    assert by_file(tmp_path / "a", 7) == by_file(tmp_path / "b", ours)


def test_eval_on_a_folder_of_some_classes_matches_them_by_name(digits_run, tmp_path, capsys):
    """A folder of RGB photos of three of the grey digits model's ten classes: the classes are matched by name (the
    folder numbers its own 0..2), the images fit the model's input, and the accuracy is the one computed by hand."""
    from PIL import Image

    from ddkit.engine.data import adapt_image, read_image

    _, run = digits_run
    _, model, info = load_model(run / "student" / "model.pt")
    digits = ddkit.build("datasets", {"name": "digits"})
    names = {int(c["id"]): str(c["name"]) for c in info.categories}
    chosen = sorted(names)[3:6]
    truth, images = [], []
    for i in range(len(digits)):
        image, target = digits[i]
        if target["label"] in chosen and sum(t == target["label"] for t in truth) < 4:
            path = tmp_path / "folder" / names[target["label"]] / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((image[0] * 255).round().byte().numpy()).convert("RGB").save(path)
            truth.append(target["label"])
            images.append(adapt_image(read_image(path), info.extra["image_shape"]))
    by_folder = sorted(zip([names[t] for t in truth], truth, images), key=lambda r: r[0])  # the folder's order
    with torch.no_grad():
        predicted = model(torch.stack([im for _, _, im in by_folder])).argmax(1).tolist()
    ids = [int(c["id"]) for c in info.categories]
    expected = sum(ids[p] == t for p, (_, t, _) in zip(predicted, by_folder)) / len(by_folder)
    out = tmp_path / "e.json"
    assert main(["eval", str(run / "student" / "model.pt"), "--data", str(tmp_path / "folder"), "-o", str(out)]) == 0
    assert "classes matched by name: the dataset's 3 of the model's 10 classes" in capsys.readouterr().out
    assert json.loads(out.read_text())["metrics"]["accuracy"] == pytest.approx(expected)
    (tmp_path / "folder" / "cat").mkdir()
    shutil.copy(next((tmp_path / "folder" / names[chosen[0]]).iterdir()), tmp_path / "folder" / "cat")
    assert main(["eval", str(run / "student" / "model.pt"), "--data", str(tmp_path / "folder")]) == 2
    assert "'cat' not among the model's" in capsys.readouterr().err


def test_eval_on_a_folder_reads_each_image_once_at_the_models_shape(digits_run, tmp_path, caplog):
    """A folder of 16 x 16 RGB copies of the 8 x 8 grey digits whose first file is 3 x 2: each image is resized
    once, to the model's [1, 8, 8] (as ``ddkit predict`` reads it), not first to the first file's size; an
    ``image_size`` that the block gives otherwise is said to be ignored."""
    from PIL import Image

    _, run = digits_run
    model_path = run / "student" / "model.pt"
    _, model, info = load_model(model_path)
    digits = ddkit.build("datasets", {"name": "digits"})
    names = {int(c["id"]): str(c["name"]) for c in info.categories}
    files, truth = [], []
    for i in range(60):
        image, target = digits[i]
        path = tmp_path / "folder" / names[target["label"]] / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        size = (3, 2) if i == 0 else (16, 16)  # digits[0] is a 0: folder "0", sorted first
        Image.fromarray((image[0] * 255).round().byte().numpy()).convert("RGB").resize(size).save(path)
        files.append(path)
        truth.append(target["label"])
    order = sorted(range(60), key=lambda k: (names[truth[k]], files[k].name))
    assert order[0] == 0
    ids = [int(c["id"]) for c in info.categories]

    def accuracy(read) -> float:
        with torch.no_grad():
            predicted = model(torch.stack([read(files[k]) for k in order])).argmax(1).tolist()
        return sum(ids[p] == truth[k] for p, k in zip(predicted, order)) / 60

    once = accuracy(lambda f: adapt_image(read_image(f), [1, 8, 8]))
    twice = accuracy(lambda f: adapt_image(adapt_image(read_image(f), [3, 2, 3]), [1, 8, 8]))
    assert once > twice + 0.2  # through the first file's 2 x 3 the digits are lost
    out = tmp_path / "e.json"
    assert main(["eval", str(model_path), "--data", str(tmp_path / "folder"), "-o", str(out)]) == 0
    assert json.loads(out.read_text())["metrics"]["accuracy"] == pytest.approx(once)
    block = f"{{name: image_folder, root: {tmp_path / 'folder'}, image_size: [2, 3]}}"
    assert main(["eval", str(model_path), "--data", block, "-o", str(out)]) == 0
    assert json.loads(out.read_text())["metrics"]["accuracy"] == pytest.approx(once)
    assert "--data: image_size: [2, 3] ignored; its images are read at the model's image shape [1, 8, 8]" \
        in caplog.text


def test_a_box_model_on_a_coco_file_with_keypoints_is_told_how_to_score_its_boxes(detector, tmp_path, capsys):
    coco = DATA / "coco-val2017-mini" / "test_coco.json"
    assert main(["eval", str(detector), "--data", str(coco), "-o", str(tmp_path / "e.json")]) == 2
    err = capsys.readouterr().err
    assert "17 keypoints per instance" in err and "keypoints: false" in err
    block = json.dumps({"name": "coco", "annotations": str(coco), "keypoints": False})
    assert main(["eval", str(detector), "--data", block, "-o", str(tmp_path / "e.json")]) == 0
    assert "AP" in json.loads((tmp_path / "e.json").read_text())["metrics"]


def test_a_box_model_on_a_yolo_pose_folder_scores_its_boxes_with_keypoints_false(detector, tmp_path, capsys):
    """pass 23 #8: the hint names no dataset format, and the yolo dataset's ``keypoints: false`` reads a pose
    folder's boxes alone (box-only targets), so a detector is scored on them."""
    pose = DATA / "coco8-pose"
    assert main(["eval", str(detector), "--data", str(pose), "-o", str(tmp_path / "e.json")]) == 2
    err = capsys.readouterr().err
    assert "17 keypoints per instance" in err and "the dataset's keypoints: false" in err and "name: coco" not in err
    boxes = ddkit.build("datasets", {"name": "yolo", "root": str(pose), "split": "val", "keypoints": False})
    full = ddkit.build("datasets", {"name": "yolo", "root": str(pose), "split": "val"})
    assert boxes.info.num_keypoints is None and full.info.num_keypoints == 17
    for a, b in zip(boxes.targets, full.targets):
        assert "keypoints" not in a and torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])
    block = json.dumps({"name": "yolo", "root": str(pose), "split": "val", "keypoints": False})
    assert main(["eval", str(detector), "--data", block, "-o", str(tmp_path / "e.json")]) == 0
    assert "AP" in json.loads((tmp_path / "e.json").read_text())["metrics"]
    with pytest.raises(DataError, match="keypoints requested but the data yaml has no kpt_shape"):
        ddkit.build("datasets", {"name": "yolo", "root": str(DATA / "coco8"), "split": "val", "keypoints": True})


def test_eval_refuses_data_naming_the_models_keypoints_in_another_order(tmp_path, capsys):
    """A pose model trained on COCO's order, a file listing the same 17 keypoints reversed: scored index by index,
    its right ankle would be the model's nose; one error line naming both."""
    from test_instance_classes_by_name import MINI, reversed_keypoints

    torch.manual_seed(0)
    info = ddkit.build("datasets", {"name": "coco", "annotations": str(MINI / "test_coco.json")}).info
    pose = save_model(ddkit.build("tasks", "keypoints").build_model({"name": "keypointrcnn", **TINY,
                                                                    "keypoint_head": [8]}, info), tmp_path / "pose.pt")
    other = reversed_keypoints(tmp_path / "other.json")
    block = json.dumps({"name": "coco", "annotations": str(other), "images": str(MINI)})
    assert main(["eval", str(pose), "--data", block, "-o", str(tmp_path / "e.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "keypoint 0 is 'right_ankle', the model's" in err and "is 'nose'" in err and "\n" not in err, err
    assert "export the data with the model's keypoints, in its order" in err
    assert not (tmp_path / "e.json").exists()
