"""Contract checks for aggregators (``kind: aggregators``), reusable by plugin authors.

    from ddkit.testing.aggregators import check_aggregator

    def test_my_aggregator():
        check_aggregator(MyFusion(iou_thr=0.6), input="instances")

Each check raises ``AssertionError`` naming the aggregator and the broken rule. The rules, by ``input``:

* ``instances``: ``agg(views, image_size) -> Instances``; no views or only empty views give empty Instances; float32
  boxes and scores, int64 labels; sorted by score, descending; boxes inside the image; inputs untouched;
  deterministic; a lone box comes back unchanged; boxes outside the image, non-finite values and a bad
  ``image_size`` raise ``ValueError``; ``agg.batch(...)`` (when defined) equals the per-image calls.
* ``heatmaps``: ``agg(heatmaps [V, N, K, h, w], rois [N, 4]) -> [N, K, 3]``; keypoints inside their RoI; N = 0 works;
  inputs untouched; shape mismatches raise ``ValueError``.
* ``probs``: ``agg(probs [V, N, C]) -> (labels [N] int64, scores [N] float)``; one view gives its argmax; a class
  every view prefers wins; inputs untouched; a wrong shape raises ``ValueError``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ddkit.types import Instances

__all__ = ["check_aggregator", "check_instance_aggregator", "check_heatmap_aggregator", "check_prob_aggregator",
           "random_views", "assert_raises_value_error"]


def _name(agg: Any) -> str:
    return getattr(agg, "name", type(agg).__name__)


def assert_raises_value_error(fn: Callable[[], Any], what: str, must_mention: str | None = None) -> None:
    """``fn()`` must raise ``ValueError`` (whose message contains ``must_mention``, case-insensitive)."""
    try:
        fn()
    except ValueError as err:
        if must_mention is not None:
            assert must_mention.lower() in str(err).lower(), \
                f"{what}: the ValueError should name {must_mention!r}, got: {err}"
        return
    except Exception as err:  # noqa: BLE001 - the point is to report the wrong type
        raise AssertionError(f"{what}: expected ValueError, got {type(err).__name__}: {err}") from err
    raise AssertionError(f"{what}: expected ValueError, nothing was raised")


def random_views(num_views: int, image_size: tuple[int, int], num_objects: int = 4, num_classes: int = 3,
                 num_keypoints: int | None = None, generator: torch.Generator | None = None,
                 jitter: float = 0.05, drop: float = 0.2) -> list[Instances]:
    """Views of the same ``num_objects`` objects: each view sees each object with probability ``1 - drop``, its box
    jittered by ``jitter`` of the box size, plus a random false positive; boxes stay inside the image."""
    g = generator
    h, w = image_size
    size = torch.tensor([w, h, w, h], dtype=torch.float32)
    c = torch.rand(num_objects, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(num_objects, 2, generator=g) * 0.3 + 0.05
    base = torch.cat([c - wh / 2, c + wh / 2], 1)
    labels = torch.randint(0, num_classes, (num_objects,), generator=g)
    views = []
    for _ in range(num_views):
        keep = torch.rand(num_objects, generator=g) >= drop
        b = base[keep] + (torch.rand(int(keep.sum()), 4, generator=g) - 0.5) * jitter * wh[keep].repeat(1, 2)
        fp = torch.rand(1, 2, generator=g) * 0.8
        b = torch.cat([b, torch.cat([fp, fp + 0.15], 1)])
        lab = torch.cat([labels[keep], torch.randint(0, num_classes, (1,), generator=g)])
        b = (b.clamp(0, 1) * size).float()
        scores = torch.rand(len(b), generator=g) * 0.9 + 0.05
        kps = None
        if num_keypoints is not None:
            kx = b[:, None, 0] + torch.rand(len(b), num_keypoints, generator=g) * (b[:, None, 2] - b[:, None, 0])
            ky = b[:, None, 1] + torch.rand(len(b), num_keypoints, generator=g) * (b[:, None, 3] - b[:, None, 1])
            kps = torch.stack([kx, ky, torch.rand(len(b), num_keypoints, generator=g)], -1)
        views.append(Instances(b, scores, lab, kps, image_size))
    return views


def _clone(views: list[Instances]) -> list[Instances]:
    return [Instances(v.boxes.clone(), v.scores.clone(), v.labels.clone(),
                      None if v.keypoints is None else v.keypoints.clone(), v.image_size) for v in views]


def _equal_inst(a: Instances, b: Instances) -> bool:
    if len(a) != len(b) or (a.keypoints is None) != (b.keypoints is None):
        return False
    ok = torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores) and torch.equal(a.labels, b.labels)
    return ok and (a.keypoints is None or torch.equal(a.keypoints, b.keypoints))


def _close_inst(a: Instances, b: Instances, atol: float = 1e-4) -> bool:
    if len(a) != len(b) or not torch.equal(a.labels, b.labels):
        return False
    return bool(torch.allclose(a.boxes, b.boxes, atol=atol, rtol=1e-5)
                and torch.allclose(a.scores, b.scores, atol=1e-5, rtol=1e-5))


def _check_output(agg: Any, out: Any, image_size: tuple[int, int], what: str) -> None:
    name = _name(agg)
    assert isinstance(out, Instances), f"{name}: {what} must return Instances, got {type(out).__name__}"
    assert out.boxes.dtype == torch.float32, f"{name}: {what}: boxes must be float32, got {out.boxes.dtype}"
    assert out.scores.dtype == torch.float32, f"{name}: {what}: scores must be float32, got {out.scores.dtype}"
    assert out.labels.dtype == torch.int64, f"{name}: {what}: labels must be int64, got {out.labels.dtype}"
    if len(out) > 1:
        assert bool((out.scores[:-1] >= out.scores[1:]).all()), f"{name}: {what}: scores must be sorted descending"
    h, w = image_size
    b = out.boxes
    assert bool(torch.isfinite(b).all() and torch.isfinite(out.scores).all()), f"{name}: {what}: non-finite output"
    eps = 1e-3
    inside = (b[:, 0::2] >= -eps) & (b[:, 0::2] <= w + eps) & (b[:, 1::2] >= -eps) & (b[:, 1::2] <= h + eps)
    assert bool(inside.all()), f"{name}: {what}: output boxes must lie inside the {image_size} image"
    assert bool((b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()), f"{name}: {what}: boxes must be xyxy"
    if out.keypoints is not None:
        assert out.keypoints.shape[0] == len(out) and out.keypoints.shape[-1] == 3, \
            f"{name}: {what}: keypoints must be [N, K, 3]"


def check_instance_aggregator(agg: Any, seed: int = 0, num_images: int = 4) -> None:
    """The contract of an ``input="instances"`` aggregator (see the module docstring)."""
    name = _name(agg)
    g = torch.Generator().manual_seed(seed)
    size = (48, 64)

    # empty in -> empty out
    for views, what in (([], "no views"), ([Instances.empty(image_size=size)] * 3, "three empty views")):
        out = agg(views, size)
        _check_output(agg, out, size, what)
        assert len(out) == 0, f"{name}: {what} must give empty Instances, got {len(out)}"

    # a lone box comes back unchanged (label and box; the score may be reweighted but stays positive)
    box = torch.tensor([[4.0, 6.0, 30.0, 40.0]])
    lone = agg([Instances(box, torch.tensor([0.9]), torch.tensor([2]), None, size)], size)
    _check_output(agg, lone, size, "a single box")
    assert len(lone) == 1, f"{name}: one box with score 0.9 must survive, got {len(lone)}"
    assert torch.allclose(lone.boxes, box, atol=1e-4), f"{name}: a lone box changed: {lone.boxes.tolist()}"
    assert lone.labels.tolist() == [2] and 0 < float(lone.scores[0]) <= 0.9 + 1e-6, \
        f"{name}: a lone box must keep its label and a score in (0, 0.9], got {lone.labels.tolist()}, " \
        f"{lone.scores.tolist()}"

    # random cases: output invariants, no mutation, determinism
    images = []
    for i in range(num_images):
        sz = (int(torch.randint(20, 200, (1,), generator=g)), int(torch.randint(20, 200, (1,), generator=g)))
        views = random_views(int(torch.randint(1, 6, (1,), generator=g)), sz, num_objects=int(i * 2 + 1),
                             num_keypoints=5 if i % 2 else None, generator=g)
        images.append((views, sz))
    outs = []
    for views, sz in images:
        before = _clone(views)
        out = agg(views, sz)
        assert all(_equal_inst(a, b) for a, b in zip(views, before)), f"{name}: modified its input views"
        _check_output(agg, out, sz, f"views on a {sz} image")
        assert len(out) <= sum(len(v) for v in views), f"{name}: more outputs than input boxes"
        assert _equal_inst(out, agg(_clone(views), sz)), f"{name}: is not deterministic"
        outs.append(out)

    # batch == per image
    if hasattr(agg, "batch"):
        batched = agg.batch([v for v, _ in images] + [[]], [s for _, s in images] + [size])
        assert isinstance(batched, list) and len(batched) == len(images) + 1, \
            f"{name}: batch must return one Instances per image"
        for k, (a, b) in enumerate(zip(batched, outs + [Instances.empty()])):
            _check_output(agg, a, (images + [([], size)])[k][1], f"batch image {k}")
            assert _close_inst(a, b), f"{name}: batch result of image {k} differs from the per-image call"

    # bad inputs -> ValueError
    good = Instances(box, torch.tensor([0.9]), torch.tensor([1]))
    outside = Instances(torch.tensor([[4.0, 6.0, 70.0, 40.0]]), torch.tensor([0.9]), torch.tensor([1]))
    nan = Instances(torch.tensor([[4.0, float("nan"), 30.0, 40.0]]), torch.tensor([0.9]), torch.tensor([1]))
    nan_score = Instances(box, torch.tensor([float("nan")]), torch.tensor([1]))
    assert_raises_value_error(lambda: agg([good, outside], size), f"{name}: a box outside the image", "outside")
    assert_raises_value_error(lambda: agg([good, nan], size), f"{name}: a NaN box coordinate", "finite")
    assert_raises_value_error(lambda: agg([nan_score], size), f"{name}: a NaN score", "finite")
    assert_raises_value_error(lambda: agg([good], (0, 64)), f"{name}: image_size (0, 64)", "image_size")
    assert_raises_value_error(lambda: agg(good, size), f"{name}: views given as one Instances", "views")


def check_heatmap_aggregator(agg: Any, seed: int = 0) -> None:
    """The contract of an ``input="heatmaps"`` aggregator (see the module docstring)."""
    name = _name(agg)
    g = torch.Generator().manual_seed(seed)
    v, n, k = 3, 5, 4
    maps = torch.randn(v, n, k, 8, 6, generator=g)
    xy = torch.rand(n, 2, generator=g) * 50
    rois = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 40 + 2], 1)
    maps_before, rois_before = maps.clone(), rois.clone()
    out = agg(maps, rois)
    assert torch.equal(maps, maps_before) and torch.equal(rois, rois_before), f"{name}: modified its input"
    assert isinstance(out, Tensor) and out.shape == (n, k, 3), f"{name}: must return keypoints [N, K, 3]"
    assert out.dtype == torch.float32, f"{name}: keypoints must be float32, got {out.dtype}"
    assert bool(torch.isfinite(out).all()), f"{name}: non-finite keypoints"
    inside = ((out[..., 0] >= rois[:, None, 0] - 1e-4) & (out[..., 0] <= rois[:, None, 2] + 1e-4)
              & (out[..., 1] >= rois[:, None, 1] - 1e-4) & (out[..., 1] <= rois[:, None, 3] + 1e-4))
    assert bool(inside.all()), f"{name}: keypoints must lie inside their RoI"
    assert torch.equal(out, agg(maps, rois)), f"{name}: is not deterministic"
    # a peak shared by every view is found (within one heatmap cell)
    peak = torch.zeros(v, 1, 1, 8, 8)
    peak[:, 0, 0, 5, 2] = 10.0
    kp = agg(peak, torch.tensor([[0.0, 0.0, 80.0, 80.0]]))
    assert abs(float(kp[0, 0, 0]) - 25.0) <= 10 and abs(float(kp[0, 0, 1]) - 55.0) <= 10, \
        f"{name}: a peak at heatmap cell (row 5, col 2) of a 80x80 RoI decodes to {kp[0, 0, :2].tolist()}"
    empty = agg(torch.zeros(v, 0, k, 8, 6), torch.zeros(0, 4))
    assert empty.shape == (0, k, 3), f"{name}: N = 0 must give [0, K, 3], got {tuple(empty.shape)}"
    assert_raises_value_error(lambda: agg(maps, rois[:-1]), f"{name}: rois of the wrong length", "rois")
    assert_raises_value_error(lambda: agg(maps[0], rois), f"{name}: heatmaps without a view axis", "heatmaps")


def check_prob_aggregator(agg: Any, seed: int = 0) -> None:
    """The contract of an ``input="probs"`` aggregator (see the module docstring)."""
    name = _name(agg)
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(4, 9, 6, generator=g) * 2, -1)
    before = probs.clone()
    labels, scores = agg(probs)
    assert torch.equal(probs, before), f"{name}: modified its input"
    assert labels.shape == (9,) and scores.shape == (9,), f"{name}: must return (labels [N], scores [N])"
    assert labels.dtype == torch.int64, f"{name}: labels must be int64, got {labels.dtype}"
    assert scores.is_floating_point() and bool(torch.isfinite(scores).all()), f"{name}: scores must be finite floats"
    assert bool(((labels >= 0) & (labels < 6)).all()), f"{name}: labels must be class indices 0..C-1"
    one_l, _ = agg(probs[:1])
    assert torch.equal(one_l, probs[0].argmax(-1)), f"{name}: with one view the label must be that view's argmax"
    agree = probs.clone()
    agree[:, :, 3] += 5.0
    agree /= agree.sum(-1, keepdim=True)
    assert bool((agg(agree)[0] == 3).all()), f"{name}: a class every view prefers must win"
    el, es = agg(torch.zeros(4, 0, 6))
    assert el.shape == (0,) and es.shape == (0,), f"{name}: N = 0 must give empty labels and scores"
    assert_raises_value_error(lambda: agg(probs[0]), f"{name}: probs without a view axis", "probs")


def check_aggregator(agg: Any, input: str, seed: int = 0) -> None:
    """Dispatch on ``input`` (``AggregatorSpec.input``): ``instances``, ``heatmaps`` or ``probs``."""
    checks = {"instances": check_instance_aggregator, "heatmaps": check_heatmap_aggregator,
              "probs": check_prob_aggregator}
    assert input in checks, f"{_name(agg)}: unknown aggregator input {input!r}; one of {', '.join(checks)}"
    checks[input](agg, seed=seed)
