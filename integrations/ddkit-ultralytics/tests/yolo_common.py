"""Paths and tiny model blocks shared by this package's tests."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
DATA = REPO.parent / "shared" / "data"
# A tiny network at 64 px: an eighth of yolov8n's width (conf 0: untrained scores are ~1e-4).
TINY = {"name": "yolo", "cfg": "yolov8n.yaml", "imgsz": 64, "width": 0.125, "conf": 0.0, "max_det": 30}
TINY_POSE = {**TINY, "cfg": "yolov8n-pose.yaml"}
