"""``keypoint_fusion``: ensemble instances with **regressed** keypoints (YOLO pose, or any model whose predictions
carry keypoints) over views, without heatmaps.

An ``instances`` aggregator (``agg(views, image_size) -> Instances``, see :mod:`ddkit_plugins.aggregators`) that
declares ``fuses_keypoints = True``: the labelling engine then takes the keypoints from its output instead of
running a heatmap stage. Per image and label:

1. boxes are clustered as weighted boxes fusion does (``ensemble_boxes.weighted_boxes_fusion``, ``conf_type="avg"``):
   in order of decreasing (weighted) score, a box joins the cluster whose fused box it overlaps most if that IoU is
   ``> iou_thr``, else it starts a cluster; a cluster's box is the score-weighted mean of its members, its score the
   mean member score times ``min(V, n) / sum(weights)`` (``V`` views, ``n`` members). Boxes and scores equal the
   builtin ``wbf`` aggregator's.
2. each cluster's keypoint ``k`` is the mean of its members' keypoints weighted by ``score_i * conf_ik`` (instance
   score times keypoint confidence, negatives counted as 0; the score alone when every confidence is 0), and its
   confidence the score-weighted mean of the members' confidences times ``min(V, n) / V`` (seen in fewer views:
   less confident, as the box score).

Views arrive already mapped back to the original frame; a flipped view's ``inverse_instances`` has swapped its
left/right keypoint channels (``flip_indices``), so members agree on what each channel means.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ddkit import Instances, hookimpl
from ddkit.types import AggregatorSpec
from ddkit_plugins.aggregators import _check_real, _check_unit, _check_weights, _Flat


@dataclass
class KeypointFusionParams:
    """``iou_thr``: IoU with a cluster's fused box above which a box joins it; ``skip_box_thr``: ignore boxes
    scoring below it; ``weights``: one per view (scores times the weight, as in ``ensemble_boxes``)."""

    iou_thr: float = 0.55
    skip_box_thr: float = 0.0
    weights: list[float] | None = None

    def __post_init__(self) -> None:
        _check_unit("keypoint_fusion", "iou_thr", self.iou_thr)
        _check_real("keypoint_fusion", "skip_box_thr", self.skip_box_thr)
        _check_weights("keypoint_fusion", self.weights)


def _iou(box: Tensor, boxes: Tensor) -> Tensor:
    """IoU of ``box [4]`` with ``boxes [M, 4]`` (xyxy) -> ``[M]``."""
    lt = torch.maximum(box[:2], boxes[:, :2])
    rb = torch.minimum(box[2:], boxes[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area = (box[2:] - box[:2]).prod()
    areas = (boxes[:, 2:] - boxes[:, :2]).prod(1)
    return inter / (area + areas - inter).clamp(min=1e-12)


def cluster_boxes(boxes: Tensor, scores: Tensor, iou_thr: float) -> list[list[int]]:
    """WBF's greedy clustering of one label's boxes.

    Args:
        boxes: ``[N, 4]`` xyxy; scores: ``[N]`` (weighted) scores.

    Returns:
        clusters as lists of indices into ``boxes``, in order of creation; members in order of joining.
    """
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    clusters: list[list[int]] = []
    fused = boxes.new_zeros(0, 4)
    for j in order:
        best = -1
        if len(fused):
            ious = _iou(boxes[j], fused)
            top = int(torch.argmax(ious))
            if float(ious[top]) > iou_thr:
                best = top
        if best < 0:
            clusters.append([j])
            fused = torch.cat([fused, boxes[j][None]])
        else:
            clusters[best].append(j)
            m = torch.tensor(clusters[best])
            w = scores[m][:, None]
            fused[best] = (w * boxes[m]).sum(0) / w.sum()
    return clusters


def fuse_cluster_keypoints(kps: Tensor, scores: Tensor, num_views: int) -> Tensor:
    """One cluster's members ``kps [n, K, 3]`` with instance ``scores [n]`` -> fused ``[K, 3]`` (see the module
    docstring)."""
    n = kps.shape[0]
    s = scores[:, None]  # [n, 1]
    a = s * kps[..., 2].clamp(min=0)  # [n, K]
    fallback = a.sum(0) <= 0
    a = torch.where(fallback[None], s.expand_as(a), a)
    xy = (a[..., None] * kps[..., :2]).sum(0) / a.sum(0)[:, None].clamp(min=1e-12)
    conf = (s * kps[..., 2]).sum(0) / s.sum().clamp(min=1e-12) * (min(num_views, n) / num_views)
    return torch.cat([xy, conf[:, None]], 1)


class KeypointFusion:
    """Weighted boxes fusion whose clusters also fuse their members' keypoints (see the module docstring)."""

    name = "keypoint_fusion"
    #: the engine asks this: fused instances carry their own keypoints (no heatmap stage)
    fuses_keypoints = True

    def __init__(self, iou_thr: float = 0.55, skip_box_thr: float = 0.0, weights: Sequence[float] | None = None):
        KeypointFusionParams(iou_thr, skip_box_thr, None if weights is None else list(weights))
        self.iou_thr, self.skip_box_thr = iou_thr, skip_box_thr
        self.weights = None if weights is None else list(weights)

    def __call__(self, views: Sequence[Instances], image_size: tuple[int, int]) -> Instances:
        """``views``: one :class:`Instances` per view in the original ``(H, W) = image_size`` frame."""
        return self._fuse(_Flat(self.name, views, image_size))

    def batch(self, views_per_image: Sequence[Sequence[Instances]],
              image_sizes: Sequence[tuple[int, int]]) -> list[Instances]:
        """Many images: equal to one call per image."""
        if not isinstance(views_per_image, (list, tuple)) or not isinstance(image_sizes, (list, tuple)):
            raise ValueError(f"{self.name}.batch: views_per_image and image_sizes must be lists")
        if len(views_per_image) != len(image_sizes):
            raise ValueError(f"{self.name}.batch: {len(views_per_image)} images but {len(image_sizes)} image_sizes")
        return [self._fuse(_Flat(self.name, v, s, f"image {i}"))
                for i, (v, s) in enumerate(zip(views_per_image, image_sizes))]

    def _fuse(self, flat: _Flat) -> Instances:
        v = flat.num_views
        if self.weights is not None and v and len(self.weights) != v:
            raise ValueError(f"{self.name}: weights has {len(self.weights)} entries but there are {v} views")
        w = torch.tensor(self.weights if self.weights is not None else [1.0] * max(v, 1), dtype=torch.float32)
        keep = flat.scores >= self.skip_box_thr
        scores = flat.scores * w[flat.view] if len(flat.view) else flat.scores
        out_b, out_s, out_l, out_k = [], [], [], []
        for label in torch.unique(flat.labels[keep]).tolist():
            idx = torch.nonzero(keep & (flat.labels == label)).flatten()
            for members in cluster_boxes(flat.boxes[idx], scores[idx], self.iou_thr):
                m = idx[torch.tensor(members)]
                s = scores[m]
                out_b.append((s[:, None] * flat.boxes[m]).sum(0) / s.sum())
                out_s.append(s.mean() * min(v, len(m)) / float(w.sum()))
                out_l.append(label)
                if flat.keypoints is not None:
                    out_k.append(fuse_cluster_keypoints(flat.keypoints[m], s, v))
        if not out_b:
            k = None if flat.keypoints is None else flat.keypoints.new_zeros(0, flat.keypoints.shape[1], 3)
            return Instances(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), k, flat.size)
        boxes, sc = torch.stack(out_b).float(), torch.stack(out_s).float()
        order = torch.argsort(sc, descending=True, stable=True)
        kps = torch.stack(out_k).float()[order] if out_k else None
        return Instances(boxes[order], sc[order], torch.tensor(out_l, dtype=torch.int64)[order], kps, flat.size)

    def __repr__(self) -> str:
        return f"KeypointFusion(iou_thr={self.iou_thr}, skip_box_thr={self.skip_box_thr}, weights={self.weights})"


@hookimpl
def ddkit_aggregators():
    yield AggregatorSpec(name="keypoint_fusion", factory=KeypointFusion, params=KeypointFusionParams,
                         input="instances",
                         summary="WBF clusters of all views' instances; regressed keypoints = confidence-weighted mean",
                         examples=({}, {"iou_thr": 0.4, "skip_box_thr": 0.05}))
