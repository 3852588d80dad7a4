"""Letterboxing in torch: images of any size into one padded batch, and coordinates back.

Images are resized (aspect kept) and **centred** on the canvas as Ultralytics' ``LetterBox`` places them (the padding
split in two halves, ``round(d / 2 - 0.1)`` before and the rest after), so the same weights see the same input in
ddkit and in Ultralytics; mapping back subtracts the offset and divides by the per-axis resize ratio. Padding takes
Ultralytics' grey (114 / 255).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

PAD_VALUE = 114.0 / 255.0


def fitted_size(size: tuple[int, int], imgsz: int | None, factor: float = 1.0) -> tuple[int, int]:
    """``(H, W)`` after scaling the longer side to ``imgsz * factor`` (``imgsz=None``: the size times ``factor``)."""
    h, w = size
    r = (imgsz / max(h, w) if imgsz else 1.0) * factor
    return max(1, round(h * r)), max(1, round(w * r))


def centred_offset(pad: int) -> int:
    """The padding before the image on one axis when ``pad`` pixels are split as Ultralytics' ``LetterBox`` does."""
    return round(pad / 2 - 0.1)


def own_canvas(size: tuple[int, int], stride: int) -> tuple[int, int]:
    """The smallest canvas of stride-multiple sides that holds an image resized to ``size`` (Ultralytics'
    ``LetterBox(auto=True)`` for one image)."""
    return math.ceil(size[0] / stride) * stride, math.ceil(size[1] / stride) * stride


def letterbox(images: Sequence[Tensor], sizes: Sequence[tuple[int, int]], stride: int,
              canvas: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """Resize each image to its target size and centre all in one padded batch.

    Args:
        images: ``[C, H_i, W_i]`` float images in ``[0, 1]`` on one device.
        sizes: the target ``(h_i, w_i)`` of each image.
        stride: the canvas sides are rounded up to a multiple of it.
        canvas: the ``(H, W)`` canvas: training's square ``imgsz``, or :func:`own_canvas` of the images' one size.

    Returns:
        ``batch [B, C, H, W]``, ``ratios [B, 2]`` (``(w_i / W_i, h_i / H_i)``: canvas pixels per input pixel) and
        ``offsets [B, 2]`` (``(left, top)``: the canvas pixel of the image's corner).
    """
    ch, cw = (math.ceil(c / stride) * stride for c in canvas)
    first = images[0]
    batch = torch.full((len(images), first.shape[0], ch, cw), PAD_VALUE, dtype=first.dtype, device=first.device)
    ratios = torch.empty(len(images), 2, dtype=torch.float32)
    offsets = torch.empty(len(images), 2, dtype=torch.float32)
    for i, (im, (h, w)) in enumerate(zip(images, sizes)):
        h0, w0 = im.shape[-2:]
        if (h, w) != (h0, w0):  # bilinear without antialiasing: Ultralytics' letterbox (cv2.INTER_LINEAR)
            im = F.interpolate(im[None].float(), size=(h, w), mode="bilinear", align_corners=False)[0]
            im = im.clamp_(0, 1).to(first.dtype)
        top, left = centred_offset(ch - h), centred_offset(cw - w)
        batch[i, :, top:top + h, left:left + w] = im
        ratios[i, 0], ratios[i, 1] = w / w0, h / h0
        offsets[i, 0], offsets[i, 1] = left, top
    return batch, ratios, offsets


def boxes_to_canvas(boxes: Tensor, ratio: Tensor, offset: Tensor) -> Tensor:
    """``[N, 4]`` xyxy input pixels -> canvas pixels (``ratio = (rx, ry)``, ``offset = (left, top)``)."""
    return boxes * ratio.to(boxes).repeat(2) + offset.to(boxes).repeat(2)


def boxes_from_canvas(boxes: Tensor, ratio: Tensor, offset: Tensor, size: tuple[int, int]) -> Tensor:
    """``[N, 4]`` xyxy canvas pixels -> input pixels, clamped to the input ``(H, W)``."""
    out = (boxes - offset.to(boxes).repeat(2)) / ratio.to(boxes).repeat(2)
    out[:, 0::2] = out[:, 0::2].clamp(0, size[1])
    out[:, 1::2] = out[:, 1::2].clamp(0, size[0])
    return out


def keypoints_to_canvas(kps: Tensor, ratio: Tensor, offset: Tensor) -> Tensor:
    """``[N, K, 3]`` input pixels -> canvas pixels (the third channel unchanged)."""
    out = kps.clone()
    out[..., 0] = kps[..., 0] * ratio[0] + offset[0]
    out[..., 1] = kps[..., 1] * ratio[1] + offset[1]
    return out


def keypoints_from_canvas(kps: Tensor, ratio: Tensor, offset: Tensor, size: tuple[int, int]) -> Tensor:
    """``[N, K, 3]`` canvas pixels -> input pixels (x, y clamped to the input; the third channel unchanged)."""
    out = kps.clone()
    out[..., 0] = ((kps[..., 0] - offset[0]) / ratio[0]).clamp(0, size[1])
    out[..., 1] = ((kps[..., 1] - offset[1]) / ratio[1]).clamp(0, size[0])
    return out
