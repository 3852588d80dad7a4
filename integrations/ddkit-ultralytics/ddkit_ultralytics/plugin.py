"""The ``ddkit`` entry point of this package: one model, ``yolo``, for the ``detection`` and ``keypoints`` tasks."""
from __future__ import annotations

from typing import Any

from ddkit import hookimpl
from ddkit.types import ModelSpec
from ddkit_ultralytics.build import YoloParams

# A tiny network (an eighth of yolov8n's width) at 64 px: what the contract tests build.
TINY = {"cfg": "yolov8n.yaml", "imgsz": 64, "width": 0.125}


def _build(**kwargs: Any):
    from ddkit_ultralytics.build import build_yolo  # Ultralytics is imported when a model is built, not before

    return build_yolo(**kwargs)


@hookimpl
def ddkit_models():
    yield ModelSpec(name="yolo", factory=_build, params=YoloParams, task="detection", also_tasks=("keypoints",),
                    summary="Ultralytics YOLO (v8/11/26 yaml; a -pose cfg for keypoints) with Ultralytics' losses",
                    examples=(TINY,))
