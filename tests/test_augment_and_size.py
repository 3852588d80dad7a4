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


def test_shift_image_moves_pixels_and_zero_fills():
    from ddkit.engine.train import shift_image

    image = torch.arange(1, 13, dtype=torch.float32).view(1, 3, 4)
    out = shift_image(image, 1, -1)
    expected = torch.zeros(1, 3, 4)
    for y in range(3):
        for x in range(4):
            sy, sx = y + 1, x - 1  # out[y, x] = image[y - dy, x - dx]
            if 0 <= sy < 3 and 0 <= sx < 4:
                expected[0, y, x] = image[0, sy, sx]
    assert torch.equal(out, expected)
    assert torch.equal(shift_image(image, 0, 0), image)
    assert not shift_image(image, 4, 0).any()


def test_translate_is_asked_of_the_task_not_its_name():
    """``train.translate`` runs for a task that declares ``supports_translate`` (whatever its name) and is refused,
    naming the task, for one that does not (or does not say)."""
    import pytest

    from ddkit.engine.augment import Augment
    from ddkit.errors import ConfigError
    from ddkit.types import DatasetInfo

    class Shifty:  # a third-party task: any name
        name, supports_translate = "my_digits", True

    class Boxes:
        name, supports_translate = "classification", False  # a name never grants the capability

    class Silent:
        name = "old_plugin"

    info = DatasetInfo(categories=[{"id": 0, "name": "a"}])
    aug = Augment(Shifty(), info, hflip=0.0, translate=1, seed=0, rank=0)
    samples = [(torch.arange(1.0, 10.0).view(1, 3, 3), {"label": 0}) for _ in range(6)]
    out = aug(samples, it=0)
    assert all(t == {"label": 0} for _, t in out) and any(not torch.equal(o, s) for (o, _), (s, _) in zip(out, samples))
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(out, aug(samples, it=0)))  # a pure function of the step
    for task in (Boxes(), Silent()):
        with pytest.raises(ConfigError, match=f"task {task.name!r} does not support it; set translate: 0"):
            Augment(task, info, hflip=0.0, translate=1, seed=0, rank=0)
    Augment(Silent(), info, hflip=0.5, translate=0, seed=0, rank=0)  # no translate: nothing to ask
