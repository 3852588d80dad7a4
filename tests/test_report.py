"""The static HTML report of a run folder (ddkit.engine.report)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from ddkit.engine import report as rep
from ddkit.engine.report import read_metrics, write_report
from ddkit.types import DatasetInfo

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HEADINGS = ("Results", "Training curves", "Pseudo-labels: thresholds and instance counts",
            "Pseudo-label quality (hidden labels)", "Pseudo-labelled images")
DET_CATS = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "triangle"}]


# ------------------------------------------------------------------------------------------------ fixtures
def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


def _write_metrics(stage: Path, terms: dict[str, float], metric: str, start: float) -> None:
    """What train_model appends: training logs, evaluations, the final record (and a torn last line)."""
    stage.mkdir(parents=True, exist_ok=True)
    lines = []
    for it in range(50, 501, 50):
        losses = {k: v * 30 / (it + 30) for k, v in terms.items()}
        lines.append({"iteration": it, "lr": 0.02, "loss": sum(losses.values()), "losses": losses,
                      "samples_per_s": 812.5})
        if it % 250 == 0:
            lines.append({"iteration": it, "eval": {metric: start + it / 2000, "AP50": 0.8}})
    lines.append({"iteration": 500, "final": True, "eval": {metric: start + 0.25, "AP50": 0.8},
                  "train_time_s": 12.3})
    stage.joinpath("metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"iteration": 5')


def _summary(cats, thresholds, labeled, pseudo) -> dict:
    n = 40
    per_cat = [{"id": c["id"], "name": c["name"], "threshold": t, "labeled_per_image": lab,
                "pseudo_per_image": p, "predicted_per_image": p * 1.5, "pseudo": int(round(p * n))}
               for c, t, lab, p in zip(cats, thresholds, labeled, pseudo)]
    return {"images": {"unlabeled": n, "labelled": n, "skipped": 0, "without_pseudo_labels": 3},
            "instances_per_image": {"labeled": sum(labeled), "pseudo": sum(pseudo), "aggregated": 1.5 * sum(pseudo)},
            "pseudo_labels": sum(c["pseudo"] for c in per_cat),
            "thresholds": {"rule": "count_match",
                           "score": {str(c["id"]): t for c, t in zip(cats, thresholds)}},
            "per_category": per_cat, "num_shards": 1, "pseudo_labels_file": "pseudo_labels.json"}


class ShapesImages(torch.utils.data.Dataset):
    """Small synthetic RGB images, each with a coloured rectangle; targets hold only image_id (unlabeled)."""

    def __init__(self, n: int = 3, h: int = 48, w: int = 64):
        self.n, self.h, self.w = n, h, w

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        img = torch.full((3, self.h, self.w), 0.15)
        img[i % 3, 8 + 2 * i:30, 10:40] = 0.9
        return img, {"image_id": 101 + i}


def _det_pseudo(keypoints: bool = False) -> dict:
    images = [{"id": 101 + i, "file_name": f"missing_{i}.png", "height": 48, "width": 64, "ddkit_index": i}
              for i in range(3)]
    images[2]["ddkit_index"] = 0  # stale index: the image must be found by its image_id
    anns = []
    for i in range(3):
        for j in range(i + 1):
            ann = {"id": len(anns) + 1, "image_id": 101 + i, "category_id": 1 + j, "bbox": [10 + 5 * j, 8, 30, 22],
                   "area": 660.0, "iscrowd": 0, "score": 0.9 - 0.1 * j}
            if keypoints:
                ann["keypoints"] = [12 + 5 * j, 10, 2, 30, 20, 2, 0, 0, 0]
                ann["num_keypoints"] = 2
            anns.append(ann)
    cats = [dict(c, keypoints=["a", "b", "c"], skeleton=[[1, 2], [2, 3]]) if keypoints else c for c in DET_CATS]
    return {"info": {"task": "keypoints" if keypoints else "detection", "image_root": None,
                     "dataset_info": {"num_keypoints": 3 if keypoints else None}},
            "licenses": [], "categories": cats, "images": images, "annotations": anns}


def _det_results() -> dict:
    return {"task": "detection", "metric": "AP", "rows": [
        {"model": "teacher", "stage": "teacher", "AP": 41.234, "AP50": 70.5, "iterations": 500},
        {"model": "baseline (labeled only)", "stage": "baseline", "AP": 30.5, "AP50": 60.25, "iterations": 500},
        {"model": "student <b>&</b>", "stage": "student", "AP": 35.75, "AP50": 64.0, "iterations": 750},
        {"model": "fully labeled", "stage": "full", "AP": 40.0, "AP50": 69.0, "iterations": 500}],
        "gap_closed": 0.5543, "tta": {"teacher": {"single": 41.234, "ensemble": 43.5}}}


@pytest.fixture
def det_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    _write_metrics(run / "teacher", {"classifier": 0.7, "box_reg": 0.5, "objectness": 0.2}, "AP", 0.2)
    _write_metrics(run / "student", {"hard_label": 1.2, "soft_target": 0.6}, "AP", 0.15)
    _write_json(run / "label" / "summary.json", _summary(DET_CATS, [0.61, 0.55, None], [1.2, 0.8, 0.4],
                                                         [1.0, 0.7, 0.1]))
    _write_json(run / "label" / "quality.json", {
        "single": {"AP": 0.5012, "AP50": 0.71, "AP75": 0.52, "AR@100": 0.6, "precision": 0.8, "recall": 0.55,
                   "selected": 80, "ground_truth": 96},
        "ensemble": {"AP": 0.6123, "AP50": 0.8, "AP75": 0.6, "AR@100": 0.7, "precision": 0.87, "recall": 0.66,
                     "selected": 78, "ground_truth": 96},
        "single_thresholds": {"rule": "count_match"}, "views": ["identity", "hflip"]})
    _write_json(run / "label" / "pseudo_labels.json", _det_pseudo())
    # a second round: only a summary
    _write_json(run / "label_r2" / "summary.json", _summary(DET_CATS, [0.5, 0.5, 0.45], [1.2, 0.8, 0.4],
                                                            [1.1, 0.75, 0.3]))
    return run


# ------------------------------------------------------------------------------------------------ helpers
def _img_srcs(html_text: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', html_text)


def _check_png(path: Path) -> None:
    import matplotlib.image as mpimg

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 3000, (path, len(data))
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100, (path, pixels.shape)
    assert float(pixels[..., :3].var()) > 1e-3, f"{path} looks blank"


def _check_images(run: Path, html_text: str) -> list[str]:
    srcs = _img_srcs(html_text)
    for src in srcs:
        assert not src.startswith(("/", "http")), src  # relative links only
        _check_png(run / src)
    return srcs


# ------------------------------------------------------------------------------------------------ tests
def test_detection_report(det_run: Path):
    info = DatasetInfo(categories=[dict(c) for c in DET_CATS])
    path = write_report(det_run, _det_results(), info, task_name="detection", unlabeled=ShapesImages())
    assert path == det_run / "report.html"
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>")
    for h in HEADINGS:
        assert f"<h2>{h}</h2>" in text, h
    # results table: every row key a column, floats formatted by column, text escaped
    for col in ("model", "stage", "AP", "AP50", "iterations"):
        assert f">{col}</th>" in text, col
    for value in ("41.23", "30.50", "35.75", "70.50", "750", "0.554", "43.50"):
        assert f">{value}<" in text, value
    assert "student &lt;b&gt;&amp;&lt;/b&gt;" in text and "student <b>&</b>" not in text
    # training stages, labels (both rounds), quality values
    assert ">teacher</td>" in text and ">student</td>" in text
    assert "last eval AP" in text
    assert "<h3>label</h3>" in text and "<h3>label_r2</h3>" in text
    for value in (">circle<", ">triangle<", ">0.6100<", ">0.6123<", ">0.5012<", "multi-transform ensemble"):
        assert value in text, value
    assert "3 of 3 images" in text
    # self-contained: no scripts, no external resources
    assert "<script" not in text and "http://" not in text and "https://" not in text
    srcs = _check_images(det_run, text)
    assert sorted(srcs) == sorted(f"plots/{n}" for n in (
        "results.png", "training_curves.png", "label_summary.png", "label_summary_label_r2.png", "quality.png",
        "pseudo_labels.png"))
    assert not any(p.name.endswith(".tmp") for p in det_run.rglob("*"))


def test_pseudo_labels_from_files_without_dataset(tmp_path: Path):
    """Without the unlabeled dataset the images come from the files the JSON names (here: 2 of the 3 exist)."""
    from PIL import Image

    run = tmp_path / "files"
    data = _det_pseudo()
    _write_json(run / "label" / "pseudo_labels.json", data)
    for i, im in enumerate(data["images"][:2]):
        arr = (ShapesImages()[i][0] * 255).byte().permute(1, 2, 0).numpy()
        Image.fromarray(arr).save(run / "label" / im["file_name"])
    text = write_report(run, {}, None, task_name="detection").read_text()
    assert "2 of 3 images" in text
    assert "No result rows" in text
    assert _check_images(run, text) == ["plots/pseudo_labels.png"]


def test_draw_instances_boxes_and_keypoints():
    img = torch.zeros(3, 300, 300)
    anns = [{"image_id": 1, "category_id": 2, "bbox": [50, 60, 100, 80], "score": 0.9,
             "keypoints": [200, 250, 2, 260, 250, 2, 0, 0, 0]}]
    from ddkit.engine.draw import draw_instances

    out = draw_instances(img, anns, {2: "square"}, {2: "#00ff00"}, [(0, 1), (1, 2)])
    assert out.dtype == torch.uint8 and out.shape == (3, 300, 300)
    assert out[:, 100, 50].tolist() == [0, 255, 0]       # left edge of the box, in the category's colour
    assert out[:, 100, 100].tolist() == [0, 0, 0]        # inside is not filled
    assert out[:, 250, 230].tolist() == [255, 255, 255]  # the skeleton line between the two visible keypoints
    assert out[:, 250, 200].tolist() == [0, 255, 0]      # a keypoint, drawn on top of the line
    assert out[:, 250, 100].tolist() == [0, 0, 0]        # no line to the invisible keypoint (0, 0)
    assert out[:, 20, 20].tolist() == [0, 0, 0]          # the invisible (0, 0) keypoint is not drawn
    assert int(out[:, 20:290, 20:290].sum()) > 0


def test_image_finder_matches_image_id():
    finder = rep._ImageFinder(ShapesImages(), [])
    img = finder({"id": 103, "ddkit_index": 0, "file_name": "nope.png"})  # wrong index hint
    assert torch.equal(img, ShapesImages()[2][0])
    assert finder({"id": 999, "file_name": "nope.png"}) is None


def test_keypoints_report(tmp_path: Path):
    run = tmp_path / "kp"
    _write_json(run / "label" / "pseudo_labels.json", _det_pseudo(keypoints=True))
    results = {"task": "keypoints", "metric": "AP", "rows": [{"model": "teacher", "AP": 12.5}]}
    text = write_report(run, results, None, task_name="keypoints", unlabeled=ShapesImages()).read_text()
    assert "3 of 3 images" in text
    assert "No summary: label/summary.json is missing" in text
    assert sorted(_check_images(run, text)) == ["plots/pseudo_labels.png", "plots/results.png"]


def test_partial_run_folder(tmp_path: Path):
    run = tmp_path / "partial"
    results = {"task": "classification", "metric": "error",
               "rows": [{"model": "teacher", "stage": "teacher", "error": 2.8, "accuracy": 97.2},
                        {"model": r"student $\notacommand{$ 5", "error": 3.1, "accuracy": None}]}  # not mathtext
    text = write_report(run, results).read_text()
    for h in HEADINGS:
        assert f"<h2>{h}</h2>" in text, h
    assert ">2.800<" in text and ">97.20<" in text and ">-<" in text and "notacommand" in text
    assert "could not be drawn" not in text
    assert "No training curves" in text
    assert "No label stage" in text
    assert "No pseudo-label quality" in text
    assert "No pseudo-labelled images" in text
    assert _check_images(run, text) == ["plots/results.png"]
    # broken files: unreadable summary, pseudo-labels without any reachable image, an empty metrics file
    _write_json(run / "teacher" / "metrics.jsonl", {})
    (run / "teacher" / "metrics.jsonl").write_text("not json\n")
    (run / "label").mkdir()
    (run / "label" / "summary.json").write_text("{torn")
    _write_json(run / "label" / "pseudo_labels.json", _det_pseudo())
    text = write_report(run, {}, task_name="detection").read_text()
    assert "No training curves" in text
    assert "No summary: label/summary.json is missing or unreadable" in text
    assert "No images drawn for label" in text
    assert _img_srcs(text) == []


def test_classification_report(tmp_path: Path):
    run = tmp_path / "cls"
    cats = [{"id": i, "name": f"digit {i}"} for i in range(3)]
    _write_metrics(run / "teacher", {"hard_label": 2.0}, "accuracy", 0.6)
    _write_metrics(run / "student", {"hard_label": 1.5, "soft_target": 4.0}, "accuracy", 0.5)
    _write_json(run / "label" / "summary.json", _summary(cats, [0.9, 0.8, 0.7], [1 / 3] * 3, [0.3, 0.25, 0.2]))
    _write_json(run / "label" / "quality.json", {
        "single": {"accuracy": 0.91, "images": 40, "selected": 30, "coverage": 0.75, "selected_accuracy": 0.95},
        "ensemble": {"accuracy": 0.93, "images": 40, "selected": 31, "coverage": 0.775,
                     "selected_accuracy": 0.9677}})
    g = torch.Generator().manual_seed(0)
    digits = [(torch.rand(1, 28, 28, generator=g), {"image_id": 500 + i}) for i in range(8)]
    _write_json(run / "label" / "pseudo_labels.json", {
        "ddkit_format": "image-labels", "info": {}, "licenses": [], "categories": cats,
        "images": [{"id": 500 + i, "file_name": str(i), "height": 28, "width": 28, "ddkit_index": i}
                   for i in range(0, 8, 2)],
        "annotations": [{"id": k + 1, "image_id": 500 + i, "category_id": k % 3, "score": 0.9}
                        for k, i in enumerate(range(0, 8, 2))]})
    results = {"task": "classification", "metric": "error", "rows": [
        {"model": "teacher", "stage": "teacher", "error": 2.8, "accuracy": 97.2},
        {"model": "baseline (labeled only)", "stage": "baseline", "error": 5.25, "accuracy": 94.75},
        {"model": "student (data distillation)", "stage": "student", "error": 3.5, "accuracy": 96.5},
        {"model": "fully labeled", "stage": "full", "error": 1.9, "accuracy": 98.1}], "gap_closed": 0.52}
    info = DatasetInfo(categories=cats)
    text = write_report(run, results, info, task_name="classification", unlabeled=digits).read_text()
    for value in (">2.800<", ">5.250<", ">94.75<", ">0.520<", ">0.9677<", ">digit 2<", "4 of 4 images",
                  "last eval accuracy"):
        assert value in text, value
    assert sorted(_check_images(run, text)) == [f"plots/{n}.png" for n in (
        "label_summary", "pseudo_labels", "quality", "results", "training_curves")]


def test_read_metrics(tmp_path: Path):
    _write_metrics(tmp_path, {"a": 1.0, "b": 2.0}, "AP", 0.1)
    with open(tmp_path / "metrics.jsonl", "a") as fh:  # a resumed run rewrote iteration 100
        fh.write('\n{"iteration": 100, "lr": 0.1, "loss": 7.0, "losses": {"a": 7.0}}\n')
    train, evals = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in train] == list(range(50, 501, 50))
    assert next(r for r in train if r["iteration"] == 100)["loss"] == 7.0
    assert [r["iteration"] for r in evals] == [250, 500]
    assert not any(r.get("final") for r in evals)
    assert read_metrics(tmp_path / "missing.jsonl") == ([], [])


@pytest.mark.parametrize("value, text", [
    (None, "-"), (3, "3"), (True, "true"), (0.0, "0"), (2.8, "2.800"), (97.25, "97.25"), (17781.84, "17,782"),
    (0.55231, "0.5523"), (1.5e-5, "1.5e-05"), (float("nan"), "nan"), ({"a": 0.5}, "a: 0.5000"), ([1, 2], "1, 2"),
])
def test_fmt_value(value, text):
    assert rep.fmt_value(value) == text


# ------------------------------------------------------------------------------------------- plots users can read
def test_a_run_that_logged_one_point_gets_a_note_not_an_empty_plot(tmp_path: Path):
    run = tmp_path / "short"
    (run / "teacher").mkdir(parents=True)
    (run / "teacher" / "metrics.jsonl").write_text(json.dumps(
        {"iteration": 5, "lr": 0.1, "loss": 1.5, "losses": {"hard_label": 1.5}}) + "\n" + json.dumps(
        {"iteration": 5, "final": True, "eval": {"error": 0.25}}) + "\n")
    text = write_report(run, {}, None).read_text()
    assert "no curve to draw" in text
    from ddkit.engine.report import PLOTS_DIR
    assert not (run / PLOTS_DIR / "training_curves.png").exists() and "training_curves.png" not in text


def test_error_is_drawn_in_percent_from_zero_and_every_loss_term_is_drawn():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ddkit.engine.report import _loss_panel, _metric_panel

    train = [{"iteration": i, "loss": 3.0 / i, "losses": {"hard_label": 2.0 / i, "soft_target": 1.0 / i}}
             for i in (10, 20)]
    evals = [{"iteration": 10, "eval": {"error": 0.031}}, {"iteration": 20, "eval": {"error": 0.025}}]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2)
    _loss_panel(ax_loss, [("student", train, evals)], ["C0"])
    labels = [ln.get_label() for ln in ax_loss.get_lines()]
    assert labels == ["student: loss", "student: hard_label", "student: soft_target"]
    assert all(ln.get_marker() not in (None, "None", "") for ln in ax_loss.get_lines())  # 2 points: markers
    _metric_panel(ax_metric, [("student", train, evals)], ["C0"], "error")
    assert list(ax_metric.get_lines()[0].get_ydata()) == pytest.approx([3.1, 2.5])
    assert ax_metric.get_ylabel() == "error %" and ax_metric.get_ylim()[0] == 0
    plt.close(fig)


def test_kd_lines_are_worded_as_results_md_words_them(tmp_path: Path):
    """The relative error cut in %, the AP gain in AP points, as results.md: not a bare fraction under a key."""
    results = {"task": "classification", "metric": "error",
               "rows": [{"model": "student alone", "stage": "kd_alone", "error %": 5.0}],
               "kd_relative_error_reduction": {"kd_soft": 0.3, "kd_hint": -0.62},
               "kd_ap_gain": {"kd_detector_kd": -0.04}}
    text = write_report(tmp_path / "kd", results).read_text()
    assert "kd_soft: <b>30 %</b> relative error reduction" in text
    assert "kd_detector_kd: <b>-0.04 AP</b> over the student alone" in text and "0.3000" not in text
    # a student worse than alone has more error, not a "-62 % reduction", in both files
    assert "kd_hint: <b>62 %</b> more error than the student alone" in text and "-62" not in text
    from ddkit.engine.run import results_markdown

    md = results_markdown(results)
    assert "kd_soft: 30 % relative error reduction over the student alone" in md
    assert "kd_hint: 62 % more error than the student alone" in md and "-62" not in md
