"""Non-maximum weighted of a whole batch."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from ddkit.ops.ensemble.backends import Array
from ddkit.ops.ensemble.batch import _Batch
from ddkit.ops.ensemble.fusion import _final_order, _fusion_groups, _fusion_inputs
from ddkit.ops.ensemble.greedy import _greedy_rounds_parts


def _nmw(bt: _Batch, wn: Optional[np.ndarray], iou_thr: float, skip_box_thr: float, clip: bool, tie: str,
         fn: Optional[str]) -> Tuple[Array, ...]:
    """Non-maximum weighted for a whole batch. Returns image-sorted ``(boxes f32, scores f32, labels f32, label
    int64, img)``."""
    xp = bt.xp
    if wn is not None:
        wn = wn / wn.max()
    fu = _fusion_inputs(bt, wn, skip_box_thr, clip, fn)
    s, seg, first = _fusion_groups(xp, fu, bt.n_images, tie)
    n = s.b1.shape[0]
    # seeds: greedy NMS; every other box joins the earlier seed it overlaps most (the first one on ties)
    keep, best, cluster = _greedy_rounds_parts(xp, s.coords, seg, iou_thr, track=True)
    wgt = s.b1 * xp.where(keep, 1.0, best)
    # weighted means (ensemble_boxes accumulates them in float32; float64 here, a difference below 1e-6)
    conf = xp.bincount(cluster, wgt, n)
    acc = xp.stack([xp.bincount(cluster, wgt * s.coords[:, k], n) for k in range(4)], 1)
    seeds = xp.nonzero(keep)
    acc, conf = xp.take(acc, seeds), xp.take(conf, seeds)
    fused = xp.where((conf == 0)[:, None], xp.take(s.coords, seeds),
                     acc / xp.where(conf == 0, 1.0, conf)[:, None])
    fused = xp.cast(fused, xp.f32)
    score = xp.cast(xp.take(s.b1, seeds), xp.f32)
    lab = xp.take(s.lab, seeds)
    img = xp.take(s.img, seeds)
    concat = xp.take(first, xp.take(seg.gidx, seeds)) * (n + 1) + xp.take(seg.rank, seeds)
    order = _final_order(xp, img, score, concat, tie, np.float32)
    return (xp.take(fused, order), xp.take(score, order), xp.take(xp.cast(lab, xp.f32), order),
            xp.take(lab, order), xp.take(img, order))
