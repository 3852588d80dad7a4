"""Contract checks for models (kind ``models``): each builds for its task from a :class:`DatasetInfo` and runs.

    from ddkit.testing.models import check_model, info_for_task
"""
from __future__ import annotations

from typing import Any

import torch

from ddkit.registry import Entry
from ddkit.types import DatasetInfo


def info_for_task(task: str, num_classes: int = 3, num_keypoints: int = 5, image_shape=(1, 16, 16)) -> DatasetInfo:
    """A small DatasetInfo for building a model of ``task`` (classification ids 0..C-1, detection 1..C)."""
    if task == "classification":
        return DatasetInfo([{"id": i, "name": f"c{i}"} for i in range(num_classes)],
                           extra={"image_shape": list(image_shape)})
    cats = [{"id": i + 1, "name": f"c{i}"} for i in range(num_classes)]
    if task == "keypoints":
        flip = list(range(num_keypoints))
        return DatasetInfo(cats, num_keypoints=num_keypoints, flip_indices=flip, keypoint_sigmas=[0.05] * num_keypoints)
    return DatasetInfo(cats)


CONTRACT_CLASSES = 5


def check_model(entry: Entry, block: dict[str, Any] | None = None, registry: Any = None) -> torch.nn.Module:
    """Build ``entry`` through its task and run one forward pass (eval mode) on a small input."""
    from ddkit.plugin_manager import get_registry

    registry = registry or get_registry()
    spec = entry.spec
    task = registry.build("tasks", {"name": spec.task})
    # 5 classes, not the 3 of info_for_task's default: a head hard-coded to some count fails here
    info = info_for_task(spec.task, num_classes=CONTRACT_CLASSES,
                         image_shape=(3, 32, 32) if spec.name == "timm" else (1, 16, 16))
    model = task.build_model({"name": spec.name, **(block or {})}, info)
    assert isinstance(model, torch.nn.Module)
    assert any(p.requires_grad for p in model.parameters()), f"model {spec.name!r} has no trainable parameters"
    model.eval()
    with torch.no_grad():
        if spec.task == "classification":
            x = torch.rand(2, *info.extra["image_shape"])
            out = model(x)
            assert out.shape == (2, info.num_classes), f"model {spec.name!r}: logits {tuple(out.shape)} != (2, C)"
        else:
            preds = task.predict(model, [torch.rand(3, 48, 64)])
            assert len(preds) == 1 and preds[0].boxes.shape[1] == 4
            if spec.task == "keypoints":
                assert preds[0].keypoints is not None and preds[0].keypoints.shape[1:] == (info.num_keypoints, 3)
    return model
