"""ddkit-ultralytics: Ultralytics YOLO (detection and pose) as ddkit teachers and students.

Registered through the ``ddkit`` entry-point group like any third-party plugin::

    model: {name: yolo, cfg: yolov8n.yaml, imgsz: 640}          # task: detection
    model: {name: yolo, cfg: yolov8n-pose.yaml, imgsz: 640}     # task: keypoints

Ultralytics is AGPL-3.0; this package depends on it, ddkit's core does not.
"""
__all__ = ["build_yolo", "export_ultralytics"]


def __getattr__(name: str):  # lazy: importing the plugin must not import Ultralytics
    if name == "build_yolo":
        from ddkit_ultralytics.build import build_yolo

        return build_yolo
    if name == "export_ultralytics":
        from ddkit_ultralytics.export import export_ultralytics

        return export_ultralytics
    raise AttributeError(name)
