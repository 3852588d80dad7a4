"""The one rule for impossible boxes, applied by every reader (COCO, YOLO, pseudo-labels read back, ``label.coco``
ground truth, ``ddkit fuse``).

The rule, for a box ``xyxy`` in pixels of an image of size ``(H, W)``:

* a non-finite coordinate (NaN, inf) is an error (:class:`~ddkit.errors.DataError` naming the file and record);
* the box is clipped to the image ``[0, W] x [0, H]``; sticking out by at most :data:`BOX_TOLERANCE` pixels is
  rounding and passes silently, more is counted as *clipped*;
* a negative width or height in a file is a malformed record (an error, checked by each reader with its record
  names); a box with zero width or height after clipping (wholly outside the image, or ``w = 0`` / ``h = 0`` in the
  file) is *dropped* together with its instance (keypoints, area, label);
* clipped and dropped boxes are never silent: one warning per file counts both and names the first offender.

Training readers apply it as is. ``ddkit fuse`` classifies boxes with the same :func:`box_rule` but refuses a
clipped or dropped box instead of fixing it (its ``--box-tolerance`` sets the tolerance): fusing is a one-shot
tool whose input should be a model's own predictions, where an impossible box is a bug to report.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
from torch import Tensor

from ddkit.errors import DataError

log = logging.getLogger("ddkit.data")

BOX_TOLERANCE = 1.0  # pixels a box may stick out of its image before clipping it is reported
OK, CLIPPED, DROPPED, NONFINITE = 0, 1, 2, 3
STATUS_NAMES = ("ok", "clipped", "dropped", "non-finite")


def box_rule(boxes: Tensor, sizes: Tensor, tolerance: float = BOX_TOLERANCE) -> tuple[Tensor, Tensor]:
    """Apply the box rule (see the module docstring).

    Args:
        boxes: ``[N, 4]`` ``xyxy`` pixels (``x2 < x1`` encodes a negative width).
        sizes: ``[N, 2]`` ``(H, W)`` of each box's image, or ``[2]`` for all boxes.
        tolerance: pixels a box may stick out before clipping it counts.

    Returns:
        ``(clipped [N, 4], status [N] int64)`` with ``status`` one of :data:`OK`, :data:`CLIPPED`, :data:`DROPPED`,
        :data:`NONFINITE`; ``clipped`` holds the boxes clipped to their image (rows of dropped / non-finite boxes are
        meaningless), in ``boxes``' dtype (float32 for integer input).
    """
    dtype = boxes.dtype if boxes.is_floating_point() else torch.float32
    boxes = boxes.reshape(-1, 4).to(torch.float64)
    sizes = torch.as_tensor(sizes, dtype=torch.float64).reshape(-1, 2).expand(len(boxes), 2)
    h, w = sizes[:, 0], sizes[:, 1]
    finite = torch.isfinite(boxes).all(1)
    safe = torch.where(finite[:, None], boxes, torch.zeros_like(boxes))
    x1, x2 = torch.minimum(torch.maximum(safe[:, 0::2], torch.zeros_like(safe[:, 0::2])), w[:, None]).unbind(1)
    y1, y2 = torch.minimum(torch.maximum(safe[:, 1::2], torch.zeros_like(safe[:, 1::2])), h[:, None]).unbind(1)
    out = torch.stack([x1, y1, x2, y2], 1)
    moved = (out - safe).abs().amax(1) > tolerance if len(out) else torch.zeros(0, dtype=torch.bool)
    status = torch.full((len(out),), OK, dtype=torch.int64)
    status[moved] = CLIPPED
    status[(x2 - x1 <= 0) | (y2 - y1 <= 0)] = DROPPED
    status[~finite] = NONFINITE
    return out.to(dtype), status


class BoxCheck:
    """Applies :func:`box_rule` to the boxes of one source (a file, a dataset) and reports it once.

    Call :meth:`apply` for each batch of boxes (an image, or all of a file at once), then :meth:`warn`.
    """

    def __init__(self, source: str, tolerance: float = BOX_TOLERANCE):
        self.source, self.tolerance = source, tolerance
        self.counts = [0, 0, 0]
        self.first: dict[int, str] = {}

    def apply(self, boxes: Tensor, sizes: Tensor | Sequence[int],
              name: Callable[[int], str]) -> tuple[Tensor, Tensor]:
        """``boxes [N, 4]`` xyxy and ``sizes [N, 2]`` or ``[2]`` ``(H, W)`` -> ``(boxes [M, 4], keep [N] bool)``;
        ``name(i)`` describes box ``i`` in messages (e.g. ``"annotation id 7 (image 3)"``).

        Raises:
            DataError: a box has a non-finite coordinate.
        """
        sz = torch.as_tensor(sizes, dtype=torch.float64).reshape(-1, 2)
        out, status = box_rule(boxes, sz, self.tolerance)
        bad = torch.nonzero(status == NONFINITE).flatten()
        if len(bad):
            i = int(bad[0])
            raise DataError(f"{self.source}: {name(i)}: bbox has a non-finite value {boxes[i].tolist()}; "
                            f"fix or remove the record")
        for code in (CLIPPED, DROPPED):
            hit = torch.nonzero(status == code).flatten()
            self.counts[code] += len(hit)
            if len(hit) and code not in self.first:
                i = int(hit[0])
                size = sz[i if len(sz) > 1 else 0].tolist()
                self.first[code] = (f"{name(i)} xyxy {[round(float(v), 2) for v in boxes[i].tolist()]} "
                                    f"in a {int(size[1])}x{int(size[0])} (w x h) image")
        keep = status != DROPPED
        return out[keep], keep

    @property
    def clipped(self) -> int:
        return self.counts[CLIPPED]

    @property
    def dropped(self) -> int:
        return self.counts[DROPPED]

    def message(self) -> str | None:
        """The one warning line, or ``None`` when no box was clipped or dropped."""
        if not (self.clipped or self.dropped):
            return None
        parts = []
        if self.clipped:
            parts.append(f"clipped {self.clipped} box(es) sticking out of their image by more than "
                         f"{self.tolerance:g} px (first: {self.first[CLIPPED]})")
        if self.dropped:
            parts.append(f"dropped {self.dropped} instance(s) whose box is empty after clipping (wholly outside the "
                         f"image or zero width or height; first: {self.first[DROPPED]})")
        return f"{self.source}: " + "; ".join(parts)

    def warn(self) -> None:
        msg = self.message()
        if msg:
            log.warning("%s", msg)
