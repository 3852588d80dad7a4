"""Multi-scale inference: a scale view's size must reach the detector's backbone, not be resized away."""
from __future__ import annotations

import torch

from ddkit import get_registry


def test_detector_runs_at_the_views_own_size_when_asked():
    registry = get_registry()
    task = registry.build("tasks", {"name": "detection"})
    data = registry.build("datasets", {"name": "synthetic_shapes", "num_images": 2, "image_size": 64,
                                       "num_classes": 2, "max_objects": 1})
    model = task.build_model({"name": "fasterrcnn", "backbone": "tiny", "min_size": 64, "max_size": 64}, data.info)
    seen = []
    model.backbone.register_forward_hook(lambda m, inp, out: seen.append(tuple(inp[0].shape[-2:])))
    big = torch.rand(3, 128, 96)
    small = torch.rand(3, 64, 64)
    task.predict(model, [big, small])
    assert seen == [(64, 64)]  # both resized to min_size 64 (96 -> 48 padded to 64 by the batch's size divisor)
    seen.clear()
    preds = task.predict(model, [big, small], native_size=True)
    assert sorted(seen) == [(64, 64), (128, 96)]
    assert model.transform.min_size == (64,) and model.transform.max_size == 64  # restored
    assert [p.image_size for p in preds] == [(128, 96), (64, 64)]
