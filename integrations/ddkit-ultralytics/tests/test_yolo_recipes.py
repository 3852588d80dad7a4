"""`ddkit run` on the shipped YOLO recipes with tiny settings: pseudo-labels in COCO format and a report."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from yolo_common import DATA, REPO
from ddkit.config import load_config
from ddkit.engine.run import run_recipe

TINY_TRAIN = "{iterations: 4, batch_size: 2, optimizer: adamw, lr: 0.001, warmup: 0, hflip: 0.5, log_every: 2}"


def _overrides(out: Path, data: str, cfg: str) -> list[str]:
    root = str(DATA / data)
    ds = "{{name: yolo, root: {root}, split: {split}}}"
    return [f"run.out_dir={out}", "run.device=cpu",
            f"data.train.dataset={ds.format(root=root, split='train')}",
            f"data.unlabeled.dataset={ds.format(root=root, split='val')}",
            f"data.test.dataset={ds.format(root=root, split='val')}",
            # conf 0: an untrained tiny network scores every box ~1e-4; the selector still gets candidates
            f"teacher.model={{name: yolo, cfg: {cfg}, imgsz: 64, width: 0.125, conf: 0.0, max_det: 30}}",
            f"student.model={{name: yolo, cfg: {cfg}, imgsz: 64, width: 0.125, conf: 0.0, max_det: 30}}",
            f"teacher.train={TINY_TRAIN}", f"student.train={TINY_TRAIN}",
            "label.transforms=[{name: identity}, {name: hflip}]", "label.batch_size=4",
            # 4 untrained iterations rarely hit the labeled images' categories: count over all categories
            "label.selector={name: count_match, per_category: false}"]


def _check_run(result: dict, out: Path, keypoints: bool) -> None:
    for stage in ("teacher", "label", "student", "baseline_labeled"):
        assert (out / stage / "stage.json").is_file(), stage
    pseudo = json.loads((out / "label" / "pseudo_labels.json").read_text())
    assert len(pseudo["images"]) == 4 and pseudo["categories"]
    assert pseudo["annotations"], "count matching selects some of the teacher's boxes"
    for ann in pseudo["annotations"]:
        assert len(ann["bbox"]) == 4 and ann["bbox"][2] >= 0
        assert ("keypoints" in ann) == keypoints
        if keypoints:
            assert len(ann["keypoints"]) == 17 * 3
    assert (out / "report.html").is_file() and (out / "results.json").is_file()
    assert result["run_dir"] == str(out) or Path(result["run_dir"]) == out
    _check_yolo_labels(out / "label" / "yolo", pseudo)


def _check_yolo_labels(out: Path, pseudo: dict) -> None:
    """``label.format: both``: the YOLO-format copy of the pseudo-labels reads back (ddkit's own yolo dataset) as
    the same boxes and classes."""
    import ddkit

    back = ddkit.build("datasets", {"name": "yolo", "root": str(out), "split": "pseudo",
                                    "data_yaml": str(out / "data.yaml")})
    assert len(back) == len(pseudo["images"])
    by_name = {Path(im["file_name"]).name: im["id"] for im in pseudo["images"]}
    ids = [int(c["id"]) for c in pseudo["categories"]]
    for i in range(len(back)):
        target = back.get_target(i)
        name = Path(back.files[i]).name if hasattr(back, "files") else None
        image_id = by_name[name] if name else pseudo["images"][i]["id"]
        anns = [a for a in pseudo["annotations"] if a["image_id"] == image_id]
        assert len(target["boxes"]) == len(anns)
        for box, label, ann in zip(target["boxes"], target["labels"], anns):
            x, y, w, h = ann["bbox"]
            assert torch.allclose(box, torch.tensor([x, y, x + w, y + h]), atol=0.01)
            assert ids[int(label)] == ann["category_id"]


def test_yolo_det_recipe_runs_end_to_end(tmp_path):
    out = tmp_path / "det"
    cfg = load_config(REPO / "configs" / "yolo_det_dd.yaml", _overrides(out, "coco8", "yolov8n.yaml"))
    result = run_recipe(cfg, source="yolo_det_dd.yaml", progress=False)
    _check_run(result, out, keypoints=False)
    # the student continues in Ultralytics: the CLI writes a file YOLO() loads, with the dataset's class names
    from ultralytics import YOLO

    from ddkit_ultralytics.export import main

    assert main([str(out / "student" / "model.pt"), str(out / "student_yolo.pt")]) == 0
    yolo = YOLO(str(out / "student_yolo.pt"))
    assert yolo.task == "detect" and yolo.names[0] == "person"


def test_yolo_pose_recipe_runs_end_to_end_with_keypoint_fusion(tmp_path, capsys):
    out = tmp_path / "pose"
    cfg = load_config(REPO / "configs" / "yolo_pose_dd.yaml", _overrides(out, "coco8-pose", "yolov8n-pose.yaml"))
    assert cfg.label.aggregator.name == "keypoint_fusion"
    result = run_recipe(cfg, source="yolo_pose_dd.yaml", progress=False)
    _check_run(result, out, keypoints=True)
    pseudo = json.loads((out / "label" / "pseudo_labels.json").read_text())
    assert any(any(v == 2 for v in a["keypoints"][2::3]) for a in pseudo["annotations"])
    # ddkit-yolo-export takes the run folder itself (its final student, as `ddkit export` does): a pose model there
    from ultralytics import YOLO

    from ddkit.engine.checkpoint import load_model
    from ddkit_ultralytics.export import main

    assert main([str(out), str(out / "pose_yolo.pt")]) == 0
    assert f"student (stage student, {out / 'student' / 'model.pt'})" in capsys.readouterr().out
    yolo = YOLO(str(out / "pose_yolo.pt"))
    student = load_model(out / "student" / "model.pt")[1]
    assert yolo.task == "pose" and torch.equal(yolo.model.model[0].conv.weight, student.net.model[0].conv.weight)


def test_coco_recipe_resolves():
    """The GPU recipe: its sections validate, the label strategies build, and its model builds for COCO's 80
    classes (a yolov8s, not trained here)."""
    import ddkit
    from ddkit.config import validate_config
    from ddkit.engine.label import build_strategies, parse_label_config
    from ddkit.testing.models import info_for_task

    cfg = load_config(REPO / "configs" / "coco_yolo_dd.yaml")
    validate_config(cfg, ddkit.get_registry(), source="coco_yolo_dd.yaml")
    assert cfg.student.model == cfg.teacher.model and cfg.teacher.model.cfg == "yolov8s.yaml"
    task = ddkit.build("tasks", dict(cfg.task))
    info = info_for_task("detection", num_classes=80)
    strategies = build_strategies(parse_label_config(cfg.label), task, info)
    assert len(strategies.views) == 6 and strategies.aggregator_block["name"] == "wbf"
    from omegaconf import OmegaConf

    model = task.build_model(OmegaConf.to_container(cfg.teacher.model, resolve=True), info)
    assert model.imgsz == 640 and model.num_classes == 80
    assert 10e6 < sum(p.numel() for p in model.parameters()) < 12e6  # yolov8s: 11.2 M parameters at 80 classes


def test_the_yolo_kd_recipe_runs_end_to_end(tmp_path):
    """configs/synthetic_det_kd_yolo.yaml at tiny settings: every variant (soft class targets, + LD of the box
    bins, CWD on three neck levels) trains with its terms logged, and its AP gain over the student alone is
    reported."""
    cfg = load_config(REPO / "configs" / "synthetic_det_kd_yolo.yaml",
                      [f"run.out_dir={tmp_path}", "run.device=cpu", "data.dataset.num_images=8",
                       "data.dataset.image_size=64", "teacher.model.imgsz=64", "teacher.model.width=0.125",
                       "student.model.imgsz=64", f"teacher.train={TINY_TRAIN}"])
    summary = run_recipe(cfg, progress=False)
    variants = {"kd_yolo_kd", "kd_yolo_kd_ld", "kd_cwd"}
    assert {r["stage"] for r in summary["rows"]} == {"teacher", "kd_alone"} | variants
    assert set(summary["kd_ap_gain"]) == variants
    rows = [json.loads(line) for line in (tmp_path / "kd_cwd" / "metrics.jsonl").read_text().splitlines()]
    assert {"hint", "hint_1", "hint_2"} <= set(next(r["losses"] for r in rows if "losses" in r))
    assert '"yolo_kd"' in (tmp_path / "kd_yolo_kd_ld" / "metrics.jsonl").read_text()


def test_a_yolo_student_distils_on_a_transfer_set_of_the_teachers_boxes(tmp_path, monkeypatch):
    """The detection task labels the unlabeled images with the YOLO teacher's detections (``teacher_targets``, its
    own input pipeline) and the YOLO student's loss trains on them beside ``yolo_kd``."""
    from ddkit_plugins import tasks

    boxes: list[int] = []
    real = tasks.DetectionTask.teacher_targets

    def counting(self, teacher, batch):
        out = real(self, teacher, batch)
        boxes.extend(len(t["boxes"]) for t in out["targets"] if t.get("unlabeled"))
        return out

    monkeypatch.setattr(tasks.DetectionTask, "teacher_targets", counting)
    cfg = load_config(REPO / "configs" / "synthetic_det_kd_yolo.yaml",
                      [f"run.out_dir={tmp_path}", "run.device=cpu", "data.dataset.num_images=12",
                       "data.dataset.image_size=64", "teacher.model.imgsz=64", "teacher.model.width=0.125",
                       "student.model.imgsz=64", f"teacher.train={TINY_TRAIN}", "task.transfer_score=0.0",
                       "data.split.labeled=0.25", "data.split.unlabeled=0.5", "data.split.test=0.25",
                       "kd.variants.yolo_kd_ld=null", "kd.variants.cwd=null",
                       "kd.variants.yolo_kd.transfer_set=[labeled, unlabeled]"])
    summary = run_recipe(cfg, progress=False)
    assert set(summary["kd_ap_gain"]) == {"kd_yolo_kd"}
    assert boxes and sum(boxes) > 0  # the unlabeled images trained on the teacher's boxes
