"""Contract checks for tasks (kind ``tasks``): the :class:`~ddkit.engine.task.Task` protocol on real data.

    from ddkit.testing.tasks import check_task
    check_task(task, dataset, {"name": "mlp", "hidden": [16]})
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from ddkit.engine.task import KeypointTask, Task, TrainOutputs, model_info
from ddkit.types import Instances

TASK_METHODS = ("config", "build_model", "collate", "to_device", "training_forward", "loss", "feature_forward",
                "predict", "evaluate", "evaluate_predictions", "hflip")


def check_task(task: Any, dataset: Any, model_cfg: Mapping[str, Any], batch: int = 2) -> dict[str, float]:
    """Build a model, take one training step, predict and evaluate; return the metrics."""
    for name in TASK_METHODS:
        assert callable(getattr(task, name, None)), f"task {type(task).__name__} lacks {name}()"
    assert isinstance(task, Task)
    assert task.prediction_type in ("probs", "instances")
    cfg = task.config()
    assert isinstance(cfg, dict) and cfg.get("name") == task.name
    model = task.build_model(model_cfg, dataset.info)
    m_cfg, info, t_cfg = model_info(model)
    assert m_cfg["name"] == model_cfg["name"] and info is dataset.info and t_cfg == cfg

    samples = [dataset[i] for i in range(min(batch, len(dataset)))]
    b = task.collate(samples)
    assert "images" in b and "targets" in b and "index" in b
    model.train()
    out = task.training_forward(model, b)
    assert isinstance(out, TrainOutputs) and out.losses
    total = sum(out.losses.values())
    assert torch.isfinite(total), f"non-finite loss {out.losses}"
    total.backward()
    assert any(p.grad is not None for p in model.parameters()), "the loss gives no gradient"

    preds = task.predict(model, [s[0] for s in samples])
    assert len(preds) == len(samples)
    if task.prediction_type == "probs":
        for p in preds:
            assert p.shape == (info.num_classes,) and math.isclose(float(p.sum()), 1.0, rel_tol=1e-4)
    else:
        ids = {int(c["id"]) for c in info.categories}
        for p, (image, _) in zip(preds, samples):
            assert isinstance(p, Instances) and p.image_size == tuple(image.shape[-2:])
            assert all(int(c) in ids for c in p.labels), "predicted labels must be dataset category ids"
    if isinstance(task, KeypointTask) and info.num_keypoints:
        rois = [torch.tensor([[2.0, 2.0, 30.0, 40.0]]) for _ in samples]
        maps = task.keypoint_heatmaps(model, [s[0] for s in samples], rois)
        assert len(maps) == len(samples) and maps[0].shape[:2] == (1, info.num_keypoints)
        kps = task.heatmaps_to_keypoints(maps, rois)
        assert kps[0].shape == (1, info.num_keypoints, 3)
        assert bool((kps[0][..., 0] >= 2.0 - 1e-3).all() and (kps[0][..., 0] <= 30.0 + 1e-3).all()), \
            "keypoints must fall inside their RoI"
    sub = _Head(dataset, len(samples))
    metrics = task.evaluate_predictions(preds, sub)
    assert metrics and all(isinstance(v, (int, float)) for v in metrics.values())
    return metrics


class _Head(torch.utils.data.Dataset):
    def __init__(self, dataset: Any, n: int):
        self.dataset, self.n, self.info = dataset, n, dataset.info

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.dataset[i]

    def get_target(self, i: int):
        from ddkit.engine.data import get_target

        return get_target(self.dataset, i)
