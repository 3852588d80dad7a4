"""Synthetic raw predictions with known ground truth, for ``ddkit bench`` without a teacher (``bench.synthetic``):
jittered per-view detections of generated boxes, or per-view class probabilities of a noisy classifier."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from ddkit.engine.coco_results import CocoGroundTruthBuilder
from ddkit.engine.raw_predictions import RawImage, RawPredictions
from ddkit.errors import ConfigError
from ddkit.types import Instances


def make_synthetic_detection(num_images: int = 40, num_views: int = 6, num_categories: int = 3, seed: int = 0,
                             max_objects: int = 6, box_jitter: float = 0.06, miss_rate: float = 0.15,
                             false_positives: float = 1.5, duplicate_rate: float = 0.2,
                             confusion_rate: float = 0.05) -> tuple[dict[str, Any], RawPredictions]:
    """Ground truth plus jittered per-view detections, as multi-transform inference of a noisy detector would give.

    Every object has an "easiness" ``e ~ U(0.3, 0.95)``; each view finds it with probability ``(1 - miss_rate)``
    scaled by ``0.5 + 0.5 e``, with score ``e`` plus noise, its box jittered by ``box_jitter`` x its size (plus a
    small per-view offset), sometimes a duplicate, sometimes the wrong class; each view adds Poisson
    ``false_positives`` random low-scoring boxes. Boxes are clipped to the image (they are synthetic).

    Returns:
        ``(gt, raw)``: a COCO ground-truth dict (category ids ``1..num_categories``) and the raw predictions, whose
        images also carry their ``target``.
    """
    g = torch.Generator().manual_seed(int(seed))
    rnd = _Draw(g)
    categories = [{"id": c, "name": f"class{c}"} for c in range(1, num_categories + 1)]
    gt = CocoGroundTruthBuilder(categories)
    images: list[RawImage] = []
    noise = dict(miss_rate=miss_rate, box_jitter=box_jitter, duplicate_rate=duplicate_rate,
                 confusion_rate=confusion_rate, false_positives=false_positives, num_categories=num_categories)
    for i in range(num_images):
        iid = i + 1
        H, W = rnd.randint(240, 480), rnd.randint(320, 640)
        n = rnd.randint(1, max_objects)
        wh = torch.stack([rnd.u(0.08, 0.45, n) * W, rnd.u(0.08, 0.45, n) * H], 1)
        xy = torch.stack([rnd.u(0, 1, n) * (W - wh[:, 0]), rnd.u(0, 1, n) * (H - wh[:, 1])], 1)
        gt_boxes = torch.cat([xy, xy + wh], 1)
        gt_labels = torch.randint(1, num_categories + 1, (n,), generator=g)
        easiness = rnd.u(0.3, 0.95, n)
        gt.add(iid, H, W, {"boxes": gt_boxes, "labels": gt_labels}, file_name=f"synthetic_{iid:06d}.png")
        views = [_synthetic_view(rnd, gt_boxes, gt_labels, easiness, (H, W), **noise) for _ in range(num_views)]
        images.append(RawImage(iid, (H, W), views=views,
                               target={"boxes": gt_boxes.float(), "labels": gt_labels.long()}))
    raw = RawPredictions("instances", images, categories, [f"view{v}" for v in range(num_views)])
    return gt.to_dict(), raw


class _Draw:
    """Uniform draws from one generator (the synthetic data's only source of randomness)."""

    def __init__(self, g: torch.Generator):
        self.g = g

    def u(self, lo: float = 0.0, hi: float = 1.0, n: int | tuple = ()) -> Tensor:
        shape = (n,) if isinstance(n, int) else n
        return lo + (hi - lo) * torch.rand(shape, generator=self.g, dtype=torch.float64)

    def randint(self, lo: int, hi: int) -> int:  # inclusive
        return int(torch.randint(lo, hi + 1, (1,), generator=self.g))


def _synthetic_view(rnd: _Draw, gt_boxes: Tensor, gt_labels: Tensor, easiness: Tensor, size: tuple[int, int], *,
                    miss_rate: float, box_jitter: float, duplicate_rate: float, confusion_rate: float,
                    false_positives: float, num_categories: int) -> Instances:
    """One view's detections of an image's objects (see :func:`make_synthetic_detection`)."""
    g, u, (H, W) = rnd.g, rnd.u, size
    offset = torch.randn(2, generator=g, dtype=torch.float64) * 0.01
    boxes, scores, labels = [], [], []
    for k in range(len(gt_labels)):
        if float(u()) > (1 - miss_rate) * (0.5 + 0.5 * float(easiness[k])):
            continue
        copies = 2 if float(u()) < duplicate_rate else 1
        for copy in range(copies):
            box_size = (gt_boxes[k, 2:] - gt_boxes[k, :2]).repeat(2)
            noise = torch.randn(4, generator=g, dtype=torch.float64) * box_jitter * (1 + copy)
            boxes.append(gt_boxes[k] + (noise + offset.repeat(2)) * box_size)
            s = float(easiness[k]) + 0.08 * float(torch.randn(1, generator=g)) - 0.2 * copy
            label = int(gt_labels[k])
            if float(u()) < confusion_rate and num_categories > 1:
                label = (label % num_categories) + 1
                s -= 0.2
            scores.append(min(0.99, max(0.01, s)))
            labels.append(label)
    n_fp = int(torch.poisson(torch.tensor([float(false_positives)]), generator=g))
    for _ in range(n_fp):
        w, h = float(u(0.05, 0.3)) * W, float(u(0.05, 0.3)) * H
        x, y = float(u()) * (W - w), float(u()) * (H - h)
        boxes.append(torch.tensor([x, y, x + w, y + h], dtype=torch.float64))
        scores.append(float(u(0.02, 0.5)))
        labels.append(rnd.randint(1, num_categories))
    if not boxes:
        return Instances.empty(image_size=(H, W))
    bx = torch.stack(boxes)
    bx[:, 0::2] = bx[:, 0::2].clamp(0, W)
    bx[:, 1::2] = bx[:, 1::2].clamp(0, H)
    bx[:, 2] = torch.maximum(bx[:, 2], bx[:, 0] + 1).clamp(max=W)
    bx[:, 3] = torch.maximum(bx[:, 3], bx[:, 1] + 1).clamp(max=H)
    bx[:, 0] = torch.minimum(bx[:, 0], bx[:, 2] - 1)
    bx[:, 1] = torch.minimum(bx[:, 1], bx[:, 3] - 1)
    return Instances(bx.float(), torch.tensor(scores, dtype=torch.float32), torch.tensor(labels, dtype=torch.int64),
                     image_size=(H, W))


def make_synthetic_classification(num_images: int = 200, num_views: int = 6, num_categories: int = 5,
                                  seed: int = 0, noise: float = 1.5) -> RawPredictions:
    """Per-view class probabilities of a noisy classifier: ``softmax(s * onehot(y) + noise * N(0, 1))`` with an
    image-level strength ``s ~ U(0, 3)`` (some images are hard). Each image's ``target`` is ``{"label": y}``."""
    g = torch.Generator().manual_seed(int(seed))
    categories = [{"id": c, "name": f"class{c}"} for c in range(num_categories)]
    images = []
    for i in range(num_images):
        y = int(torch.randint(0, num_categories, (1,), generator=g))
        strength = 3.0 * float(torch.rand(1, generator=g))
        logits = noise * torch.randn(num_views, num_categories, generator=g)
        logits[:, y] += strength
        images.append(RawImage(i + 1, (32, 32), probs=logits.softmax(-1), target={"label": y}))
    return RawPredictions("probs", images, categories, [f"view{v}" for v in range(num_views)])


SYNTHETIC_KINDS = {"detection": make_synthetic_detection, "classification": make_synthetic_classification}


def synthetic_raw(spec: Mapping[str, Any], source: str = "recipe") -> tuple[dict[str, Any] | None, RawPredictions]:
    """``(gt_coco or None, raw)`` from a ``bench.synthetic`` block."""
    import inspect

    spec = dict(spec)
    kind = spec.pop("kind", "detection")
    if kind not in SYNTHETIC_KINDS:
        raise ConfigError(f"{source}: bench.synthetic.kind must be one of {', '.join(SYNTHETIC_KINDS)}, got {kind!r}")
    fn = SYNTHETIC_KINDS[kind]
    valid = list(inspect.signature(fn).parameters)
    bad = [k for k in spec if k not in valid]
    if bad:
        raise ConfigError(f"{source}: bench.synthetic.{bad[0]} is not a parameter of the {kind} generator; "
                          f"valid: {', '.join(valid)}")
    out = fn(**spec)
    return out if isinstance(out, tuple) else (None, out)
