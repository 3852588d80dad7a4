"""``ddkit run`` never reports a degenerate outcome as a success, and a failed command changes nothing it had
finished."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ddkit
from ddkit.cli import main
from ddkit.config import load_config
from ddkit.engine.run import run_recipe
from ddkit.errors import ConfigError, DegenerateResultError

from test_run import RECIPE


def _recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(RECIPE.format(out=tmp_path / "out"))
    return path


def test_zero_pseudo_labels_stop_the_run_and_say_so(tmp_path):
    path = _recipe(tmp_path)
    # no class probability reaches 1.0: nothing is selected
    cfg = load_config(path, ["label.selector={name: score_threshold, threshold: 1.0}", "kd=null",
                             "evaluate.tta=false"])
    with pytest.raises(DegenerateResultError) as err:
        run_recipe(cfg, source=str(path), progress=False)
    assert "selected 0 pseudo-labels" in str(err.value)
    out = tmp_path / "out"
    assert not (out / "student" / "stage.json").exists()  # no student row pretends to be distilled
    summary = json.loads((out / "results.json").read_text())
    assert "0 pseudo-labels" in summary["stopped"]
    assert [r["stage"] for r in summary["rows"]] == ["teacher"]
    assert (out / "results.md").read_text().startswith("**STOPPED, not a result:**")
    assert "this is not a result" in (out / "report.html").read_text()


def test_a_bad_override_leaves_a_finished_run_folder_untouched(tmp_path, capsys):
    path = _recipe(tmp_path)
    out = tmp_path / "out"
    assert main(["run", str(path), "kd=null", "evaluate.tta=false", "baselines.fully_labeled=false",
                 "--no-progress"]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for bad in ("teacher.train.lr=-1", "label.selector.name=count_mach", "run.sed=3", "run.device=gpu"):
        assert main(["run", str(path), "kd=null", "evaluate.tta=false", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "Traceback" not in err, err
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before


COCO8 = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco8"


@pytest.mark.parametrize("unlabeled, test, pair", [("val", "val", "data.unlabeled and data.test"),
                                                    ("train", "val", "data.train and data.unlabeled")])
def test_parts_sharing_image_files_are_warned_about(unlabeled, test, pair, caplog):
    from ddkit.engine.data import build_data

    def part(split):
        return {"dataset": {"name": "yolo", "root": str(COCO8), "split": split}}

    splits = build_data({"train": part("train"), "unlabeled": part(unlabeled), "test": part(test)})
    assert len(splits.warnings) == 1 and splits.warnings[0].startswith(pair), splits.warnings
    assert "share 4 image file(s)" in splits.warnings[0]
    clean = build_data({"train": part("train"), "test": part("val")})
    assert clean.warnings == []


def test_warnings_and_stops_head_the_results_table():
    from ddkit.engine.run import results_markdown

    text = results_markdown({"rows": [{"model": "teacher", "stage": "teacher", "AP": 1.0}],
                             "warnings": ["data.unlabeled and data.test share 4 image file(s)"]})
    assert text.startswith("**WARNING:** data.unlabeled and data.test share 4") and "| teacher | 1.0 |" in text


FOLDER_RECIPE = """
run: {{name: folder, out_dir: "{out}", seed: 0, device: cpu}}
task: {{name: classification}}
data:
  dataset: {{name: image_folder, root: "{root}", grayscale: true}}
  split: {{labeled: 0.5, unlabeled: 0.0, test: 0.5, seed: 0}}
teacher:
  model: {{name: mlp, hidden: [8]}}
  train: {{iterations: 3, batch_size: 4, lr: 0.1, log_every: 1}}
"""


def test_a_changed_image_file_reruns_the_stages_that_read_it(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "digits"
    g = torch.Generator().manual_seed(0)
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(4):
            pixels = (torch.rand(8, 8, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(FOLDER_RECIPE.format(out=tmp_path / "out", root=root))
    assert main(["run", str(recipe), "--no-progress"]) == 0
    assert main(["run", str(recipe), "--no-progress"]) == 0
    assert "teacher: done earlier, skipped" in capsys.readouterr().out
    Image.fromarray(torch.zeros(8, 8, dtype=torch.uint8).numpy()).save(root / "class1" / "3.png")  # new content
    assert main(["run", str(recipe), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "teacher: running" in out and "skipped" not in out


def test_unreadable_unlabeled_images_are_said_on_the_console_and_in_the_results(tmp_path, capsys):
    from PIL import Image

    images = tmp_path / "unlabeled"
    images.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        pixels = (torch.rand(8, 8, generator=g) * 255).byte().numpy()
        Image.fromarray(pixels).save(images / f"{i:02d}.png")  # 8-bit, 2-D: grayscale
    (images / "broken.png").write_bytes(b"not a png")
    path = _recipe(tmp_path)
    cfg = load_config(path, [f"label.images={images}", "label.selector={name: score_threshold, threshold: 0.0}",
                             "kd=null", "evaluate.tta=false", "baselines.fully_labeled=false"])
    run_recipe(cfg, source=str(path), progress=False)
    printed = capsys.readouterr().out
    assert "label: 1 unlabeled image(s) could not be read and were skipped" in printed
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    assert any("1 unlabeled image(s) could not be read" in w for w in summary["warnings"])
    assert "1 unlabeled image(s) could not be read" in (tmp_path / "out" / "results.md").read_text()


def test_unreadable_train_and_test_images_are_said_in_the_results(tmp_path, capsys):
    """A broken image in the train and the test folder: skipped at load with a log warning that scrolls by, and one
    line per part at the head of results.md / results.json and of what ``ddkit run`` prints at the end."""
    path, root, _ = _folders_recipe(tmp_path)
    (root / "train" / "a" / "broken.png").write_bytes(b"not a png")
    (root / "val" / "b" / "broken.png").write_bytes(b"not a png")
    assert main(["run", str(path), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    lines = [f"data.train.dataset ({root / 'train'}): 1 image(s) could not be read and were skipped (the first: "
             f"{root / 'train' / 'a' / 'broken.png'}: ", f"data.test.dataset ({root / 'val'}): 1 image(s) could not "
             f"be read and were skipped (the first: {root / 'val' / 'b' / 'broken.png'}: "]
    warnings = json.loads((tmp_path / "out" / "results.json").read_text())["warnings"]
    results = (tmp_path / "out" / "results.md").read_text()
    for line in lines:
        assert sum(line in w for w in warnings) == 1, warnings
        assert f"**WARNING:** {path}: {line}" in results and f"**WARNING:** {path}: {line}" in printed


FOLDERS_RECIPE = """
run: {{name: folders, out_dir: "{out}", seed: 0, device: cpu}}
task: {{name: classification}}
data:
  train: {{dataset: {{name: image_folder, root: "{root}/train", grayscale: true}}}}
  test: {{dataset: {{name: image_folder, root: "{root}/val", grayscale: true}}}}
teacher:
  model: {{name: mlp, hidden: [8]}}
  train: {{iterations: 3, batch_size: 4, lr: 0.1, log_every: 1}}
label:
  images: "{root}/unlabeled"
  transforms: [{{name: identity}}, {{name: hflip}}]
  aggregator: {{name: prob_mean}}
  selector: {{name: score_threshold, threshold: 0.0}}
student:
  model: {{name: mlp, hidden: [8]}}
  train: {{iterations: 3, batch_size: 4, lr: 0.1, ratio: [6, 4], log_every: 1}}
baselines: {{labeled_only: false, fully_labeled: false}}
evaluate: {{tta: false}}
"""


def _photos(folder: Path, sizes: list[tuple[int, int]], seed: int) -> None:
    """RGB images of the given ``(height, width)`` sizes, random colours."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i, (h, w) in enumerate(sizes):
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")


def test_unlabeled_photos_are_read_like_the_labeled_grey_folders_by_label_and_student(tmp_path):
    """A grey 8x8 labeled image folder, unlabeled RGB photos of other sizes (label.images): the student trains on
    the pseudo-labelled photos read exactly as the labeled folder reads an image (same mode and size)."""
    from ddkit.engine.pseudo import load_pseudo_dataset

    path, root, _ = _folders_recipe(tmp_path)
    summary = run_recipe(load_config(path), source=str(path), progress=False)
    assert [r["stage"] for r in summary["rows"]] == ["teacher", "student"]
    pseudo = load_pseudo_dataset(tmp_path / "out" / "label" / "pseudo_labels.json")
    assert len(pseudo) == 6
    # the same files as a labeled image folder of the recipe's settings read them
    as_labeled = tmp_path / "as_labeled" / "a"
    as_labeled.mkdir(parents=True)
    for f in (root / "unlabeled").iterdir():
        (as_labeled / f.name).write_bytes(f.read_bytes())
    folder = ddkit.build("datasets", {"name": "image_folder", "root": str(as_labeled.parent), "grayscale": True,
                                      "image_size": [8, 8]})
    for i in range(len(pseudo)):
        j = [f.name for f in folder.files].index(Path(pseudo.images[i]["file_name"]).name)
        assert pseudo[i][0].shape == (1, 8, 8)
        assert torch.equal(pseudo[i][0], folder[j][0])


@pytest.fixture(scope="module")
def grey_and_rgb_run(tmp_path_factory) -> tuple[Path, Path, dict]:
    """A run on grey 8x8 train folders whose test folder holds RGB photos of other sizes, the first 13 x 20, and no
    ``grayscale`` / ``image_size``; a lenet teacher (any input size) and an mlp student (8x8 grey only)."""
    tmp = tmp_path_factory.mktemp("grey_rgb")
    root = tmp / "data"
    for c, name in enumerate(("a", "b")):
        _photos(root / "train" / name, [(8, 8)] * 4, seed=c)
        _photos(root / "val" / name, [(13, 20), (8, 8), (30, 5), (9, 9)], seed=10 + c)
    _photos(root / "unlabeled", [(8, 8), (20, 13)], seed=99)
    path = tmp / "folders.yaml"
    path.write_text(FOLDERS_RECIPE.format(out=tmp / "out", root=root))
    cfg = load_config(path, [f"data.test.dataset={{name: image_folder, root: {root / 'val'}}}",
                             "teacher.model={name: lenet, channels: [4], hidden: 8}"])
    return path, root, run_recipe(cfg, source=str(path), progress=False)


def test_an_rgb_test_folder_of_a_grey_run_is_read_at_the_train_shape(grey_and_rgb_run, tmp_path):
    """Before, the test folder was read at its first photo's [3, 13, 20]: the run stopped at the teacher's
    evaluation with a torch shape error. Now the run's accuracy is ``ddkit eval CKPT --data`` on the same folder."""
    _, root, summary = grey_and_rgb_run
    out = Path(summary["run_dir"])
    for stage in ("teacher", "student"):
        row = next(r for r in summary["rows"] if r["stage"] == stage)
        assert main(["eval", str(out / stage / "model.pt"), "--data", str(root / "val"), "-o",
                     str(tmp_path / "e.json")]) == 0
        assert json.loads((tmp_path / "e.json").read_text())["metrics"]["accuracy"] * 100 == \
            pytest.approx(row["accuracy %"], abs=0.01)


def test_a_teacher_checkpoint_of_another_input_shape_is_checked_before_anything_is_written(grey_and_rgb_run,
                                                                                             tmp_path, caplog):
    path, root, summary = grey_and_rgb_run
    run = Path(summary["run_dir"])
    out = tmp_path / "out"

    def runner(teacher: str, *overrides: str):
        from ddkit.engine.run import Runner

        return Runner(load_config(path, [f"run.out_dir={out}", f"teacher.checkpoint={run / teacher / 'model.pt'}",
                                         *overrides]), source="r.yaml")

    with pytest.raises(ConfigError) as err:  # a grey teacher, RGB data: before, a conv error inside stage teacher
        runner("teacher", "data.train.dataset.grayscale=false")
    assert "\n" not in str(err.value) and str(err.value).startswith(
        f"r.yaml: teacher.checkpoint {run / 'teacher' / 'model.pt'} takes images of shape [1, 8, 8] (C, H, W), the "
        "data [3, 8, 8]: other channels;")
    with pytest.raises(ConfigError, match=r"r.yaml: teacher.checkpoint \(images of shape \[1, 8, 8\]\): a forward "
                                          r"pass on one \(1, 12, 12\) image failed"):
        runner("student", "data.train.dataset.image_size=[12, 12]")  # an mlp takes 8 x 8 only
    assert not out.exists()
    with caplog.at_level("WARNING", logger="ddkit.run"):
        runs = runner("teacher", "data.train.dataset.image_size=[12, 12]")  # lenet runs at 12 x 12: said
    said = [w for w in runs.splits.warnings if "teacher.checkpoint" in w]
    assert len(said) == 1 and said[0] in caplog.text
    assert "the teacher is scored and labels at 12 x 12, not at its own 8 x 8" in said[0]
    assert runner("teacher").splits.warnings == [] and not out.exists()  # the same shape: nothing to say


def _folders_recipe(tmp_path: Path, *overrides: str):
    """FOLDERS_RECIPE on grey 8x8 class folders and 6 unlabeled photos: ``(recipe file, data root, a function that
    runs it with ``overrides`` and returns what it printed)``."""
    root = tmp_path / "data"
    for k, part in enumerate(("train", "val")):
        for c, name in enumerate(("a", "b")):
            _photos(root / part / name, [(8, 8)] * 4, seed=10 * k + c)
    _photos(root / "unlabeled", [(8, 8), (20, 13), (5, 30), (64, 48), (9, 9), (12, 7)], seed=99)
    path = tmp_path / "folders.yaml"
    path.write_text(FOLDERS_RECIPE.format(out=tmp_path / "out", root=root))

    def run(capsys) -> str:
        capsys.readouterr()
        run_recipe(load_config(path, list(overrides)), source=str(path), progress=False)
        return capsys.readouterr().out
    return path, root, run


def test_a_resumed_label_stage_says_which_shards_it_kept(tmp_path, capsys):
    """A label stage cut short (its marker and one shard missing) labels only the missing shard, says how many it
    kept, and the run's pseudo-labels are those of the uninterrupted run."""
    _, _, run = _folders_recipe(tmp_path, "label.shards=3")
    assert "resumed" not in run(capsys)
    pseudo = tmp_path / "out" / "label" / "pseudo_labels.json"
    whole = pseudo.read_text()
    shards = sorted((tmp_path / "out" / "label" / "shards").glob("shard-*"))
    assert len(shards) == 3
    shards[1].unlink()
    (tmp_path / "out" / "label" / "stage.json").unlink()
    said = run(capsys)
    assert "label: resumed: 2 of 3 shard(s) labelled earlier (an interrupted run, or ddkit label) were kept, " \
        "1 labelled now" in said
    assert pseudo.read_text() == whole



    """label.images is in the fingerprint of label, select and student: an added, replaced or deleted unlabeled
    image re-runs them (not the teacher), and the student trains on the new pseudo-labels."""
    from ddkit.engine.pseudo import load_pseudo_dataset

    _, root, run = _folders_recipe(tmp_path)
    run(capsys)
    assert "running" not in run(capsys)  # nothing changed: nothing re-runs
    pseudo = tmp_path / "out" / "label" / "pseudo_labels.json"
    _photos(tmp_path / "more", [(8, 8)] * 7, seed=5)
    (tmp_path / "more" / "06.png").rename(root / "unlabeled" / "06.png")  # added
    printed = run(capsys)
    assert "teacher: done earlier" in printed, printed
    assert all(f"{stage}: running" in printed for stage in ("label", "select", "student")), printed
    assert len(load_pseudo_dataset(pseudo)) == 7
    (tmp_path / "more" / "00.png").replace(root / "unlabeled" / "00.png")  # replaced: same name, other pixels
    printed = run(capsys)
    assert "teacher: done earlier" in printed and "label: running" in printed and "student: running" in printed
    (root / "unlabeled" / "01.png").unlink()  # deleted
    printed = run(capsys)
    assert "label: running" in printed and "student: running" in printed
    assert len(load_pseudo_dataset(pseudo)) == 6 and "01.png" not in pseudo.read_text()


def test_a_changed_select_output_redoes_the_stages_that_read_it(tmp_path, capsys, monkeypatch):
    """The student reads the select stage's pseudo-labels: when select runs again to the same pseudo-labels the
    student is kept; when they come out different (as from a teacher retrained on a GPU), the student and the
    next round that its model labels run again, although no recipe key changed."""
    from ddkit.engine.run import Runner

    _, _, run = _folders_recipe(tmp_path, "rounds=2")
    run(capsys)
    pseudo = tmp_path / "out" / "label" / "pseudo_labels.json"
    pseudo.unlink()
    printed = run(capsys)  # select runs again, to the same file: nothing that reads it does
    assert "select: running" in printed and "student: done earlier" in printed and "label_r2: done earlier" in printed
    select = Runner._select

    def other_labels(self, sfx):  # every pseudo-label flipped to the other class: the file keeps its size
        out = select(self, sfx)
        if not sfx:
            data = json.loads(pseudo.read_text())
            for ann in data["annotations"]:
                ann["category_id"] = 1 - ann["category_id"]
            pseudo.write_text(json.dumps(data, indent=1))
        return out

    monkeypatch.setattr(Runner, "_select", other_labels)
    pseudo.unlink()
    student = (tmp_path / "out" / "student" / "model.pt").read_bytes()
    printed = run(capsys)
    assert "student: the output of select changed since it ran" in printed, printed
    assert "student: running" in printed and "label_r2: running" in printed and "select_r2: running" in printed
    assert (tmp_path / "out" / "student" / "model.pt").read_bytes() != student
    assert "running" not in run(capsys)  # and then it is done


def test_label_images_none_of_which_reads_are_refused_before_the_teacher_trains(tmp_path, caplog):
    """All of label.images unreadable was found only after the teacher had trained: a few files are opened first."""
    import logging

    from ddkit.engine.run import Runner

    path, root, _ = _folders_recipe(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "cut.png").write_bytes((root / "unlabeled" / "00.png").read_bytes()[:40])
    (bad / "text.jpg").write_text("not an image")
    with pytest.raises(ConfigError, match=r"label.images: none of the 2 unlabeled image\(s\) could be read; first: "
                                          r"cut.png: "):
        run_recipe(load_config(path, [f"label.images={bad}"]), source=str(path), progress=False)
    assert not (tmp_path / "out").exists()  # nothing written, the teacher not trained
    for i in range(15):  # 17 files: a sample of 16 is opened, none reads; the rest may: said, not refused
        (bad / f"{i:02d}.png").write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="ddkit.run"):
        Runner(load_config(path, [f"label.images={bad}"]), source=str(path))
    assert "label.images: none of 16 unlabeled images opened as a check (of 17) could be read" in caplog.text


@pytest.mark.parametrize("images, expected", [
    ("unlabeled", None),
    ("unlabeled+leak", "label.images and data.test share 1 image file(s)"),  # a link to a test image: same file
    ("train/a", "label.images and data.train share 4 image file(s)")])
def test_label_images_that_are_test_or_labeled_files_are_warned_about(tmp_path, images, expected, caplog):
    root = tmp_path / "data"
    for k, part in enumerate(("train", "val")):
        for c, name in enumerate(("a", "b")):
            _photos(root / part / name, [(8, 8)] * 4, seed=10 * k + c)
    _photos(root / "unlabeled", [(8, 8)] * 4, seed=99)
    if images.endswith("+leak"):
        (root / "unlabeled" / "leak.png").symlink_to(root / "val" / "b" / "01.png")
    path = tmp_path / "folders.yaml"
    path.write_text(FOLDERS_RECIPE.format(out=tmp_path / "out", root=root))
    cfg = load_config(path, [f"label.images={root / images.split('+')[0]}"])
    summary = run_recipe(cfg, source=str(path), progress=False)
    results_md = (tmp_path / "out" / "results.md").read_text()
    if expected is None:  # (this 8x8-pixel teacher is at chance, 50 % on two classes: that warning stands)
        assert not any("label.images" in w for w in summary.get("warnings", [])) and "label.images" not in results_md
        return
    said = [w for w in summary.get("warnings", []) if "label.images" in w]
    assert len(said) == 1 and expected in said[0], summary.get("warnings")
    assert results_md.startswith("**WARNING:**") and expected in results_md.split("|")[0]
    assert expected in caplog.text


def test_copies_of_test_pictures_under_their_file_names_are_warned_about():
    """coco8-pose's train images 36 and 49 are re-encoded copies of coco8's val images of the same names: as
    unlabeled images beside coco8 val as test they would be pseudo-labelled and then scored. Same-named files of
    different pictures (coco8 train against val share no name; folders of 00.png, 01.png ...) are not warned about."""
    from ddkit.engine.data import build_data

    def part(root, split):
        return {"dataset": {"name": "yolo", "root": str(root), "split": split}}

    splits = build_data({"train": part(COCO8, "train"), "unlabeled": part(COCO8.parent / "coco8-pose", "train"),
                         "test": part(COCO8, "val")})
    assert len(splits.warnings) == 1, splits.warnings
    assert "data.unlabeled and data.test hold 2 copies of one picture under one file name" in splits.warnings[0]
    assert "000000000036.jpg" in splits.warnings[0]


def test_a_yolo_export_of_images_made_in_memory_is_refused_before_anything_is_written(tmp_path):
    """Generated shapes have no image files for a YOLO dataset: refused when the recipe is checked (it failed after
    the teacher trained and the labelling ran, in developer words)."""
    from ddkit.engine.run import Runner

    recipe = Path(__file__).resolve().parents[1] / "configs" / "synthetic_det_dd.yaml"
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="label.format: both writes a YOLO dataset of image files, but the "
                                          "unlabeled images are made in memory"):
        Runner(load_config(recipe, ["label.format=both", f"run.out_dir={out}"]), source=str(recipe))
    assert not out.exists()
