"""The hint's object region (``imitate: objects``): box masks against a cell-by-cell reference, and the masked hint
on a detector's FPN against a hand computation."""
from __future__ import annotations

import random

import pytest
import torch

import ddkit
from ddkit import ConfigError
from ddkit.engine.task import SetupContext
from ddkit.testing.losses import TINY_RETINANET, toy_classification, toy_detection
from ddkit_plugins.feature_masks import box_mask

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_mask(boxes, image_size, feature_size):
    """Cell by cell: 1 where the cell's pixel rectangle and a box overlap with positive area."""
    (height, width), (h, w) = image_size, feature_size
    sy, sx = height / h, width / w
    out = torch.zeros(len(boxes), 1, h, w)
    for i, image_boxes in enumerate(boxes):
        for x1, y1, x2, y2 in image_boxes.tolist():
            for r in range(h):
                for c in range(w):
                    if x1 < (c + 1) * sx and x2 > c * sx and y1 < (r + 1) * sy and y2 > r * sy:
                        out[i, 0, r, c] = 1.0
    return out


@pytest.mark.parametrize("seed", range(5))
def test_box_mask_matches_the_cell_by_cell_reference(seed):
    rng = random.Random(seed)
    image_size = (rng.choice([64, 96, 128]), rng.choice([64, 100, 128]))
    feature_size = (rng.randint(1, 33), rng.randint(1, 33))
    boxes = []
    for _ in range(3):
        rows = []
        for _ in range(rng.randint(0, 4)):
            x1, y1 = rng.uniform(0, image_size[1] - 1), rng.uniform(0, image_size[0] - 1)
            rows.append([x1, y1, rng.uniform(x1 + 0.5, image_size[1]), rng.uniform(y1 + 0.5, image_size[0])])
        boxes.append(torch.tensor(rows).view(-1, 4))
    assert torch.equal(box_mask(boxes, image_size, feature_size), reference_mask(boxes, image_size, feature_size))


def test_a_box_smaller_than_a_cell_still_marks_its_cell():
    mask = box_mask([torch.tensor([[33.0, 40.0, 33.0, 40.0]])], (64, 64), (4, 4))  # zero area, on a cell border
    assert mask.sum() == 1 and mask[0, 0, 2, 2] == 1


def test_the_masked_hint_averages_the_object_cells_of_every_fpn_level():
    task, student, teacher, batch = toy_detection(TINY_RETINANET)
    wide = task.build_model({**TINY_RETINANET, "backbone": "resnet18"}, ddkit.build(
        "datasets", {"name": "synthetic_shapes", "num_images": 2, "image_size": 64}).info).eval()
    hint = ddkit.build("losses", {"name": "hint", "teacher_layer": "backbone", "student_layer": "backbone",
                                  "imitate": "objects"})
    adapter = hint.setup(SetupContext(task, student, wide, batch, torch.device("cpu"), 10))
    student.train()
    task.training_forward(student, batch)
    with torch.no_grad():
        task.feature_forward(wide, batch)
        images, targets = student.transform(list(batch["images"]), [dict(t) for t in batch["targets"]])
        padded = tuple(images.tensors.shape[-2:])
        boxes = [t["boxes"] for t in targets]
        expected, covered = [], []
        for s, t in zip(hint.student_hook.get(), hint.teacher_hook.get()):
            mask = reference_mask(boxes, padded, tuple(t.shape[-2:]))
            covered.append(float(mask.mean()))
            expected.append(float(((adapter(s) - t) ** 2 * mask).sum() / (mask.sum() * t.shape[1])))
    assert all(b.numel() for b in boxes) and len(expected) == 5
    assert 0 < covered[0] < 1  # the finest level: the objects cover part of the map, not all of it
    value = float(hint.compute(None).detach())
    assert value == pytest.approx(sum(expected) / 5, rel=1e-5)
    hint.close()
    assert not student.transform._forward_hooks


def test_objects_needs_a_detector():
    task, student, teacher, batch = toy_classification()
    hint = ddkit.build("losses", {"name": "hint", "teacher_layer": "1", "student_layer": "1", "imitate": "objects"})
    with pytest.raises(ConfigError, match="imitate: all"):
        hint.setup(SetupContext(task, student, teacher, batch, torch.device("cpu"), 10))
