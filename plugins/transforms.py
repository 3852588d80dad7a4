"""Builtin test-time transforms (views of multi-transform inference).

Every view implements :class:`ddkit.types.Transform` plus ``forward_instances`` (where predictions in the original
frame land in the transformed image; used by tests and for drawing) and ``output_size``. Coordinates follow the
continuous convention of :mod:`ddkit.ops.geometry` (an image of width ``W`` spans ``x in [0, W]``; hflip is
``x -> W - x``).

``inverse_instances`` maps predictions back to the original frame and **clamps** boxes and keypoints to it: a view
only sees the original image (translate's zero-filled border is not part of it), and float rounding of a scale must
not push a box a hair outside the image (aggregators reject boxes outside the image). ``forward_instances`` does not
clip, so ``inverse_instances(forward_instances(x)) == x`` for anything inside the original frame.

Heatmaps live in the frame of a RoI, so only a flip changes them (channel swap through ``flip_indices`` and width
reversal); scale, translate and photometric views leave heatmaps and class probabilities untouched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from torch import Tensor

from ddkit import Instances, hookimpl
from ddkit.ops.geometry import (COCO_FLIP_INDICES, check_flip_indices, clip_boxes, clip_keypoints, hflip_boxes,
                                hflip_image, hflip_keypoints, resize_image, resized_size, scale_boxes,
                                scale_keypoints, translate_boxes, translate_image, translate_keypoints)
from ddkit.ops.heatmaps import flip_heatmaps
from ddkit.types import TransformSpec

PAPER_SIZES: tuple[int, ...] = tuple(range(400, 1201, 100))


def _check_image(image: Tensor, who: str) -> None:
    if not isinstance(image, Tensor) or image.ndim != 3:
        raise ValueError(f"{who}.forward_image expects an image [C, H, W], got "
                         f"{tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__}")


def _check_size(image_size: Sequence[int], who: str) -> tuple[int, int]:
    try:
        h, w = (int(s) for s in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"{who}: image_size must be (H, W), got {image_size!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"{who}: image_size must be positive (H, W), got {image_size!r}")
    return h, w


def _map(inst: Instances, boxes_fn, kps_fn, image_size: tuple[int, int] | None) -> Instances:
    """Apply coordinate maps to an Instances (new tensors; scores and labels are copied)."""
    kps = None if inst.keypoints is None else kps_fn(inst.keypoints)
    return Instances(boxes_fn(inst.boxes), inst.scores.clone(), inst.labels.clone(), kps, image_size)


def _clip(inst: Instances, image_size: tuple[int, int]) -> Instances:
    kps = None if inst.keypoints is None else clip_keypoints(inst.keypoints, image_size)
    return Instances(clip_boxes(inst.boxes, image_size), inst.scores, inst.labels, kps, image_size)


class _View:
    """Base of the builtin views: identity on everything; subclasses override what they change."""

    name = "view"
    flip = False
    is_identity = False  # capability: the untransformed view (labelling's "single view" of the quality report)

    def output_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """``(H', W')`` of the transformed image of an ``(H, W)`` image."""
        return _check_size(image_size, self.name)

    def forward_image(self, image: Tensor) -> Tensor:
        _check_image(image, self.name)
        return image.clone()

    def forward_instances(self, inst: Instances, image_size: tuple[int, int]) -> Instances:
        """Instances in the original ``(H, W)`` frame -> the transformed image's frame (no clipping)."""
        size = self.output_size(image_size)
        return _map(inst, lambda b: b.clone(), lambda k: k.clone(), size)

    def inverse_instances(self, inst: Instances, image_size: tuple[int, int]) -> Instances:
        size = _check_size(image_size, self.name)
        return _clip(_map(inst, lambda b: b.clone(), lambda k: k.clone(), size), size)

    def inverse_heatmaps(self, heatmaps: Tensor) -> Tensor:
        return heatmaps.clone()

    def inverse_probs(self, probs: Tensor) -> Tensor:
        return probs.clone()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class Identity(_View):
    """The untransformed view."""

    name = "identity"
    is_identity = True


@dataclass
class FlipParams:
    """``flip_indices``: the mirror of each keypoint (default ``null``: the dataset's own pairs)."""

    flip_indices: list[int] | None = None

    def __post_init__(self) -> None:
        if self.flip_indices is not None:
            check_flip_indices(self.flip_indices)


def _flip_pairs(flip_indices: Sequence[int] | None) -> list[int]:
    """The pairs a flip view uses: the given ones; COCO's 17 when built without a dataset (a recipe's labelling
    fills in the dataset's own, or refuses a keypoint dataset that has none)."""
    return check_flip_indices(COCO_FLIP_INDICES if flip_indices is None else flip_indices)


class HFlip(_View):
    """Horizontal flip: ``x -> W - x``; keypoints swap left/right through ``flip_indices``; heatmaps swap channels and
    reverse their width."""

    flip = True

    def __init__(self, flip_indices: Sequence[int] | None = None, name: str = "hflip"):
        self.flip_indices = _flip_pairs(flip_indices)
        self.name = name

    def forward_image(self, image: Tensor) -> Tensor:
        _check_image(image, self.name)
        return hflip_image(image)

    def forward_instances(self, inst: Instances, image_size: tuple[int, int]) -> Instances:
        h, w = self.output_size(image_size)
        return _map(inst, lambda b: hflip_boxes(b, w), lambda k: hflip_keypoints(k, w, self.flip_indices), (h, w))

    def inverse_instances(self, inst: Instances, image_size: tuple[int, int]) -> Instances:
        h, w = _check_size(image_size, self.name)
        out = _map(inst, lambda b: hflip_boxes(b, w), lambda k: hflip_keypoints(k, w, self.flip_indices), (h, w))
        return _clip(out, (h, w))

    def inverse_heatmaps(self, heatmaps: Tensor) -> Tensor:
        return flip_heatmaps(heatmaps, self.flip_indices)


def _fmt(x: float) -> str:
    return f"{x:g}"


class Scale(_View):
    """Resize so the shorter side is ``size`` (or both sides times ``factor``), longer side capped at ``max_size``;
    optionally flipped after resizing. Bilinear, antialiased when downscaling."""

    def __init__(self, size: int | None = None, factor: float | None = None, max_size: int | None = None,
                 flip: bool = False, flip_indices: Sequence[int] | None = None):
        resized_size((1, 1), size, factor, max_size)  # validates the combination
        self.size, self.factor, self.max_size, self.flip = size, factor, max_size, bool(flip)
        # a shorter side in pixels (the paper's 400..1200) is run at that size; a factor is a share of the model's
        # own input size (ddkit.engine.label.frames)
        self.sets_pixel_size = size is not None
        self.flip_indices = _flip_pairs(flip_indices)
        base = f"scale{size}" if size is not None else f"scale_x{_fmt(factor)}"
        self.name = base + (f"_max{max_size}" if max_size is not None else "") + ("_flip" if flip else "")

    def output_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        return resized_size(_check_size(image_size, self.name), self.size, self.factor, self.max_size)

    def forward_image(self, image: Tensor) -> Tensor:
        _check_image(image, self.name)
        out = resize_image(image, self.output_size(tuple(image.shape[-2:])))
        return hflip_image(out) if self.flip else out

    def forward_instances(self, inst: Instances, image_size: tuple[int, int]) -> Instances:
        h, w = _check_size(image_size, self.name)
        h2, w2 = self.output_size((h, w))
        sx, sy = w2 / w, h2 / h

        def boxes(b: Tensor) -> Tensor:
            b = scale_boxes(b, sx, sy)
            return hflip_boxes(b, w2) if self.flip else b

        def kps(k: Tensor) -> Tensor:
            k = scale_keypoints(k, sx, sy)
            return hflip_keypoints(k, w2, self.flip_indices) if self.flip else k

        return _map(inst, boxes, kps, (h2, w2))

    def inverse_instances(self, inst: Instances, image_size: tuple[int, int]) -> Instances:
        h, w = _check_size(image_size, self.name)
        h2, w2 = self.output_size((h, w))
        sx, sy = w / w2, h / h2

        def boxes(b: Tensor) -> Tensor:
            b = hflip_boxes(b, w2) if self.flip else b
            return scale_boxes(b, sx, sy)

        def kps(k: Tensor) -> Tensor:
            k = hflip_keypoints(k, w2, self.flip_indices) if self.flip else k
            return scale_keypoints(k, sx, sy)

        return _clip(_map(inst, boxes, kps, (h, w)), (h, w))

    def inverse_heatmaps(self, heatmaps: Tensor) -> Tensor:
        return flip_heatmaps(heatmaps, self.flip_indices) if self.flip else heatmaps.clone()


@dataclass
class ScaleParams:
    """``sizes`` (shorter sides; default the paper's 400..1200 step 100) or ``factors``; ``max_size`` caps the longer
    side; ``flip`` adds a flipped copy of each scale."""

    sizes: list[int] | None = None
    factors: list[float] | None = None
    max_size: int | None = None
    flip: bool = False
    flip_indices: list[int] | None = None  # null: the dataset's own pairs

    def __post_init__(self) -> None:
        if self.sizes is not None and self.factors is not None:
            raise ValueError("scale: give sizes or factors, not both")
        if self.sizes is not None:
            if not self.sizes or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in self.sizes):
                raise ValueError(f"scale: sizes must be a non-empty list of ints > 0, got {self.sizes!r}")
            if len(set(self.sizes)) != len(self.sizes):
                raise ValueError(f"scale: sizes has duplicates: {self.sizes!r}")
        if self.factors is not None:
            if not self.factors or any(isinstance(f, bool) or not isinstance(f, (int, float)) or not f > 0
                                       or not math.isfinite(f) for f in self.factors):
                raise ValueError(f"scale: factors must be a non-empty list of numbers > 0, got {self.factors!r}")
            if len(set(self.factors)) != len(self.factors):
                raise ValueError(f"scale: factors has duplicates: {self.factors!r}")
        if self.max_size is not None and (isinstance(self.max_size, bool) or not isinstance(self.max_size, int)
                                          or self.max_size <= 0):
            raise ValueError(f"scale: max_size must be an int > 0, got {self.max_size!r}")
        if self.flip_indices is not None:
            check_flip_indices(self.flip_indices)


def make_scales(sizes: Sequence[int] | None = None, factors: Sequence[float] | None = None,
                max_size: int | None = None, flip: bool = False,
                flip_indices: Sequence[int] | None = None) -> list[Scale]:
    """One :class:`Scale` view per size or factor (followed by its flipped copy when ``flip``)."""
    ScaleParams(None if sizes is None else list(sizes), None if factors is None else list(factors), max_size,
                flip, None if flip_indices is None else list(flip_indices))
    if sizes is None and factors is None:
        sizes = PAPER_SIZES
    views = []
    for value in (sizes if sizes is not None else factors):
        kw = {"size": int(value)} if sizes is not None else {"factor": float(value)}
        views.append(Scale(**kw, max_size=max_size, flip=False, flip_indices=flip_indices))
        if flip:
            views.append(Scale(**kw, max_size=max_size, flip=True, flip_indices=flip_indices))
    return views


class Translate(_View):
    """Shift the image content by ``(dx, dy)`` whole pixels (right, down), zero fill, same size."""

    def __init__(self, dx: int, dy: int, fill: float = 0.0):
        if any(isinstance(v, bool) or not isinstance(v, int) for v in (dx, dy)):
            raise ValueError(f"translate: shifts must be integer pixels, got ({dx!r}, {dy!r})")
        self.dx, self.dy, self.fill = dx, dy, float(fill)
        self.name = f"translate_dx{dx}_dy{dy}"

    def forward_image(self, image: Tensor) -> Tensor:
        _check_image(image, self.name)
        return translate_image(image, self.dx, self.dy, self.fill)

    def forward_instances(self, inst: Instances, image_size: tuple[int, int]) -> Instances:
        size = self.output_size(image_size)
        return _map(inst, lambda b: translate_boxes(b, self.dx, self.dy),
                    lambda k: translate_keypoints(k, self.dx, self.dy), size)

    def inverse_instances(self, inst: Instances, image_size: tuple[int, int]) -> Instances:
        size = _check_size(image_size, self.name)
        out = _map(inst, lambda b: translate_boxes(b, -self.dx, -self.dy),
                   lambda k: translate_keypoints(k, -self.dx, -self.dy), size)
        return _clip(out, size)


@dataclass
class TranslateParams:
    """``shifts``: integer ``(dx, dy)`` pixel shifts, one view each (for small images such as 28x28 digits);
    ``fill``: the value of uncovered pixels."""

    shifts: list[tuple[int, int]] = field(default_factory=lambda: [(-1, 0), (1, 0), (0, -1), (0, 1)])
    fill: float = 0.0

    def __post_init__(self) -> None:
        shifts = []
        for s in self.shifts:
            if (not isinstance(s, (list, tuple)) or len(s) != 2
                    or any(isinstance(v, bool) or not isinstance(v, int) for v in s)):
                raise ValueError(f"translate: shifts must be a list of integer pairs [dx, dy], got {self.shifts!r}")
            shifts.append((int(s[0]), int(s[1])))
        if not shifts:
            raise ValueError("translate: shifts must not be empty")
        if len(set(shifts)) != len(shifts):
            raise ValueError(f"translate: shifts has duplicates: {self.shifts!r}")
        if not math.isfinite(self.fill):
            raise ValueError(f"translate: fill must be finite, got {self.fill!r}")
        self.shifts = shifts


def make_translates(shifts: Sequence[Sequence[int]] = ((-1, 0), (1, 0), (0, -1), (0, 1)),
                    fill: float = 0.0) -> list[Translate]:
    params = TranslateParams([tuple(s) for s in shifts], fill)
    return [Translate(dx, dy, params.fill) for dx, dy in params.shifts]


def _blend(a: Tensor, b: Tensor, ratio: float) -> Tensor:
    return (ratio * a + (1.0 - ratio) * b).clamp(0.0, 1.0)


def _grayscale(image: Tensor) -> Tensor:
    if image.shape[0] == 3:
        r, g, b = image[0], image[1], image[2]
        return (0.299 * r + 0.587 * g + 0.114 * b)[None].expand_as(image)
    return image.mean(0, keepdim=True).expand_as(image)


class ColorJitter(_View):
    """Deterministic photometric change of a float ``[0, 1]`` image: brightness, contrast and saturation factors
    (``1`` = unchanged, the torchvision ``adjust_*`` formulas), applied in that order. Geometry is untouched, so every
    inverse is the identity."""

    def __init__(self, brightness: float, contrast: float, saturation: float, name: str | None = None):
        for key, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or not math.isfinite(v):
                raise ValueError(f"color_jitter: {key} must be a finite number >= 0, got {v!r}")
        self.brightness, self.contrast, self.saturation = float(brightness), float(contrast), float(saturation)
        parts = [f"{k}{_fmt(v)}" for k, v in (("b", brightness), ("c", contrast), ("s", saturation)) if v != 1]
        self.name = name or ("color_jitter_" + "_".join(parts) if parts else "color_jitter_none")

    def forward_image(self, image: Tensor) -> Tensor:
        _check_image(image, self.name)
        if not image.is_floating_point():
            raise ValueError(f"{self.name}: expects a float image in [0, 1], got {image.dtype}")
        out = image
        if self.brightness != 1:
            out = (out * self.brightness).clamp(0.0, 1.0)
        if self.contrast != 1:
            mean = _grayscale(out).mean()
            out = _blend(out, mean.expand_as(out), self.contrast)
        if self.saturation != 1:
            out = _blend(out, _grayscale(out), self.saturation)
        return out.clone() if out is image else out


@dataclass
class BrightnessParams:
    """``factors``: one view per brightness factor (``image * f`` clamped to ``[0, 1]``)."""

    factors: list[float] = field(default_factory=lambda: [0.8, 1.2])

    def __post_init__(self) -> None:
        if not self.factors or any(isinstance(f, bool) or not isinstance(f, (int, float)) or not f >= 0
                                   or not math.isfinite(f) for f in self.factors):
            raise ValueError(f"brightness: factors must be a non-empty list of numbers >= 0, got {self.factors!r}")
        if len(set(self.factors)) != len(self.factors):
            raise ValueError(f"brightness: factors has duplicates: {self.factors!r}")


def make_brightness(factors: Sequence[float] = (0.8, 1.2)) -> list[ColorJitter]:
    BrightnessParams(list(factors))
    return [ColorJitter(f, 1.0, 1.0, name=f"brightness{_fmt(f)}") for f in factors]


@dataclass
class ColorJitterParams:
    """Deterministic factors (``1`` = unchanged) of one photometric view."""

    brightness: float = 1.2
    contrast: float = 1.2
    saturation: float = 1.2

    def __post_init__(self) -> None:
        ColorJitter(self.brightness, self.contrast, self.saturation)


@hookimpl
def ddkit_transforms():
    yield TransformSpec(name="identity", factory=Identity, summary="the untransformed image")
    yield TransformSpec(name="hflip", factory=HFlip, params=FlipParams,
                        summary="horizontal flip (x -> W - x, keypoints swap left/right by flip_indices)")
    yield TransformSpec(name="scale", factory=make_scales, params=ScaleParams,
                        summary="resize the shorter side to each of sizes (or by factors), optional flipped copies",
                        examples=({}, {"factors": [0.5, 1.5], "flip": True},
                                  {"sizes": [16, 40], "max_size": 50, "flip": True}))
    yield TransformSpec(name="translate", factory=make_translates, params=TranslateParams,
                        summary="shift by whole pixels with zero fill (small images such as digits)",
                        examples=({}, {"shifts": [[2, -3], [-2, 1]]}))
    yield TransformSpec(name="brightness", factory=make_brightness, params=BrightnessParams,
                        summary="multiply intensities by each factor (photometric; inverse = identity)")
    yield TransformSpec(name="color_jitter", factory=ColorJitter, params=ColorJitterParams,
                        summary="deterministic brightness/contrast/saturation (photometric; inverse = identity)")
