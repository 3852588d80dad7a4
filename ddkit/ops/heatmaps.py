"""Pure functions on keypoint heatmaps ``[N, K, h, w]`` (one map per RoI and keypoint, in the RoI's frame).

A heatmap covers its RoI ``(x1, y1, x2, y2)`` (image pixels, continuous coordinates: an image of width ``W`` spans
``[0, W]``); heatmap cell ``(i, j)`` of an ``h x w`` map covers ``[x1 + j * bw / w, x1 + (j + 1) * bw / w)`` with
``bw = x2 - x1``. This is the convention of Mask R-CNN (Detectron, torchvision's ``roi_heads``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ddkit.ops.geometry import check_flip_indices

__all__ = ["heatmaps_to_keypoints", "flip_heatmaps", "spatial_softmax", "average_heatmaps"]

_MODES = ("logits", "softmax")


def _check_maps(maps: Tensor, name: str = "heatmaps") -> None:
    if maps.ndim != 4:
        raise ValueError(f"{name} must be [N, K, h, w], got {tuple(maps.shape)}")
    if not maps.is_floating_point():
        raise ValueError(f"{name} must be a float tensor, got {maps.dtype}")


def heatmaps_to_keypoints(maps: Tensor, rois: Tensor) -> Tensor:
    """Keypoints at the maxima of RoI heatmaps, with the sub-pixel refinement of Mask R-CNN.

    Each RoI's ``h x w`` maps are upsampled (bicubic, ``align_corners=False``) to the RoI's size in pixels
    ``(ceil(bh), ceil(bw))`` (sides clamped to at least 1 pixel); the argmax cell ``(i, j)`` of the upsampled map
    becomes ``x = x1 + (j + 0.5) * bw / ceil(bw)``, ``y = y1 + (i + 0.5) * bh / ceil(bh)`` (Heckbert's ``c = d + 0.5``).
    The result equals torchvision's ``roi_heads.heatmaps_to_keypoints`` (coordinates and scores); RoIs of the same
    pixel size are upsampled as one batch instead of one by one.

    Args:
        maps: ``[N, K, h, w]`` float heatmaps (logits or probabilities).
        rois: ``[N, 4]`` xyxy RoIs in image pixels, the frame of each heatmap.

    Returns:
        ``[N, K, 3]`` float32 ``(x, y, score)`` in image pixels, where ``score`` is the upsampled heatmap's value at
        the maximum (a logit for logit maps).
    """
    _check_maps(maps, "maps")
    if rois.ndim != 2 or rois.shape[1] != 4 or rois.shape[0] != maps.shape[0]:
        raise ValueError(f"rois must be [N, 4] with N={maps.shape[0]} (one per heatmap), got {tuple(rois.shape)}")
    if not bool(torch.isfinite(rois).all()):
        raise ValueError("rois contain non-finite values")
    n, k = maps.shape[:2]
    out = torch.zeros((n, k, 3), dtype=torch.float32, device=maps.device)
    if n == 0 or k == 0:
        return out
    rois = rois.to(device=maps.device, dtype=torch.float32)
    widths = (rois[:, 2] - rois[:, 0]).clamp(min=1)
    heights = (rois[:, 3] - rois[:, 1]).clamp(min=1)
    widths_ceil = widths.ceil()
    heights_ceil = heights.ceil()
    sizes = torch.stack([heights_ceil, widths_ceil], 1).to(torch.int64)
    uniq, group = torch.unique(sizes, dim=0, return_inverse=True)
    ar = torch.arange(k, device=maps.device)
    for g in range(uniq.shape[0]):
        idx = torch.nonzero(group == g).flatten()
        rh, rw = int(uniq[g, 0]), int(uniq[g, 1])
        roi_map = F.interpolate(maps[idx].reshape(-1, 1, *maps.shape[-2:]), size=(rh, rw), mode="bicubic",
                                align_corners=False).reshape(len(idx), k, rh, rw)
        pos = roi_map.reshape(len(idx), k, -1).argmax(dim=2)
        x_int = pos % rw
        y_int = torch.div(pos - x_int, rw, rounding_mode="floor")
        width_correction = (widths[idx] / rw)[:, None]
        height_correction = (heights[idx] / rh)[:, None]
        out[idx, :, 0] = (x_int.float() + 0.5) * width_correction + rois[idx, 0, None]
        out[idx, :, 1] = (y_int.float() + 0.5) * height_correction + rois[idx, 1, None]
        scores = roi_map[torch.arange(len(idx), device=maps.device)[:, None], ar[None, :], y_int, x_int]
        out[idx, :, 2] = scores.float()
    return out


def flip_heatmaps(maps: Tensor, flip_indices: Sequence[int]) -> Tensor:
    """Heatmaps of a horizontally flipped view back into the unflipped RoI frame: left/right channels swap
    (``out[:, k] = maps[:, flip_indices[k]]``) and the width is reversed. Its own inverse."""
    _check_maps(maps)
    idx = check_flip_indices(flip_indices, maps.shape[1])
    return maps[:, idx].flip(-1)


def spatial_softmax(maps: Tensor) -> Tensor:
    """Softmax over the ``h * w`` cells of each ``[..., h, w]`` map: every map becomes a probability distribution."""
    if maps.ndim < 2:
        raise ValueError(f"maps must be [..., h, w], got {tuple(maps.shape)}")
    if maps.numel() == 0:
        return maps.clone() if maps.is_floating_point() else maps.float()
    flat = maps.reshape(*maps.shape[:-2], maps.shape[-2] * maps.shape[-1])
    return torch.softmax(flat.float(), dim=-1).reshape(maps.shape).to(
        maps.dtype if maps.is_floating_point() else torch.float32)


def average_heatmaps(maps: Tensor, mode: str = "logits") -> Tensor:
    """Average ``[V, N, K, h, w]`` heatmaps of ``V`` views (already in the frame of one RoI per instance).

    Args:
        mode: ``logits`` averages the raw maps; ``softmax`` averages each map's spatial softmax (probabilities that
            sum to 1 over the cells), which keeps one over-confident view from dominating.

    Returns:
        ``[N, K, h, w]`` float.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {', '.join(_MODES)}, got {mode!r}")
    if maps.ndim != 5:
        raise ValueError(f"heatmaps must be [V, N, K, h, w], got {tuple(maps.shape)}")
    if maps.shape[0] == 0:
        raise ValueError("heatmaps has no views (V = 0)")
    if not maps.is_floating_point():
        raise ValueError(f"heatmaps must be a float tensor, got {maps.dtype}")
    if mode == "softmax":
        maps = spatial_softmax(maps)
    return maps.mean(0)
