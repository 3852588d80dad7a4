"""COCO dicts from ddkit structures: results entries of predicted instances, and the one builder of a COCO
ground-truth dict from per-image targets (labelling's quality report, ``ddkit bench``, task evaluation)."""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch

from ddkit.types import Instances


def instances_to_results(image_id: int, inst: Instances) -> list[dict[str, Any]]:
    """COCO results entries (``bbox`` as ``[x, y, w, h]``) of one image's instances."""
    boxes = inst.boxes.detach().double().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = inst.scores.detach().double().cpu().tolist()
    labels = inst.labels.detach().cpu().tolist()
    return [{"image_id": int(image_id), "category_id": int(c), "bbox": [float(v) for v in b], "score": float(s)}
            for b, s, c in zip(xywh, scores, labels)]


def keypoint_results(image_id: int, inst: Instances, keep_scores: bool = False) -> list[dict[str, Any]]:
    """:func:`instances_to_results` with ``keypoints`` (``x, y, 1`` per keypoint; ``x, y, score`` with
    ``keep_scores``) when ``inst`` has them."""
    res = instances_to_results(image_id, inst)
    if inst.keypoints is not None:
        for r, k in zip(res, inst.keypoints.tolist()):
            r["keypoints"] = [v for xyz in k for v in (xyz[0], xyz[1], xyz[2] if keep_scores else 1)]
    return res


def target_annotations(image_id: int, target: Mapping[str, Any], first_id: int = 1) -> list[dict[str, Any]]:
    """COCO annotations of one image's target: ``boxes [M, 4]`` xyxy, ``labels [M]`` category ids, optional
    ``iscrowd [M]``, ``area [M]`` (a negative area means "unknown": the box area is used) and ``keypoints
    [M, K, 3]``. Ids run from ``first_id``."""
    boxes = torch.as_tensor(target["boxes"], dtype=torch.float64).reshape(-1, 4).tolist()
    labels = torch.as_tensor(target["labels"]).reshape(-1).tolist()
    n = len(labels)
    crowd = torch.as_tensor(target["iscrowd"]).reshape(-1).tolist() if "iscrowd" in target else [0] * n
    area = torch.as_tensor(target["area"], dtype=torch.float64).reshape(-1).tolist() if "area" in target \
        else [-1.0] * n
    kps = target.get("keypoints")
    out = []
    for j, ((x1, y1, x2, y2), c) in enumerate(zip(boxes, labels)):
        a = float(area[j]) if float(area[j]) >= 0 else (x2 - x1) * (y2 - y1)
        ann = {"id": first_id + j, "image_id": int(image_id), "category_id": int(c),
               "bbox": [x1, y1, x2 - x1, y2 - y1], "area": a, "iscrowd": int(crowd[j])}
        if kps is not None:
            kp = torch.as_tensor(kps[j], dtype=torch.float32)
            ann["keypoints"] = kp.reshape(-1).tolist()
            ann["num_keypoints"] = int((kp[:, 2] > 0).sum())
        out.append(ann)
    return out


class CocoGroundTruthBuilder:
    """Builds a COCO ground-truth dict image by image (streaming: call :meth:`add` per image)."""

    def __init__(self, categories: Sequence[Mapping[str, Any]]):
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self.categories = [dict(c) for c in categories]

    def add(self, image_id: int, height: int, width: int, target: Mapping[str, Any] | None,
            **image_fields: Any) -> None:
        self.images.append({"id": int(image_id), "height": int(height), "width": int(width), **image_fields})
        if target is not None:
            self.annotations += target_annotations(image_id, target, len(self.annotations) + 1)

    def to_dict(self) -> dict[str, Any]:
        categories = self.categories
        if not categories:  # none given: the ids the annotations use
            categories = [{"id": c, "name": str(c)} for c in sorted({a["category_id"] for a in self.annotations})]
        return {"info": {}, "images": self.images, "annotations": self.annotations, "categories": categories}


def coco_ground_truth(images: Iterable[tuple[int, int, int, Mapping[str, Any] | None]],
                      categories: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A COCO ground-truth dict from ``(image_id, height, width, target)`` tuples (see
    :func:`target_annotations` for the target's keys; ``None``: an image without annotations)."""
    builder = CocoGroundTruthBuilder(categories)
    for image_id, height, width, target in images:
        builder.add(image_id, height, width, target)
    return builder.to_dict()
