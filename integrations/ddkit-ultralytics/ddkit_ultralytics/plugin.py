"""The ``ddkit`` entry point of this package: one model, ``yolo``, for the ``detection`` and ``keypoints`` tasks, and
one loss term, ``yolo_kd`` (soft class targets from a YOLO teacher, :mod:`ddkit_ultralytics.kd`)."""
from __future__ import annotations

from typing import Any

from ddkit import hookimpl
from ddkit.types import LossSpec, ModelSpec
from ddkit_ultralytics.build import YoloParams
from ddkit_ultralytics.kd import YoloKD, YoloKDParams

# A tiny network (an eighth of yolov8n's width) at 64 px: what the contract tests build.
TINY = {"cfg": "yolov8n.yaml", "imgsz": 64, "width": 0.125}


def _build(**kwargs: Any):
    from ddkit_ultralytics.build import build_yolo  # Ultralytics is imported when a model is built, not before

    return build_yolo(**kwargs)


def _explain_file(path: Any) -> str | None:
    from ddkit_ultralytics.build import explain_file

    return explain_file(path)


def _open_file(path: Any) -> Any:
    from ddkit_ultralytics.build import open_file

    return open_file(path)


def _export_hint(source: str) -> str:
    return f"for ultralytics.YOLO() use: ddkit-yolo-export {source} OUT.pt (this file is ddkit's format)"


@hookimpl
def ddkit_models():
    yield ModelSpec(name="yolo", factory=_build, params=YoloParams, task="detection", also_tasks=("keypoints",),
                    summary="Ultralytics YOLO (v8/11/26 yaml; a -pose cfg for keypoints) with Ultralytics' losses",
                    examples=(TINY,), explain_file=_explain_file, export_hint=_export_hint,
                    open_file=_open_file)


@hookimpl
def ddkit_losses():
    yield LossSpec(name="yolo_kd", factory=YoloKD, params=YoloKDParams,
                   summary="YOLO KD: per-anchor soft class targets from a YOLO teacher (Bernoulli KL at T)")
