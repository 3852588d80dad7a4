"""Pure functions that move images, boxes and keypoints under flip, scale and translation.

Coordinate convention (used by every transform of ddkit): **continuous pixel coordinates**. Pixel ``(i, j)`` (row,
column) covers the square ``[j, j + 1) x [i, i + 1)``, so its centre is at ``(j + 0.5, i + 0.5)`` and an image of
width ``W`` spans ``x in [0, W]``. Under this convention

* a horizontal flip is ``x -> W - x`` (a box's ``x1`` and ``x2`` swap roles), with no ``- 1``; it is an involution:
  flipping an image twice gives it back bit for bit, and flipping a coordinate twice gives it back exactly whenever
  ``W - x`` is representable (``x >= W / 2``, or ``x`` on a grid of ``ulp(W)``, e.g. any integer or ``k / 64``);
  otherwise float rounding of ``W - x`` leaves at most ``ulp(W)`` (``6e-5`` for ``W < 1024`` in float32);
* resizing ``(H, W) -> (H', W')`` maps ``x -> x * W' / W`` and ``y -> y * H' / H``, which is what
  :func:`torch.nn.functional.interpolate` with ``align_corners=False`` does to the image;
* translating the image content by ``(dx, dy)`` pixels maps ``(x, y) -> (x + dx, y + dy)``.

Boxes are ``[N, 4]`` ``xyxy``; keypoints are ``[N, K, 3]`` ``(x, y, score_or_visibility)`` (the third column is never
touched). Every function returns a new tensor and keeps the input's dtype (arithmetic is done in float64 when the input
is float32, so a forward-then-inverse round trip only loses the final rounding).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "COCO_FLIP_INDICES", "check_flip_indices", "hflip_boxes", "hflip_keypoints", "hflip_image", "scale_boxes",
    "scale_keypoints", "translate_boxes", "translate_keypoints", "clip_boxes", "clip_keypoints", "resized_size",
    "resize_image", "translate_image",
]

#: Mirror index of each of the 17 COCO person keypoints (nose, eyes, ears, shoulders, elbows, wrists, hips, knees,
#: ankles; left/right pairs swap).
COCO_FLIP_INDICES: tuple[int, ...] = (0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15)


def check_flip_indices(flip_indices: Sequence[int], num_keypoints: int | None = None,
                       name: str = "flip_indices") -> list[int]:
    """Validate a flip permutation: ints ``0..K-1``, each used once, and an involution (``f[f[k]] == k``).

    Raises:
        ValueError: naming ``name`` and what is wrong.
    """
    idx = list(flip_indices)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
        raise ValueError(f"{name} must be a list of ints, got {flip_indices!r}")
    k = len(idx)
    if sorted(idx) != list(range(k)):
        raise ValueError(f"{name} must be a permutation of 0..{k - 1}, got {idx}")
    bad = [i for i in range(k) if idx[idx[i]] != i]
    if bad:
        raise ValueError(f"{name} must pair keypoints (flip_indices[flip_indices[k]] == k); fails for k={bad[0]}: "
                         f"{idx}")
    if num_keypoints is not None and k != num_keypoints:
        raise ValueError(f"{name} has {k} entries but the keypoints have K={num_keypoints}; set {name} to the "
                         f"dataset's flip indices (DatasetInfo.flip_indices)")
    return idx


def _work(t: Tensor) -> Tensor:
    """The tensor in the precision used for the arithmetic (float64 for float32/16 inputs)."""
    if not t.is_floating_point():
        raise ValueError(f"coordinates must be a float tensor, got {t.dtype}")
    return t.double() if t.dtype != torch.float64 else t.clone()


def _check_boxes(boxes: Tensor) -> None:
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [N, 4] xyxy, got {tuple(boxes.shape)}")


def _check_keypoints(keypoints: Tensor) -> None:
    if keypoints.ndim != 3 or keypoints.shape[-1] != 3:
        raise ValueError(f"keypoints must be [N, K, 3], got {tuple(keypoints.shape)}")


# --------------------------------------------------------------------------------------------------------- flip
def hflip_boxes(boxes: Tensor, width: float) -> Tensor:
    """Mirror ``[N, 4]`` xyxy boxes in an image of width ``width``: ``(x1, x2) -> (W - x2, W - x1)``."""
    _check_boxes(boxes)
    out = _work(boxes)
    x1 = out[:, 0].clone()
    out[:, 0] = width - out[:, 2]
    out[:, 2] = width - x1
    return out.to(boxes.dtype)


def hflip_keypoints(keypoints: Tensor, width: float, flip_indices: Sequence[int]) -> Tensor:
    """Mirror ``[N, K, 3]`` keypoints: ``x -> W - x`` and left/right swap (``out[:, k] = in[:, flip_indices[k]]``).

    Because ``flip_indices`` is an involution the same call maps forward and back.
    """
    _check_keypoints(keypoints)
    idx = check_flip_indices(flip_indices, keypoints.shape[1])
    out = _work(keypoints)[:, idx]
    out[..., 0] = width - out[..., 0]
    return out.to(keypoints.dtype)


def hflip_image(image: Tensor) -> Tensor:
    """Mirror ``[..., H, W]`` along the width (exact, its own inverse)."""
    return image.flip(-1)


# -------------------------------------------------------------------------------------------------------- scale
def scale_boxes(boxes: Tensor, sx: float, sy: float) -> Tensor:
    """``x -> x * sx``, ``y -> y * sy`` for ``[N, 4]`` xyxy boxes."""
    _check_boxes(boxes)
    out = _work(boxes)
    out[:, 0::2] *= sx
    out[:, 1::2] *= sy
    return out.to(boxes.dtype)


def scale_keypoints(keypoints: Tensor, sx: float, sy: float) -> Tensor:
    """``x -> x * sx``, ``y -> y * sy`` for ``[N, K, 3]`` keypoints (the score column is kept)."""
    _check_keypoints(keypoints)
    out = _work(keypoints)
    out[..., 0] *= sx
    out[..., 1] *= sy
    return out.to(keypoints.dtype)


def resized_size(image_size: tuple[int, int], size: int | None = None, factor: float | None = None,
                 max_size: int | None = None) -> tuple[int, int]:
    """The ``(H', W')`` an image of ``image_size = (H, W)`` is resized to.

    ``size`` sets the shorter side (the paper's 400..1200), ``factor`` multiplies both sides; exactly one of them.
    ``max_size`` then caps the longer side (as torchvision's ``GeneralizedRCNNTransform`` does). The aspect ratio is
    kept up to rounding to whole pixels; each side is at least 1.
    """
    h, w = int(image_size[0]), int(image_size[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"image_size must be positive (H, W), got {image_size}")
    if (size is None) == (factor is None):
        raise ValueError("give exactly one of size (shorter side) or factor")
    if size is not None:
        if size <= 0:
            raise ValueError(f"size must be > 0, got {size}")
        s = size / min(h, w)
    else:
        if not factor > 0 or not math.isfinite(factor):
            raise ValueError(f"factor must be a finite number > 0, got {factor}")
        s = float(factor)
    if max_size is not None:
        if max_size <= 0:
            raise ValueError(f"max_size must be > 0, got {max_size}")
        if max(h, w) * s > max_size:
            s = max_size / max(h, w)
    return max(1, int(math.floor(h * s + 0.5))), max(1, int(math.floor(w * s + 0.5)))


def resize_image(image: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize ``[C, H, W]`` (or ``[B, C, H, W]``) to ``size = (H', W')`` with bilinear interpolation
    (``align_corners=False``), antialiased when a side shrinks. Integer images are resized in float and rounded back."""
    if image.ndim not in (3, 4):
        raise ValueError(f"image must be [C, H, W] or [B, C, H, W], got {tuple(image.shape)}")
    size = (int(size[0]), int(size[1]))
    if tuple(image.shape[-2:]) == size:
        return image.clone()
    batched = image.ndim == 4
    x = image if batched else image[None]
    work = x if x.is_floating_point() else x.float()
    if work.dtype not in (torch.float32, torch.float64):
        work = work.float()
    down = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    out = F.interpolate(work, size=size, mode="bilinear", align_corners=False, antialias=down)
    if not image.is_floating_point():
        info = torch.iinfo(image.dtype)
        out = out.round().clamp(info.min, info.max)
    out = out.to(image.dtype)
    return out if batched else out[0]


# ---------------------------------------------------------------------------------------------------- translate
def translate_boxes(boxes: Tensor, dx: float, dy: float) -> Tensor:
    """``(x, y) -> (x + dx, y + dy)`` for ``[N, 4]`` xyxy boxes (no clipping)."""
    _check_boxes(boxes)
    out = _work(boxes)
    out[:, 0::2] += dx
    out[:, 1::2] += dy
    return out.to(boxes.dtype)


def translate_keypoints(keypoints: Tensor, dx: float, dy: float) -> Tensor:
    """``(x, y) -> (x + dx, y + dy)`` for ``[N, K, 3]`` keypoints (no clipping)."""
    _check_keypoints(keypoints)
    out = _work(keypoints)
    out[..., 0] += dx
    out[..., 1] += dy
    return out.to(keypoints.dtype)


def translate_image(image: Tensor, dx: int, dy: int, fill: float = 0.0) -> Tensor:
    """Shift the content of ``[..., H, W]`` by ``dx`` columns right and ``dy`` rows down; uncovered pixels get
    ``fill``; the size is kept. Pixel ``(i, j)`` moves to ``(i + dy, j + dx)``."""
    dx, dy = int(dx), int(dy)
    h, w = image.shape[-2:]
    out = torch.full_like(image, fill)
    if abs(dx) >= w or abs(dy) >= h:
        return out
    src_y = slice(max(0, -dy), h - max(0, dy))
    src_x = slice(max(0, -dx), w - max(0, dx))
    dst_y = slice(max(0, dy), h - max(0, -dy))
    dst_x = slice(max(0, dx), w - max(0, -dx))
    out[..., dst_y, dst_x] = image[..., src_y, src_x]
    return out


# --------------------------------------------------------------------------------------------------------- clip
def clip_boxes(boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Clamp ``[N, 4]`` xyxy boxes to ``[0, W] x [0, H]`` (a new tensor)."""
    _check_boxes(boxes)
    h, w = image_size
    out = boxes.clone()
    out[:, 0::2] = out[:, 0::2].clamp(0, w)
    out[:, 1::2] = out[:, 1::2].clamp(0, h)
    return out


def clip_keypoints(keypoints: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Clamp the ``(x, y)`` of ``[N, K, 3]`` keypoints to ``[0, W] x [0, H]`` (a new tensor)."""
    _check_keypoints(keypoints)
    h, w = image_size
    out = keypoints.clone()
    out[..., 0] = out[..., 0].clamp(0, w)
    out[..., 1] = out[..., 1].clamp(0, h)
    return out
