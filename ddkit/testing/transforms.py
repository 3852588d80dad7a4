"""Contract checks for test-time transforms (``kind: transforms``), reusable by plugin authors.

    from ddkit.testing.transforms import check_transform, views_of

    def test_my_views():
        for view in views_of(my_factory(sizes=[200, 300])):
            check_transform(view)

Every check raises ``AssertionError`` with a message naming the view and what is wrong. Views that also define
``forward_instances(inst, image_size)`` (all builtins do) get the geometric checks: round trip, agreement of the image
with the boxes (a painted rectangle must land where ``forward_instances`` puts its box) and agreement of
``inverse_heatmaps`` with ``inverse_instances``.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from ddkit.ops.geometry import COCO_FLIP_INDICES
from ddkit.ops.heatmaps import heatmaps_to_keypoints
from ddkit.types import Instances, Transform

__all__ = ["views_of", "check_transform", "check_views", "random_instances", "check_roundtrip",
           "check_image_matches_boxes", "check_heatmaps_match_keypoints"]


def views_of(built: Any) -> list[Any]:
    """A factory's result as a list of views (a factory returns one view or a list)."""
    views = list(built) if isinstance(built, (list, tuple)) else [built]
    assert views, "a transform factory returned no views"
    return views


def random_instances(n: int, image_size: tuple[int, int], num_keypoints: int | None = 17, margin: float = 0.0,
                     generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Instances:
    """``n`` random instances with boxes and keypoints inside ``[margin, W - margin] x [margin, H - margin]``."""
    h, w = image_size
    g = generator

    def coords(shape: tuple[int, ...], hi: float) -> Tensor:
        return margin + torch.rand(shape, generator=g, dtype=torch.float64) * (hi - 2 * margin)

    xs, ys = coords((n, 2), w).sort(1).values, coords((n, 2), h).sort(1).values
    boxes = torch.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], 1).to(dtype)
    scores = torch.rand(n, generator=g).to(dtype)
    labels = torch.randint(0, 5, (n,), generator=g)
    kps = None
    if num_keypoints is not None:
        kps = torch.stack([coords((n, num_keypoints), w), coords((n, num_keypoints), h),
                           torch.rand(n, num_keypoints, generator=g, dtype=torch.float64)], -1).to(dtype)
    return Instances(boxes, scores, labels, kps, image_size)


def _clone(inst: Instances) -> Instances:
    kps = None if inst.keypoints is None else inst.keypoints.clone()
    return Instances(inst.boxes.clone(), inst.scores.clone(), inst.labels.clone(), kps, inst.image_size)


def _same(a: Instances, b: Instances) -> bool:
    if (a.keypoints is None) != (b.keypoints is None):
        return False
    pairs = [(a.boxes, b.boxes), (a.scores, b.scores), (a.labels, b.labels)]
    if a.keypoints is not None:
        pairs.append((a.keypoints, b.keypoints))
    return all(x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y) for x, y in pairs)


def _num_keypoints(view: Any) -> int:
    return len(getattr(view, "flip_indices", COCO_FLIP_INDICES))


def _name(view: Any) -> str:
    return repr(getattr(view, "name", view))


def check_views(views: Iterable[Any]) -> None:
    """The views of one factory: each a :class:`~ddkit.types.Transform` with a unique, non-empty ``name``."""
    views = list(views)
    names = []
    for view in views:
        assert isinstance(view, Transform), (f"{view!r} does not implement the Transform protocol (name, forward_image,"
                                             f" inverse_instances, inverse_heatmaps, inverse_probs)")
        assert isinstance(view.name, str) and view.name, f"{view!r}: name must be a non-empty string"
        names.append(view.name)
    dup = sorted({n for n in names if names.count(n) > 1})
    assert not dup, f"view names must be unique, these repeat: {dup}"


def check_roundtrip(view: Any, image_size: tuple[int, int] = (37, 53), n: int = 20, seed: int = 0,
                    rtol: float = 1e-5, atol: float = 1e-3) -> None:
    """``inverse_instances(forward_instances(x)) == x`` for random float32 instances inside the frame (boxes,
    keypoints' ``(x, y)``; scores, labels and keypoint scores must be untouched)."""
    g = torch.Generator().manual_seed(seed)
    inst = random_instances(n, image_size, _num_keypoints(view), generator=g)
    fwd = view.forward_instances(inst, image_size)
    assert isinstance(fwd, Instances) and len(fwd) == n, f"{_name(view)}: forward_instances must keep the instances"
    back = view.inverse_instances(fwd, image_size)
    assert isinstance(back, Instances) and len(back) == n, f"{_name(view)}: inverse_instances must keep the instances"
    scale = max(image_size)
    for what, got, want in [("boxes", back.boxes, inst.boxes), ("keypoints", back.keypoints, inst.keypoints)]:
        err = (got.double() - want.double()).abs()
        tol = atol + rtol * scale
        assert got.shape == want.shape, f"{_name(view)}: {what} shape {tuple(got.shape)} != {tuple(want.shape)}"
        assert bool((err <= tol).all()), (f"{_name(view)}: inverse(forward({what})) differs from {what} by up to "
                                          f"{err.max().item():.3g} px (tolerance {tol:.3g})")
    assert torch.equal(back.scores, inst.scores), f"{_name(view)}: inverse_instances changed the scores"
    assert torch.equal(back.labels, inst.labels), f"{_name(view)}: inverse_instances changed the labels"
    assert torch.equal(back.keypoints[..., 2].sort(-1).values, inst.keypoints[..., 2].sort(-1).values), \
        f"{_name(view)}: keypoint scores must be carried along (at most permuted by a flip)"


def check_image_matches_boxes(view: Any, image_size: tuple[int, int] = (36, 50), seed: int = 0) -> None:
    """Paint a rectangle (integer corners) into a blank image, transform it, and check that the changed region of the
    output sits where ``forward_instances`` puts the rectangle's box: within half a pixel when the view keeps the
    size (so an ``x -> W - 1 - x`` flip fails), within one output pixel when it resizes (interpolation blurs the
    edges)."""
    h, w = image_size
    g = torch.Generator().manual_seed(seed)
    for _ in range(3):
        x1 = int(torch.randint(w // 6, w // 2, (1,), generator=g))
        y1 = int(torch.randint(h // 6, h // 2, (1,), generator=g))
        x2 = x1 + int(torch.randint(w // 6, w // 3, (1,), generator=g))
        y2 = y1 + int(torch.randint(h // 6, h // 3, (1,), generator=g))
        blank = torch.full((3, h, w), 0.25)
        marked = blank.clone()
        marked[:, y1:y2, x1:x2] = 0.75
        diff = (view.forward_image(marked) - view.forward_image(blank)).abs().amax(0)
        assert diff.ndim == 2, f"{_name(view)}: forward_image must return [C, H', W']"
        if float(diff.max()) == 0:  # photometric views that saturate both; nothing to locate
            continue
        mask = diff > 0.5 * diff.max()
        rows = torch.nonzero(mask.any(1)).flatten()
        cols = torch.nonzero(mask.any(0)).flatten()
        found = torch.tensor([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=torch.float64)
        box = Instances(torch.tensor([[x1, y1, x2, y2]], dtype=torch.float32), torch.ones(1),
                        torch.zeros(1, dtype=torch.int64))
        want = view.forward_instances(box, image_size).boxes[0].double()
        h2, w2 = diff.shape
        tol = 0.5 if (h2, w2) == (h, w) else 1.0 + 1e-6
        err = (found - want).abs().max().item()
        assert err <= tol, (f"{_name(view)}: a rectangle at {[x1, y1, x2, y2]} shows up at {found.tolist()} in the "
                            f"transformed image but forward_instances puts it at {want.tolist()} (error {err:.2f} px)")


def check_heatmaps_match_keypoints(view: Any, image_size: tuple[int, int] = (60, 80), seed: int = 0,
                                   heatmap_size: int = 14) -> None:
    """Two routes from a RoI heatmap predicted on the view to original-frame keypoints must agree: (a) decode the
    heatmap in the transformed RoI then ``inverse_instances``; (b) ``inverse_heatmaps`` then decode in the original
    RoI. Catches a flip without a channel swap or without a width reversal (within one heatmap cell)."""
    h, w = image_size
    k = _num_keypoints(view)
    g = torch.Generator().manual_seed(seed)
    roi = torch.tensor([[w * 0.25, h * 0.2, w * 0.7, h * 0.85]], dtype=torch.float32)
    roi_inst = Instances(roi, torch.ones(1), torch.zeros(1, dtype=torch.int64))
    roi_t = view.forward_instances(roi_inst, image_size).boxes
    yy, xx = torch.meshgrid(torch.arange(heatmap_size, dtype=torch.float32),
                            torch.arange(heatmap_size, dtype=torch.float32), indexing="ij")
    centers = torch.rand(k, 2, generator=g) * (heatmap_size - 3) + 1.5
    maps = torch.stack([-((xx - cx) ** 2 + (yy - cy) ** 2) / 2.0 for cx, cy in centers.tolist()])[None]
    maps_in = maps.clone()
    kp_t = heatmaps_to_keypoints(maps, roi_t)
    size_t = view.output_size(image_size) if hasattr(view, "output_size") else None
    route_a = view.inverse_instances(Instances(roi_t, torch.ones(1), torch.zeros(1, dtype=torch.int64), kp_t,
                                               size_t), image_size).keypoints
    inv = view.inverse_heatmaps(maps)
    assert torch.equal(maps, maps_in), f"{_name(view)}: inverse_heatmaps modified its input"
    assert inv.shape == maps.shape, f"{_name(view)}: inverse_heatmaps changed the shape {tuple(maps.shape)}"
    route_b = heatmaps_to_keypoints(inv, roi)
    cell = max(float(roi[0, 2] - roi[0, 0]), float(roi[0, 3] - roi[0, 1])) / heatmap_size
    err = (route_a[..., :2] - route_b[..., :2]).abs().max().item()
    assert err <= cell + 1.0, (f"{_name(view)}: inverse_heatmaps disagrees with inverse_instances on keypoints by "
                               f"{err:.2f} px (more than one heatmap cell, {cell:.2f} px)")


def check_transform(view: Any, image_size: tuple[int, int] = (24, 32), seed: int = 0) -> None:
    """The whole contract of one view (see the module docstring)."""
    check_views([view])
    name = _name(view)
    g = torch.Generator().manual_seed(seed)
    h, w = image_size

    # images: [C, H, W] in, [C, H', W'] out, same dtype, input untouched, deterministic
    image = torch.rand(3, h, w, generator=g)
    before = image.clone()
    out = view.forward_image(image)
    assert isinstance(out, Tensor) and out.ndim == 3 and out.shape[0] == 3, \
        f"{name}: forward_image must map [3, H, W] to [3, H', W'], got {getattr(out, 'shape', type(out))}"
    assert out.dtype == image.dtype, f"{name}: forward_image changed the dtype {image.dtype} -> {out.dtype}"
    assert torch.equal(image, before), f"{name}: forward_image modified its input"
    assert bool(torch.isfinite(out).all()), f"{name}: forward_image produced non-finite values"
    assert torch.equal(out, view.forward_image(image)), f"{name}: forward_image is not deterministic"
    if hasattr(view, "output_size"):
        assert tuple(out.shape[-2:]) == tuple(view.output_size(image_size)), \
            f"{name}: forward_image gave {tuple(out.shape[-2:])} but output_size says {view.output_size(image_size)}"

    # inverse_instances: empty in -> empty out; input untouched; dtypes kept; result inside the original frame
    size_t = tuple(out.shape[-2:])
    empty = Instances.empty(num_keypoints=_num_keypoints(view), image_size=size_t)
    back = view.inverse_instances(empty, image_size)
    assert isinstance(back, Instances) and len(back) == 0, f"{name}: inverse_instances(empty) must be empty"
    inst = random_instances(12, size_t, _num_keypoints(view), generator=g)
    inst_before = _clone(inst)
    back = view.inverse_instances(inst, image_size)
    assert _same(inst, inst_before), f"{name}: inverse_instances modified its input"
    assert isinstance(back, Instances) and len(back) == len(inst), f"{name}: inverse_instances must keep every instance"
    assert back.boxes.dtype == inst.boxes.dtype and back.labels.dtype == torch.int64, \
        f"{name}: inverse_instances changed dtypes"
    assert back.keypoints is not None and back.keypoints.shape == inst.keypoints.shape, \
        f"{name}: inverse_instances must map keypoints [N, K, 3] as well"
    b = back.boxes
    assert bool(((b[:, 0::2] >= 0) & (b[:, 0::2] <= w) & (b[:, 1::2] >= 0) & (b[:, 1::2] <= h)).all()), \
        f"{name}: inverse_instances must return boxes inside the original {image_size} frame"
    assert bool((b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()), f"{name}: boxes must stay x1<=x2, y1<=y2"
    assert torch.equal(back.labels, inst.labels), f"{name}: inverse_instances changed the labels"

    # heatmaps and probabilities: shape kept, input untouched
    maps = torch.randn(2, _num_keypoints(view), 7, 9, generator=g)
    maps_before = maps.clone()
    inv = view.inverse_heatmaps(maps)
    assert torch.equal(maps, maps_before), f"{name}: inverse_heatmaps modified its input"
    assert inv.shape == maps.shape, f"{name}: inverse_heatmaps must keep the shape"
    probs = torch.softmax(torch.randn(4, 5, generator=g), -1)
    probs_before = probs.clone()
    p = view.inverse_probs(probs)
    assert torch.equal(probs, probs_before), f"{name}: inverse_probs modified its input"
    assert p.shape == probs.shape, f"{name}: inverse_probs must keep the shape"

    if hasattr(view, "forward_instances"):
        check_roundtrip(view, seed=seed)
        check_image_matches_boxes(view, seed=seed)
        check_heatmaps_match_keypoints(view, seed=seed)
