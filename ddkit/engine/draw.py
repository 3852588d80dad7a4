"""Predictions drawn on their image (torchvision's ``draw_bounding_boxes`` / ``draw_keypoints``): the report's
pseudo-label samples and ``ddkit predict --save-images``."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

__all__ = ["category_colors", "draw_instances", "to_uint8_rgb"]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def to_uint8_rgb(img: Any) -> torch.Tensor:
    """``[3, H, W]`` uint8 RGB of a ``[C, H, W]`` (or ``[H, W]``) image in [0, 1] (or 0..255 floats)."""
    img = img.detach().float().cpu()
    if img.dim() == 2:
        img = img[None]
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    elif img.shape[0] > 3:
        img = img[:3]
    if img.numel() and float(img.max()) > 1.5:  # 0..255 floats
        img = img / 255.0
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).contiguous()


def category_colors(ids: Sequence[int]) -> dict[int, str]:
    """``{category id: "#rrggbb"}``, matplotlib's tab10 (tab20 past 10 categories) in the order of ``ids``."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(ids) <= 10 else "tab20"]
    return {int(c): "#" + "".join(f"{round(255 * v):02x}" for v in cmap(i % cmap.N)[:3]) for i, c in enumerate(ids)}


def _font_path() -> str | None:
    """matplotlib's bundled TrueType font (legible box labels; PIL's default bitmap font is tiny)."""
    try:
        from matplotlib import font_manager

        path = font_manager.findfont("DejaVu Sans", fallback_to_default=True)
        return path if path and Path(path).is_file() and path.lower().endswith(".ttf") else None
    except Exception:  # noqa: BLE001
        return None


def draw_instances(img: Any, anns: Sequence[Mapping[str, Any]], names: Mapping[int, str],
                   cat_colors: Mapping[int, str], skeleton: Sequence[tuple[int, int]] | None,
                   upscale: bool = True) -> torch.Tensor:
    """``img`` ``[C, H, W]`` with COCO-style ``anns`` (``bbox`` xywh in its pixels, ``category_id``, ``score``,
    ``keypoints``) drawn: boxes labelled with the class name and score, keypoints (and the 0-based ``skeleton``).
    Returns ``[3, H', W']`` uint8; with ``upscale`` an image under 256 px is enlarged by a whole factor first so
    that the labels stay legible."""
    from torchvision.utils import draw_bounding_boxes, draw_keypoints

    rgb = to_uint8_rgb(img)
    h, w = rgb.shape[-2:]
    scale = max(1, int(math.ceil(256 / max(min(h, w), 1)))) if upscale and max(h, w) < 256 else 1
    if scale > 1:  # small images: upscale so that boxes and labels stay legible
        rgb = torch.nn.functional.interpolate(rgb[None].float(), scale_factor=scale, mode="nearest")[0].to(
            torch.uint8)
    boxes, labels, colors, kps = [], [], [], []
    for a in anns:
        b = a.get("bbox")
        if not (isinstance(b, (list, tuple)) and len(b) == 4 and all(_finite(v) for v in b)):
            continue
        x, y, bw, bh = (float(v) * scale for v in b)
        boxes.append([x, y, x + max(bw, 1.0), y + max(bh, 1.0)])
        cid = int(a.get("category_id", -1))
        score = a.get("score")
        labels.append(names.get(cid, str(cid)) + (f" {score:.2f}" if _finite(score) else ""))
        colors.append(cat_colors.get(cid, "#ff0000"))
        k = a.get("keypoints")
        if isinstance(k, (list, tuple)) and len(k) >= 3 and len(k) % 3 == 0:
            kps.append((torch.tensor(k, dtype=torch.float32).reshape(-1, 3), cat_colors.get(cid, "#ff0000")))
    if boxes:
        font = _font_path()
        size = max(10, round(min(rgb.shape[-2:]) / 28))
        rgb = draw_bounding_boxes(rgb, torch.tensor(boxes), labels=labels, colors=colors,
                                  width=2 if scale > 1 or min(h, w) >= 200 else 1, font=font,
                                  font_size=size if font else None, fill_labels=font is not None,
                                  label_colors="white" if font else None)
    for k, color in kps:
        pts = k[:, :2] * scale
        vis = k[:, 2] > 0
        if not bool(vis.any()):
            continue
        conn = [(i, j) for i, j in (skeleton or []) if 0 <= i < len(k) and 0 <= j < len(k)]
        radius = max(3, round(min(rgb.shape[-2:]) / 80))
        if conn:  # the skeleton (white lines), then the points on top of it
            rgb = draw_keypoints(rgb, pts[None], connectivity=conn, colors=color, radius=radius, width=2,
                                 visibility=vis[None])
        rgb = draw_keypoints(rgb, pts[None], colors=color, radius=radius, visibility=vis[None])
    return rgb


