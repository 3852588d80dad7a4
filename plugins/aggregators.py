"""Builtin aggregators: ensemble the predictions of many views into one hard label.

Three inputs (``AggregatorSpec.input``):

* ``instances`` (``nms``, ``soft_nms``, ``nmw``, ``wbf``, ``box_voting``): ``agg(views, image_size) -> Instances``
  where ``views`` is a list of :class:`~ddkit.types.Instances`, one per view, already mapped back to the original
  ``(H, W)`` frame (one "model" per view in ``ensemble_boxes`` terms); ``agg.batch(views_per_image, image_sizes)``
  does many images at once and equals the per-image calls. Boxes stay in pixels (the ops work in pixels, no
  normalisation and no clipping): a box outside ``[0, W] x [0, H]`` or a non-finite value is a ``ValueError`` that
  names the view and the field. The output has float32 boxes/scores, int64 labels, is sorted by score (descending),
  and the inputs are never modified.
* ``heatmaps`` (``heatmap_mean``): ``agg(heatmaps [V, N, K, h, w], rois [N, 4]) -> keypoints [N, K, 3]``.
* ``probs`` (``prob_mean``, ``prob_max``, ``majority_vote``): ``agg(probs [V, N, C]) -> (labels [N], scores [N])``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
from torch import Tensor

from ddkit import Instances, hookimpl
from ddkit.ops.ensemble import box_voting_tensor, nms_tensor, nmw_tensor, soft_nms_tensor, wbf_tensor
from ddkit.ops.heatmaps import average_heatmaps, heatmaps_to_keypoints
from ddkit.types import AggregatorSpec

# =================================================================================================== instances


def _check_unit(who: str, key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{who}: {key} must be a number in [0, 1], got {value!r}")


def _check_real(who: str, key: str, value: Any, positive: bool = False) -> None:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or (positive and not value > 0)):
        raise ValueError(f"{who}: {key} must be a finite number{' > 0' if positive else ''}, got {value!r}")


def _check_weights(who: str, weights: Any) -> None:
    if weights is None:
        return
    if (not isinstance(weights, (list, tuple)) or not weights
            or any(isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0
                   for w in weights) or not sum(weights) > 0):
        raise ValueError(f"{who}: weights must be a non-empty list of finite numbers >= 0 (one per view) with a "
                         f"positive sum, got {weights!r}")


def _check_image_size(who: str, image_size: Any, where: str = "image_size") -> tuple[int, int]:
    try:
        h, w = image_size
        ok = all(isinstance(v, int) and not isinstance(v, bool) or (isinstance(v, Tensor) and v.ndim == 0)
                 for v in (h, w)) and int(h) > 0 and int(w) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{who}: {where} must be (H, W) with positive ints, got {image_size!r}")
    return int(h), int(w)


class _Flat:
    """One image's views concatenated: boxes [N, 4] float32, scores [N] float32, labels [N] int64, view [N]."""

    def __init__(self, who: str, views: Any, image_size: Any, where: str = ""):
        at = f" ({where})" if where else ""
        size = _check_image_size(who, image_size, f"image_size{at}")
        if isinstance(views, Instances) or not isinstance(views, (list, tuple)):
            raise ValueError(f"{who}: views{at} must be a list of Instances (one per view), got "
                             f"{type(views).__name__}")
        h, w = size
        boxes, scores, labels, view_idx, kps = [], [], [], [], []
        with_kps = {v.keypoints is not None for v in views if isinstance(v, Instances) and len(v)}
        if len(with_kps) > 1:
            raise ValueError(f"{who}: views{at} mix Instances with and without keypoints")
        for i, v in enumerate(views):
            name = f"views[{i}]{at}"
            if not isinstance(v, Instances):
                raise ValueError(f"{who}: {name} must be Instances, got {type(v).__name__}")
            if v.image_size is not None and tuple(int(s) for s in v.image_size) != size:
                raise ValueError(f"{who}: {name} refers to an image of size {tuple(v.image_size)}, not {size}; map "
                                 f"each view's predictions back to the original frame (Transform.inverse_instances)")
            if not len(v):
                continue
            b = v.boxes.detach().float()
            s = v.scores.detach().float()
            if not bool(torch.isfinite(b).all()):
                raise ValueError(f"{who}: {name}.boxes has non-finite values")
            if not bool(torch.isfinite(s).all()):
                raise ValueError(f"{who}: {name}.scores has non-finite values")
            if v.labels.is_floating_point() or v.labels.is_complex():
                raise ValueError(f"{who}: {name}.labels must be integers, got {v.labels.dtype}")
            out = (b[:, 0] < 0) | (b[:, 1] < 0) | (b[:, 2] > w) | (b[:, 3] > h)
            if bool(out.any()):
                j = int(out.nonzero()[0])
                raise ValueError(f"{who}: {name}.boxes[{j}] = {b[j].tolist()} lies outside the {size} image (H, W); "
                                 f"boxes are xyxy pixels in [0, W] x [0, H] and are never clipped silently")
            rev = (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])
            if bool(rev.any()):
                j = int(rev.nonzero()[0])
                raise ValueError(f"{who}: {name}.boxes[{j}] = {b[j].tolist()} is not xyxy (x1 <= x2, y1 <= y2)")
            boxes.append(b)
            scores.append(s)
            labels.append(v.labels.detach().long())
            view_idx.append(torch.full((len(v),), i, dtype=torch.int64))
            if v.keypoints is not None:
                kps.append(v.keypoints.detach().float())
        if kps and len({k.shape[1] for k in kps}) > 1:
            raise ValueError(f"{who}: views{at} have keypoints with different K: {sorted({k.shape[1] for k in kps})}")
        self.size = size
        self.num_views = len(views)
        self.boxes = torch.cat(boxes) if boxes else torch.zeros(0, 4)
        self.scores = torch.cat(scores) if scores else torch.zeros(0)
        self.labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
        self.view = torch.cat(view_idx) if view_idx else torch.zeros(0, dtype=torch.int64)
        self.keypoints = torch.cat(kps) if kps else None


class _BoxAggregator:
    """Shared machinery of the ``instances`` aggregators: validation, one call for many images, sorted output.

    Many images go through one call of the op: every ``(image, label)`` pair gets its own group id (as
    ``torchvision.ops.batched_nms`` does), so groups never interact and the result equals the per-image calls (which
    run the same code with one image). Images are grouped by their number of views (model count matters to WBF/NMW).
    """

    name = "boxes"
    #: whether output instances carry the keypoints of the input box they come from
    keeps_keypoints = False

    def __call__(self, views: Sequence[Instances], image_size: tuple[int, int]) -> Instances:
        """``views``: one :class:`Instances` per view, in the original ``(H, W) = image_size`` frame."""
        return self._run([_Flat(self.name, views, image_size)])[0]

    def batch(self, views_per_image: Sequence[Sequence[Instances]],
              image_sizes: Sequence[tuple[int, int]]) -> list[Instances]:
        """Many images at once: ``views_per_image[i]`` are image ``i``'s views, ``image_sizes[i]`` its ``(H, W)``."""
        if not isinstance(views_per_image, (list, tuple)) or not isinstance(image_sizes, (list, tuple)):
            raise ValueError(f"{self.name}.batch: views_per_image and image_sizes must be lists")
        if len(views_per_image) != len(image_sizes):
            raise ValueError(f"{self.name}.batch: {len(views_per_image)} images in views_per_image but "
                             f"{len(image_sizes)} image_sizes")
        flats = [_Flat(self.name, v, s, f"image {i}") for i, (v, s) in enumerate(zip(views_per_image, image_sizes))]
        return self._run(flats)

    # ---------------------------------------------------------------------------------------------- internals
    def _check_num_views(self, num_views: int) -> None:
        weights = getattr(self, "weights", None)
        if weights is not None and num_views and len(weights) != num_views:
            raise ValueError(f"{self.name}: weights has {len(weights)} entries but there are {num_views} views "
                             f"(one weight per view)")

    def _run(self, flats: list[_Flat]) -> list[Instances]:
        results: list[Instances | None] = [None] * len(flats)
        by_views: dict[int, list[int]] = {}
        for i, f in enumerate(flats):
            self._check_num_views(f.num_views)
            by_views.setdefault(f.num_views, []).append(i)
        for num_views, members in by_views.items():
            group = [flats[i] for i in members]
            boxes = torch.cat([f.boxes for f in group])
            scores = torch.cat([f.scores for f in group])
            labels = torch.cat([f.labels for f in group])
            view = torch.cat([f.view for f in group])
            image = torch.cat([torch.full((len(f.boxes),), j, dtype=torch.int64) for j, f in enumerate(group)])
            k = {f.keypoints.shape[1] for f in group if f.keypoints is not None}
            keypoints = None
            if self.keeps_keypoints and k:
                if len(k) > 1:
                    raise ValueError(f"{self.name}: images have keypoints with different K: {sorted(k)}")
                num_k = k.pop()
                keypoints = torch.cat([f.keypoints if f.keypoints is not None else
                                       torch.zeros(len(f.boxes), num_k, 3) for f in group])
            if len(boxes):
                pairs, key = torch.unique(torch.stack([image, labels], 1), dim=0, return_inverse=True)
                out_boxes, out_scores, out_key, src = self._op(boxes, scores, key, view, num_views)
                out_img, out_labels = pairs[out_key, 0], pairs[out_key, 1]
            else:
                out_boxes, out_scores = torch.zeros(0, 4), torch.zeros(0)
                out_img = out_labels = src = torch.zeros(0, dtype=torch.int64)
            for j, i in enumerate(members):
                m = out_img == j
                b, s, lab = out_boxes[m].float(), out_scores[m].float(), out_labels[m].long()
                kp = None
                if keypoints is not None and group[j].keypoints is not None:
                    kp = keypoints[src[m]]
                order = torch.argsort(s, descending=True, stable=True)
                results[i] = Instances(b[order].contiguous(), s[order].contiguous(), lab[order].contiguous(),
                                       None if kp is None else kp[order].contiguous(), flats[i].size)
        return results  # type: ignore[return-value]

    def _op(self, boxes: Tensor, scores: Tensor, key: Tensor, view: Tensor,
            num_views: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Run the op on grouped boxes; return boxes, scores, group keys and (where meaningful) source indices."""
        raise NotImplementedError

    def _weighted(self, scores: Tensor, view: Tensor) -> Tensor:
        """``ensemble_boxes``' NMS weighting: view ``v``'s scores times ``weights[v] / sum(weights)``."""
        weights = getattr(self, "weights", None)
        if weights is None:
            return scores
        w = torch.tensor(weights, dtype=torch.float64)
        return (scores.double() * (w / w.sum())[view]).float()

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


@dataclass
class NMSParams:
    """``iou_thr``: suppress a box overlapping a kept box of its label by IoU ``> iou_thr``; ``weights``: optional
    per-view weights (scores become ``score * w / sum(w)``, as in ``ensemble_boxes``)."""

    iou_thr: float = 0.5
    weights: list[float] | None = None

    def __post_init__(self) -> None:
        _check_unit("nms", "iou_thr", self.iou_thr)
        _check_weights("nms", self.weights)


class NMS(_BoxAggregator):
    """Class-wise greedy NMS over all views' boxes (:func:`ddkit.ops.ensemble.nms_tensor`). Kept boxes keep their
    scores, labels and keypoints."""

    name = "nms"
    keeps_keypoints = True

    def __init__(self, iou_thr: float = 0.5, weights: Sequence[float] | None = None):
        NMSParams(iou_thr, None if weights is None else list(weights))
        self.iou_thr, self.weights = iou_thr, None if weights is None else list(weights)

    def _op(self, boxes, scores, key, view, num_views):
        scores = self._weighted(scores, view)
        keep = nms_tensor(boxes, scores, key, self.iou_thr)
        return boxes[keep], scores[keep], key[keep], keep


@dataclass
class SoftNMSParams:
    """``method``: ``gaussian`` (decay ``exp(-IoU^2 / sigma)``) or ``linear`` (``1 - IoU`` where IoU > ``iou_thr``);
    ``thresh``: drop boxes whose decayed score is not above it; ``weights``: as for ``nms``."""

    method: Literal["gaussian", "linear"] = "gaussian"
    iou_thr: float = 0.5
    sigma: float = 0.5
    thresh: float = 0.001
    weights: list[float] | None = None

    def __post_init__(self) -> None:
        if self.method not in ("gaussian", "linear"):
            raise ValueError(f"soft_nms: method must be 'gaussian' or 'linear', got {self.method!r}")
        _check_unit("soft_nms", "iou_thr", self.iou_thr)
        _check_real("soft_nms", "sigma", self.sigma, positive=True)
        _check_real("soft_nms", "thresh", self.thresh)
        _check_weights("soft_nms", self.weights)


class SoftNMS(_BoxAggregator):
    """Class-wise soft-NMS (Bodla et al. 2017) over all views' boxes (:func:`ddkit.ops.ensemble.soft_nms_tensor`).

    Kept boxes come with their **decayed** scores (``ensemble_boxes.soft_nms`` returns the input scores; the decayed
    ones are what a score threshold should see), their labels and keypoints.
    """

    name = "soft_nms"
    keeps_keypoints = True

    def __init__(self, method: str = "gaussian", iou_thr: float = 0.5, sigma: float = 0.5, thresh: float = 0.001,
                 weights: Sequence[float] | None = None):
        SoftNMSParams(method, iou_thr, sigma, thresh, None if weights is None else list(weights))
        self.method, self.iou_thr, self.sigma, self.thresh = method, iou_thr, sigma, thresh
        self.weights = None if weights is None else list(weights)

    def _op(self, boxes, scores, key, view, num_views):
        scores = self._weighted(scores, view)
        keep, decayed = soft_nms_tensor(boxes, scores, key, method={"linear": 1, "gaussian": 2}[self.method],
                                        iou_thr=self.iou_thr, sigma=self.sigma, thresh=self.thresh)
        return boxes[keep], decayed, key[keep], keep


@dataclass
class NMWParams:
    """``iou_thr``: IoU with a cluster's first box above which a box joins it; ``skip_box_thr``: ignore boxes scoring
    below it; ``weights``: per-view weights (scores times ``w / max(w)``)."""

    iou_thr: float = 0.55
    skip_box_thr: float = 0.0
    weights: list[float] | None = None

    def __post_init__(self) -> None:
        _check_unit("nmw", "iou_thr", self.iou_thr)
        _check_real("nmw", "skip_box_thr", self.skip_box_thr)
        _check_weights("nmw", self.weights)


class NMW(_BoxAggregator):
    """Non-maximum weighted (Zhou et al. 2017; :func:`ddkit.ops.ensemble.nmw_tensor`): each cluster becomes the
    ``score * IoU``-weighted mean of its boxes with its best score. Fused boxes carry no keypoints."""

    name = "nmw"

    def __init__(self, iou_thr: float = 0.55, skip_box_thr: float = 0.0, weights: Sequence[float] | None = None):
        NMWParams(iou_thr, skip_box_thr, None if weights is None else list(weights))
        self.iou_thr, self.skip_box_thr = iou_thr, skip_box_thr
        self.weights = None if weights is None else list(weights)

    def _op(self, boxes, scores, key, view, num_views):
        b, s, k = nmw_tensor(boxes, scores, key, view, num_views, self.weights, self.iou_thr, self.skip_box_thr)
        return b, s, k, None


@dataclass
class WBFParams:
    """As ``ensemble_boxes.weighted_boxes_fusion``: ``iou_thr`` to join a cluster, ``skip_box_thr`` to ignore low
    scores, ``conf_type`` for the fused score, ``allows_overflow`` (``avg``: divide by the box count, not
    ``min(boxes, views)``), ``weights`` one per view."""

    iou_thr: float = 0.55
    skip_box_thr: float = 0.0
    conf_type: Literal["avg", "max", "box_and_model_avg", "absent_model_aware_avg"] = "avg"
    allows_overflow: bool = False
    weights: list[float] | None = None

    def __post_init__(self) -> None:
        _check_unit("wbf", "iou_thr", self.iou_thr)
        _check_real("wbf", "skip_box_thr", self.skip_box_thr)
        if self.conf_type not in ("avg", "max", "box_and_model_avg", "absent_model_aware_avg"):
            raise ValueError(f"wbf: conf_type must be one of avg, max, box_and_model_avg, absent_model_aware_avg; "
                             f"got {self.conf_type!r}")
        if not isinstance(self.allows_overflow, bool):
            raise ValueError(f"wbf: allows_overflow must be true or false, got {self.allows_overflow!r}")
        _check_weights("wbf", self.weights)


class WBF(_BoxAggregator):
    """Weighted boxes fusion (Solovyev et al. 2021; :func:`ddkit.ops.ensemble.wbf_tensor`) in pixels: each cluster
    becomes the score-weighted mean of its boxes. Fused boxes carry no keypoints (ensemble keypoints with
    ``heatmap_mean``)."""

    name = "wbf"

    def __init__(self, iou_thr: float = 0.55, skip_box_thr: float = 0.0, conf_type: str = "avg",
                 allows_overflow: bool = False, weights: Sequence[float] | None = None):
        WBFParams(iou_thr, skip_box_thr, conf_type, allows_overflow, None if weights is None else list(weights))
        self.iou_thr, self.skip_box_thr, self.conf_type = iou_thr, skip_box_thr, conf_type
        self.allows_overflow = allows_overflow
        self.weights = None if weights is None else list(weights)

    def _op(self, boxes, scores, key, view, num_views):
        b, s, k = wbf_tensor(boxes, scores, key, view, num_views, self.weights, self.iou_thr, self.skip_box_thr,
                             self.conf_type, self.allows_overflow)
        return b, s, k, None


@dataclass
class BoxVotingParams:
    """``nms_thr``: the NMS IoU threshold; ``vote_thr``: boxes of the label with IoU ``>= vote_thr`` with a kept box
    vote (score-weighted) for its coordinates."""

    nms_thr: float = 0.5
    vote_thr: float = 0.8

    def __post_init__(self) -> None:
        _check_unit("box_voting", "nms_thr", self.nms_thr)
        _check_unit("box_voting", "vote_thr", self.vote_thr)


class BoxVoting(_BoxAggregator):
    """Box voting (Gidaris & Komodakis 2015, Detectron's ``box_voting``; :func:`ddkit.ops.ensemble.box_voting_tensor`):
    class-wise NMS, then each kept box moves to the score-weighted mean of the boxes (all views, suppressed ones
    included) overlapping it by IoU ``>= vote_thr``; it keeps its score, label and keypoints (those of the NMS
    survivor)."""

    name = "box_voting"
    keeps_keypoints = True

    def __init__(self, nms_thr: float = 0.5, vote_thr: float = 0.8):
        BoxVotingParams(nms_thr, vote_thr)
        self.nms_thr, self.vote_thr = nms_thr, vote_thr

    def _op(self, boxes, scores, key, view, num_views):
        b, s, k = box_voting_tensor(boxes, scores, key, self.nms_thr, self.vote_thr)
        # box_voting_tensor returns the NMS survivors in nms_tensor's order: the same call gives their indices
        keep = nms_tensor(boxes, scores, key, self.nms_thr)
        return b, s, k, keep

# ==================================================================================================== heatmaps


@dataclass
class HeatmapMeanParams:
    """``mode``: ``logits`` averages the raw heatmaps; ``softmax`` averages each view's spatial softmax."""

    mode: Literal["logits", "softmax"] = "logits"

    def __post_init__(self) -> None:
        if self.mode not in ("logits", "softmax"):
            raise ValueError(f"heatmap_mean: mode must be 'logits' or 'softmax', got {self.mode!r}")


class HeatmapMean:
    """Average the views' RoI heatmaps (already mapped into the frame of one fixed RoI per instance with each view's
    ``inverse_heatmaps``), then decode each keypoint at the maximum with Mask R-CNN's sub-pixel refinement
    (:func:`ddkit.ops.heatmaps.heatmaps_to_keypoints`, equal to torchvision's).

    The keypoint score is the averaged map's (upsampled) value at the maximum: the mean logit in ``logits`` mode
    (the same scale as torchvision's Keypoint R-CNN keypoint scores), the mean spatial-softmax probability of that
    location in ``softmax`` mode (in ``[0, 1]``).
    """

    def __init__(self, mode: str = "logits"):
        HeatmapMeanParams(mode)
        self.mode = mode

    def __call__(self, heatmaps: Tensor, rois: Tensor) -> Tensor:
        """``heatmaps [V, N, K, h, w]``, ``rois [N, 4]`` (xyxy, image pixels) -> ``keypoints [N, K, 3]`` float32
        ``(x, y, score)`` in image pixels."""
        if not isinstance(heatmaps, Tensor) or heatmaps.ndim != 5:
            raise ValueError(f"heatmap_mean: heatmaps must be [V, N, K, h, w], got "
                             f"{tuple(heatmaps.shape) if isinstance(heatmaps, Tensor) else type(heatmaps).__name__}")
        if heatmaps.shape[0] == 0:
            raise ValueError("heatmap_mean: heatmaps has no views (V = 0)")
        if not isinstance(rois, Tensor) or rois.ndim != 2 or rois.shape != (heatmaps.shape[1], 4):
            raise ValueError(f"heatmap_mean: rois must be [N, 4] with N={heatmaps.shape[1]} (heatmaps' N), got "
                             f"{tuple(rois.shape) if isinstance(rois, Tensor) else type(rois).__name__}")
        if not heatmaps.is_floating_point() or not bool(torch.isfinite(heatmaps).all()):
            raise ValueError("heatmap_mean: heatmaps must be finite floats")
        if not bool(torch.isfinite(rois).all()):
            raise ValueError("heatmap_mean: rois contain non-finite values")
        return heatmaps_to_keypoints(average_heatmaps(heatmaps.float(), self.mode), rois)


# ======================================================================================================= probs


def _check_probs(probs: Tensor, who: str) -> Tensor:
    if not isinstance(probs, Tensor) or probs.ndim != 3:
        raise ValueError(f"{who} expects probs of shape [V, N, C], got "
                         f"{tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__}")
    if probs.shape[0] == 0 or probs.shape[2] == 0:
        raise ValueError(f"{who}: probs {tuple(probs.shape)} needs at least one view and one class")
    if not probs.is_floating_point() or not bool(torch.isfinite(probs).all()):
        raise ValueError(f"{who}: probs must be finite floats")
    return probs.float()


class ProbMean:
    """Average the class probabilities of every view; the argmax is the hard label, its mean probability the score."""

    def __call__(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        """``probs [V, N, C]`` (views, images, classes) -> ``(labels [N] int64, scores [N] float32)``."""
        scores, labels = _check_probs(probs, "prob_mean").mean(0).max(-1)
        return labels, scores


class ProbMax:
    """Per class, the highest probability any view gives; the argmax is the label and that probability the score."""

    def __call__(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        scores, labels = _check_probs(probs, "prob_max").amax(0).max(-1)
        return labels, scores


class MajorityVote:
    """Each view votes for its argmax class; the most voted class wins, ties broken by the higher mean probability
    (then the lower class id); the score is the winner's vote share ``votes / V``."""

    def __call__(self, probs: Tensor) -> tuple[Tensor, Tensor]:
        p = _check_probs(probs, "majority_vote")
        v, n, c = p.shape
        votes = torch.zeros(n, c, dtype=torch.float32, device=p.device)
        votes.scatter_add_(1, p.argmax(-1).T, torch.ones(n, v, device=p.device))
        top = votes.amax(-1, keepdim=True)
        labels = p.mean(0).masked_fill(votes < top, float("-inf")).argmax(-1)
        return labels, top.squeeze(-1) / v


@hookimpl
def ddkit_aggregators():
    yield AggregatorSpec(name="nms", factory=NMS, params=NMSParams, input="instances",
                         summary="class-wise NMS over all views' boxes (keeps keypoints)",
                         examples=({}, {"iou_thr": 0.3}))
    yield AggregatorSpec(name="soft_nms", factory=SoftNMS, params=SoftNMSParams, input="instances",
                         summary="class-wise soft-NMS (gaussian or linear score decay; keeps keypoints)",
                         examples=({}, {"method": "linear", "iou_thr": 0.3, "thresh": 0.05}))
    yield AggregatorSpec(name="nmw", factory=NMW, params=NMWParams, input="instances",
                         summary="non-maximum weighted: IoU*score-weighted mean box per cluster",
                         examples=({}, {"iou_thr": 0.4, "skip_box_thr": 0.1}))
    yield AggregatorSpec(name="wbf", factory=WBF, params=WBFParams, input="instances",
                         summary="weighted boxes fusion (ensemble_boxes semantics, pixel coordinates)",
                         examples=({}, {"conf_type": "max"}, {"conf_type": "box_and_model_avg", "iou_thr": 0.4},
                                   {"conf_type": "absent_model_aware_avg", "allows_overflow": True}))
    yield AggregatorSpec(name="box_voting", factory=BoxVoting, params=BoxVotingParams, input="instances",
                         summary="NMS, then each kept box = score-weighted mean of the boxes overlapping it",
                         examples=({}, {"nms_thr": 0.4, "vote_thr": 0.6}))
    yield AggregatorSpec(name="heatmap_mean", factory=HeatmapMean, params=HeatmapMeanParams, input="heatmaps",
                         summary="average RoI keypoint heatmaps over views, argmax (sub-pixel) -> keypoints",
                         examples=({}, {"mode": "softmax"}))
    yield AggregatorSpec(name="prob_mean", factory=ProbMean, input="probs",
                         summary="average class probabilities over views, argmax -> hard label")
    yield AggregatorSpec(name="prob_max", factory=ProbMax, input="probs",
                         summary="max class probability over views, argmax -> hard label")
    yield AggregatorSpec(name="majority_vote", factory=MajorityVote, input="probs",
                         summary="argmax per view, most votes wins (ties: mean probability); score = vote share")
