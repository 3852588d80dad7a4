"""Builtin tasks: ``classification``, ``detection`` and ``keypoints`` (see :class:`ddkit.engine.task.Task`).

* classification: any ``models`` entry of task ``classification``; cross-entropy; top-1 accuracy / error.
* detection: torchvision detectors (``fasterrcnn``, ``retinanet``, ``fcos``); their own losses; COCO box AP.
* keypoints: ``keypointrcnn``; its own losses; COCO keypoint AP (OKS with the dataset's sigmas) and box AP.

Dataset category ids are mapped to contiguous model labels (``0..C-1`` for classification logits, ``1..C`` for
detectors, 0 being background) inside the task; predictions carry dataset category ids again.
"""
from __future__ import annotations

from contextlib import contextmanager

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddkit import ConfigError, DataError, DatasetInfo, Instances, hookimpl
from ddkit.engine.keypoint_meta import require_flip_indices
from ddkit.engine.task import (TrainOutputs, attach_model_info, category_ids, coco_evaluate_per_category,
                               coco_ground_truth, get_target, unwrap_model)
from ddkit.types import TaskSpec


def _progress(it, total: int, desc: str, enabled: bool):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, total=total, desc=desc, unit="batch", leave=False)


class _BaseTask:
    name = ""
    prediction_type = ""
    model_tasks: tuple[str, ...] = ()
    has_keypoints = False
    supports_translate = False
    headline = "AP"
    higher_is_better = True

    def __init__(self, **params: Any):
        self.params = params

    def config(self) -> dict[str, Any]:
        return {"name": self.name, **self.params}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"

    # ------------------------------------------------------------------------------------------------ models
    def build_model(self, model_cfg: Mapping[str, Any], info: DatasetInfo) -> nn.Module:
        from ddkit import get_registry

        entry, kwargs = get_registry().params("models", model_cfg, where=f"{self.name} model")
        def serves(spec: Any) -> bool:
            return bool({spec.task, *getattr(spec, "also_tasks", ())} & set(self.model_tasks))

        if not serves(entry.spec):
            raise ConfigError(f"model {entry.spec.name!r} is for task {entry.spec.task!r}, not {self.name!r}; "
                              f"models for {self.name}: "
                              f"{', '.join(s.name for s in get_registry().specs('models') if serves(s))}")
        self.check_info(info)
        model = entry.spec.factory(**kwargs, info=info)
        return attach_model_info(model, {"name": entry.spec.name, **kwargs}, info, self.config())

    def check_info(self, info: DatasetInfo) -> None:
        if not info.categories:
            raise ConfigError(f"{self.name}: the dataset has no categories")

    def to_device(self, batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
        def move(x: Any) -> Any:
            if isinstance(x, Tensor):
                return x.to(device, non_blocking=True)
            if isinstance(x, dict):
                return {k: move(v) for k, v in x.items()}
            if isinstance(x, list):
                return [move(v) for v in x]
            return x

        return {k: move(v) for k, v in batch.items()}

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, Tensor]:
        return self.training_forward(model, batch).losses

    @staticmethod
    def _index(samples: Sequence[tuple[Tensor, dict]]) -> Tensor:
        return torch.tensor([int(t.get("_index", -1)) for _, t in samples], dtype=torch.int64)

    def evaluate(self, model: nn.Module, dataset: Any, batch_size: int = 8,
                 progress: bool | None = None) -> dict[str, float]:
        if progress is None:
            import sys

            progress = sys.stderr.isatty()
        preds: list[Any] = []
        n = len(dataset)
        starts = range(0, n, batch_size)
        for s in _progress(starts, len(starts), f"evaluating {self.name}", progress and n > 4 * batch_size):
            images = [dataset[i][0] for i in range(s, min(n, s + batch_size))]
            preds.extend(self.predict(model, images))
        return self.evaluate_predictions(preds, dataset)


# ------------------------------------------------------------------------------------------------ classification
@dataclass
class ClassificationParams:
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


class ClassificationTask(_BaseTask):
    """Image classification. Category ids must be ``0..C-1`` (they are the logits' indices)."""

    name = "classification"
    prediction_type = "probs"
    model_tasks = ("classification",)
    supports_translate = True  # whole-pixel shifts keep a digit's label
    trains_on_unlabeled = True  # its loss can leave unlabeled items out (a KD transfer set)
    headline = "error %"
    higher_is_better = False

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__(label_smoothing=label_smoothing)
        self.label_smoothing = label_smoothing

    def check_info(self, info: DatasetInfo) -> None:
        super().check_info(info)
        ids = [int(c["id"]) for c in info.categories]
        if ids != list(range(len(ids))):
            raise ConfigError(f"classification needs category ids 0..C-1 in order, got {ids[:10]}")

    def collate(self, samples: Sequence[tuple[Tensor, dict[str, Any]]]) -> dict[str, Any]:
        images = torch.stack([s[0] for s in samples])
        labels = torch.tensor([int(t.get("label", -1)) for _, t in samples], dtype=torch.int64)
        return {"images": images, "labels": labels, "targets": [t for _, t in samples],
                "index": self._index(samples)}

    def to_device(self, batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
        """Moves the stacked tensors; the per-sample target dicts stay on the host (the loss reads ``labels``)."""
        return {k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in batch.items()}

    def training_forward(self, model: nn.Module, batch: dict[str, Any]) -> TrainOutputs:
        """The cross-entropy over the items with a label; the items of a KD transfer set's unlabeled part
        (``target["unlabeled"]``) reach only the loss terms that read the teacher (0 where a batch has none)."""
        labels = batch["labels"]
        known = labels >= 0
        flags = None if bool(known.all()) else known.tolist()  # one host sync where every item has its label
        if flags is not None and any(not (k or t.get("unlabeled")) for t, k in zip(batch["targets"], flags)):
            raise DataError("a training batch has samples without a 'label' (unlabeled data needs pseudo-labels)")
        logits = model(batch["images"])
        if flags is None:
            ce = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        elif any(flags):
            ce = F.cross_entropy(logits[known], labels[known], label_smoothing=self.label_smoothing)
        else:
            ce = logits.sum() * 0.0
        return TrainOutputs({"ce": ce}, logits)

    def feature_forward(self, model: nn.Module, batch: dict[str, Any]) -> Tensor:
        return model(batch["images"])

    @torch.no_grad()
    def predict(self, model: nn.Module, images: Sequence[Tensor], native_size: bool = False) -> list[Tensor]:
        model.eval()
        device = next(unwrap_model(model).parameters()).device
        x = torch.stack(list(images)).to(device)
        return list(F.softmax(model(x).float(), dim=-1).cpu())

    def evaluate_predictions(self, preds: Sequence[Tensor], dataset: Any) -> dict[str, float]:
        return self.evaluate_per_class(preds, dataset)[0]

    def evaluate_per_class(self, preds: Sequence[Tensor], dataset: Any
                           ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Accuracy and error, and one row per class: ``accuracy`` (its share of items predicted right: the class's
        recall), ``precision`` (the share right of the items predicted as it) and ``instances``; ``nan`` where a
        count is 0."""
        if len(preds) != len(dataset):
            raise ValueError(f"{len(preds)} predictions for {len(dataset)} items")
        labels = torch.tensor([int(get_target(dataset, i)["label"]) for i in range(len(dataset))], dtype=torch.int64)
        pred = torch.stack([p.reshape(-1) for p in preds]).argmax(1) if preds else labels
        acc = float((pred == labels).float().mean()) if preds else float("nan")
        rows = []
        for c in dataset.info.categories:
            k = int(c["id"])
            true, said = labels == k, pred == k
            right = int((true & said).sum())
            rows.append({"id": k, "name": c.get("name"), "instances": int(true.sum()),
                         "accuracy": right / int(true.sum()) if true.any() else float("nan"),
                         "precision": right / int(said.sum()) if said.any() else float("nan")})
        return {"accuracy": acc, "error": 1.0 - acc, "num_samples": len(labels)}, rows

    def chance_level(self, info: DatasetInfo) -> float:
        """The error % of a model that learnt nothing (uniform guessing): ``100 (1 - 1 / C)``."""
        return 100.0 * (1.0 - 1.0 / max(1, info.num_classes))

    def hflip(self, image: Tensor, target: dict[str, Any], info: DatasetInfo) -> tuple[Tensor, dict[str, Any]]:
        return image.flip(-1), target

    def table_row(self, metrics: Mapping[str, float]) -> dict[str, float]:
        return {"error %": round(100 * float(metrics.get("error", float("nan"))), 2),
                "accuracy %": round(100 * float(metrics.get("accuracy", float("nan"))), 2)}

    def quality_metric(self, quality: Mapping[str, Any]) -> str:
        return "accuracy"


# ----------------------------------------------------------------------------------------------------- detection
@dataclass
class DetectionParams:
    min_box_size: float = 1.0
    transfer_score: float = 0.5  # a KD transfer set's unlabeled images: the teacher's detections kept as boxes

    def __post_init__(self) -> None:
        if self.min_box_size < 0:
            raise ValueError(f"min_box_size must be >= 0, got {self.min_box_size}")
        if not 0.0 <= self.transfer_score <= 1.0:
            raise ValueError(f"transfer_score must be in [0, 1], got {self.transfer_score}")


def _groups(images: Sequence[Tensor], by_size: bool) -> list[tuple[tuple[int, int] | None, list[int]]]:
    """Indices of ``images`` grouped by ``(H, W)`` when ``by_size``, else one group with size ``None``."""
    if not by_size:
        return [(None, list(range(len(images))))]
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape[-2:]), []).append(i)
    return list(groups.items())


def _model_at_size(inner: nn.Module, size: tuple[int, int] | None):
    """The model's own ``at_size(size)`` context when it has one (a model that resizes its input itself), else
    torchvision's transform kept at ``size``."""
    own = getattr(inner, "at_size", None)
    return own(size) if callable(own) else _at_size(inner.transform, size)


@contextmanager
def _at_size(transform: nn.Module, size: tuple[int, int] | None):
    """Make torchvision's GeneralizedRCNNTransform keep images of ``size`` as they are (``None``: no change)."""
    if size is None:
        yield
        return
    old = transform.min_size, transform.max_size
    transform.min_size, transform.max_size = (min(size),), max(size)
    try:
        yield
    finally:
        transform.min_size, transform.max_size = old


def _coco_eval(gt: dict, results: list[dict], iou_type: str, sigmas: list[float] | None = None
               ) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
    """COCO AP of ``results`` and each category's, from one evaluation; the summary is 0 everywhere when there is
    nothing to score (pycocotools would give -1)."""
    zeros = {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "APs": 0.0, "APm": 0.0, "APl": 0.0}
    if not gt["annotations"]:  # no category has an instance: nothing to score
        return zeros, {int(c["id"]): {"AP": float("nan"), "AP50": float("nan"), "instances": 0}
                       for c in gt["categories"]}
    stats, per = coco_evaluate_per_category(gt, results, iou_type, sigmas)
    return (zeros if not results else stats), per


def _rows(per: Mapping[int, Mapping[str, float]], info: DatasetInfo) -> list[dict[str, Any]]:
    """Per-category metrics as rows in the dataset's category order, with each category's id and name."""
    return [{"id": int(c["id"]), "name": c.get("name"), **per[int(c["id"])]} for c in info.categories]


class DetectionTask(_BaseTask):
    """Object detection with torchvision detectors; COCO box AP (``AP, AP50, AP75, APs, APm, APl``; ``-1`` where a
    size range has no ground truth, as pycocotools reports)."""

    name = "detection"
    prediction_type = "instances"
    model_tasks = ("detection",)

    def __init__(self, min_box_size: float = 1.0, transfer_score: float = 0.5):
        super().__init__(min_box_size=min_box_size, transfer_score=transfer_score)
        self.min_box_size, self.transfer_score = min_box_size, transfer_score

    def collate(self, samples: Sequence[tuple[Tensor, dict[str, Any]]]) -> dict[str, Any]:
        return {"images": [s[0] for s in samples], "targets": [t for _, t in samples], "index": self._index(samples)}

    def _model_targets(self, model: nn.Module, targets: Sequence[dict[str, Any]]) -> list[dict[str, Tensor]]:
        ids = category_ids(model)
        lut = {cid: k + 1 for k, cid in enumerate(ids)}
        out = []
        for t in targets:
            if "boxes" not in t or "labels" not in t:
                raise DataError(f"image {t.get('image_id')}: a training target needs 'boxes' and 'labels'")
            boxes, labels = t["boxes"].float(), t["labels"]
            keep = ((boxes[:, 2:] - boxes[:, :2]) >= max(self.min_box_size, 1e-3)).all(1)
            if "iscrowd" in t:
                keep &= t["iscrowd"] == 0
            unknown = [int(c) for c in labels[keep].tolist() if int(c) not in lut]
            if unknown:
                raise DataError(f"image {t.get('image_id')}: category id {unknown[0]} is not in the model's "
                                f"categories {ids[:10]}")
            m = {"boxes": boxes[keep].reshape(-1, 4),
                 "labels": torch.tensor([lut[int(c)] for c in labels[keep].tolist()], dtype=torch.int64,
                                        device=boxes.device)}
            if self.has_keypoints:
                m["keypoints"] = t["keypoints"][keep].float()
            out.append(m)
        return out

    def teacher_targets(self, teacher: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
        """The items of a KD transfer set's unlabeled part (``target["unlabeled"]``) take the teacher's detections
        scoring at least ``transfer_score`` as their boxes: the hard labels that Chen et al. 2017 read from the
        ground truth, read from the teacher where there is none, so the detector's own loss (and its sampling of
        RoIs and anchors, which KD terms reuse) treats them as labeled. The batch's other items are left as they
        are; an image where the teacher finds nothing trains as background."""
        marked = [i for i, t in enumerate(batch["targets"]) if t.get("unlabeled")]
        if not marked:
            return batch
        preds = self.predict(teacher, [batch["images"][i] for i in marked])
        targets = list(batch["targets"])
        for i, p in zip(marked, preds):
            keep = p.scores >= self.transfer_score
            device = batch["images"][i].device
            targets[i] = {**targets[i], "boxes": p.boxes[keep].to(device), "labels": p.labels[keep].to(device)}
        return {**batch, "targets": targets}

    def training_forward(self, model: nn.Module, batch: dict[str, Any]) -> TrainOutputs:
        targets = self._model_targets(model, batch["targets"])
        losses = model(list(batch["images"]), targets)
        return TrainOutputs(dict(losses), None)

    def feature_forward(self, model: nn.Module, batch: dict[str, Any]) -> None:
        """Runs the model's transform and backbone (what hint losses hook); detectors give no class logits."""
        inner = unwrap_model(model)
        own = getattr(inner, "feature_forward", None)  # a model with its own input pipeline runs it itself
        if callable(own):
            own(list(batch["images"]))
            return None
        images, _ = inner.transform(list(batch["images"]))
        inner.backbone(images.tensors)
        return None

    def _to_instances(self, model: nn.Module, out: dict[str, Tensor], size: tuple[int, int]) -> Instances:
        ids = torch.tensor(category_ids(model), dtype=torch.int64)
        labels = ids[(out["labels"].cpu() - 1).clamp(min=0)]
        kps = None
        if "keypoints" in out:
            kps = out["keypoints"].cpu().float().clone()
            if "keypoints_scores" in out:
                kps[..., 2] = out["keypoints_scores"].cpu().float()
        return Instances(out["boxes"].cpu().float(), out["scores"].cpu().float(), labels, kps, size)

    def keypoint_score_kind(self, model: nn.Module) -> str:
        """What the third value of this model's predicted keypoints is: ``"logit"`` for a torchvision heatmap head
        (``keypoints_scores``: the heatmap's value at its argmax, unbounded), else the model's own
        ``keypoint_score_kind`` (default ``"probability"``, in [0, 1], e.g. a YOLO pose head's sigmoid)."""
        inner = unwrap_model(model)
        own = getattr(inner, "keypoint_score_kind", None)
        if isinstance(own, str):
            return own
        heads = getattr(inner, "roi_heads", None)
        return "logit" if getattr(heads, "keypoint_predictor", None) is not None else "probability"

    @torch.no_grad()
    def predict(self, model: nn.Module, images: Sequence[Tensor], native_size: bool = False) -> list[Instances]:
        """``native_size``: run at each input's own size instead of resizing it to the model's ``min_size``
        (multi-scale inference: the test-time transform chose the size)."""
        model.eval()
        inner = unwrap_model(model)
        device = next(inner.parameters()).device
        results: list[Instances | None] = [None] * len(images)
        for size, idx in _groups(images, native_size):
            with _model_at_size(inner, size):
                outs = inner([images[i].to(device) for i in idx])
            for i, o in zip(idx, outs):
                results[i] = self._to_instances(model, o, tuple(images[i].shape[-2:]))
        return results

    # ------------------------------------------------------------------------------------------------ evaluation
    def coco_ground_truth(self, dataset: Any) -> dict[str, Any]:
        """The dataset's targets as a COCO ground-truth dict (image ids are item positions; keypoints for a
        keypoint task only): the engine's one builder."""
        def images():
            for i in range(len(dataset)):
                t = get_target(dataset, i)
                if not self.has_keypoints:
                    t = {k: v for k, v in t.items() if k != "keypoints"}
                yield (i, *t.get("size", (0, 0)), t)

        return coco_ground_truth(images(), dataset.info.categories)

    @staticmethod
    def _results(preds: Sequence[Instances], with_keypoints: bool) -> list[dict[str, Any]]:
        res = []
        for i, p in enumerate(preds):
            for j in range(len(p)):
                x0, y0, x1, y1 = p.boxes[j].tolist()
                r = {"image_id": i, "category_id": int(p.labels[j]), "bbox": [x0, y0, x1 - x0, y1 - y0],
                     "score": float(p.scores[j])}
                if with_keypoints:
                    if p.keypoints is None:
                        raise ValueError("keypoint evaluation needs predictions with keypoints")
                    kp = p.keypoints[j].float().clone()
                    kp[:, 2] = 1.0
                    r["keypoints"] = kp.reshape(-1).tolist()
                res.append(r)
        return res

    def table_row(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """AP columns in %; for keypoints ``AP`` is keypoint AP (OKS) and ``box AP`` stands beside it."""
        names = (("AP", "AP"), ("AP50", "AP50"), ("AP75", "AP75"), ("bbox_AP", "box AP"))
        return {name: round(100 * float(metrics[k]), 2) for k, name in names if k in metrics}

    def quality_metric(self, quality: Mapping[str, Any]) -> str:
        """The labelling quality report calls keypoint AP ``kp_AP``; box AP ``AP``."""
        return "kp_AP" if "kp_AP" in quality else "AP"

    def evaluate_predictions(self, preds: Sequence[Instances], dataset: Any) -> dict[str, float]:
        return self.evaluate_per_class(preds, dataset)[0]

    def evaluate_per_class(self, preds: Sequence[Instances], dataset: Any
                           ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """:meth:`evaluate_predictions`'s metrics and one row per category: COCO ``AP`` and ``AP50`` (keypoints:
        OKS AP; :func:`~ddkit.engine.coco_eval.coco_evaluate_per_category`) and its ground-truth ``instances``,
        from the same evaluation."""
        if len(preds) != len(dataset):
            raise ValueError(f"{len(preds)} predictions for {len(dataset)} items")
        return self._box_eval(preds, self.coco_ground_truth(dataset), dataset.info)

    def _box_eval(self, preds: Sequence[Instances], gt: dict, info: DatasetInfo
                  ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        stats, per = _coco_eval(gt, self._results(preds, False), "bbox")
        return {k: stats[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")}, _rows(per, info)

    def chance_level(self, info: DatasetInfo) -> float:
        """The AP (%) of a model that learnt nothing: 0."""
        return 0.0

    def input_size(self, model: nn.Module, image_size: tuple[int, int]) -> tuple[int, int]:
        """``(H, W)`` the model runs an image of ``image_size`` at by default: its own ``input_size`` (a model that
        resizes its input itself, e.g. YOLO's ``imgsz``), else torchvision's transform (``min_size`` /
        ``max_size``, as ``GeneralizedRCNNTransform`` resizes in eval)."""
        inner = unwrap_model(model)
        own = getattr(inner, "input_size", None)
        if callable(own):
            return tuple(own(image_size))
        h, w = image_size
        scale = min(float(inner.transform.min_size[-1]) / min(h, w), float(inner.transform.max_size) / max(h, w))
        return int(h * scale), int(w * scale)

    def hflip(self, image: Tensor, target: dict[str, Any], info: DatasetInfo) -> tuple[Tensor, dict[str, Any]]:
        w = image.shape[-1]
        t = dict(target)
        if "boxes" in t:
            b = t["boxes"].clone()
            b[:, [0, 2]] = w - t["boxes"][:, [2, 0]]
            t["boxes"] = b
        if t.get("keypoints") is not None and len(t["keypoints"]):
            kp = t["keypoints"].clone()
            kp[..., 0] = torch.where(kp[..., 2] > 0, w - kp[..., 0], kp[..., 0])
            t["keypoints"] = kp[:, require_flip_indices(info, "train.hflip")]
        return image.flip(-1), t


class KeypointTask(DetectionTask):
    """Keypoint detection with torchvision's Keypoint R-CNN; COCO keypoint AP with the dataset's OKS sigmas
    (``AP, AP50, AP75, APm, APl``) and box AP (``bbox_AP``...)."""

    name = "keypoints"
    model_tasks = ("keypoints",)
    has_keypoints = True
    teacher_targets = None  # a transfer set's keypoints from the teacher: not built (refused up front)

    def check_info(self, info: DatasetInfo) -> None:
        super().check_info(info)
        if not info.num_keypoints:
            raise ConfigError("the keypoints task needs a dataset with keypoints (DatasetInfo.num_keypoints)")

    def evaluate_per_class(self, preds: Sequence[Instances], dataset: Any
                           ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Keypoint AP (OKS, the dataset's sigmas) beside box AP (``bbox_AP``...); the rows are per category's
        keypoint AP."""
        if len(preds) != len(dataset):
            raise ValueError(f"{len(preds)} predictions for {len(dataset)} items")
        gt = self.coco_ground_truth(dataset)
        box, _ = self._box_eval(preds, gt, dataset.info)
        stats, per = _coco_eval(gt, self._results(preds, True), "keypoints", dataset.info.keypoint_sigmas)
        out = {k: stats[k] for k in ("AP", "AP50", "AP75", "APm", "APl")}
        out.update({f"bbox_{k}": v for k, v in box.items()})
        return out, _rows(per, dataset.info)

    @torch.no_grad()
    def keypoint_heatmaps(self, model: nn.Module, images: Sequence[Tensor], rois: Sequence[Tensor],
                          native_size: bool = False) -> list[Tensor]:
        if native_size and len({tuple(im.shape[-2:]) for im in images}) > 1:
            return [m for im, r in zip(images, rois) for m in self.keypoint_heatmaps(model, [im], [r], True)]
        with _model_at_size(unwrap_model(model), tuple(images[0].shape[-2:]) if native_size and images else None):
            return self._keypoint_heatmaps(model, images, rois)

    def _keypoint_heatmaps(self, model: nn.Module, images: Sequence[Tensor], rois: Sequence[Tensor]) -> list[Tensor]:
        model.eval()
        inner = unwrap_model(model)
        heads = getattr(inner, "roi_heads", None)
        if heads is None or getattr(heads, "keypoint_predictor", None) is None:
            raise ConfigError("keypoint_heatmaps needs a model with a keypoint head on RoIs (keypointrcnn); a model "
                              "that regresses keypoints is labelled with label.aggregator: {name: keypoint_fusion}")
        device = next(inner.parameters()).device
        images = [im.to(device) for im in images]
        orig = [tuple(im.shape[-2:]) for im in images]
        batch, _ = inner.transform(images)
        scaled = []
        for r, (h, w), (nh, nw) in zip(rois, orig, batch.image_sizes):
            scale = torch.tensor([nw / w, nh / h, nw / w, nh / h], device=device)
            scaled.append(r.to(device).float().reshape(-1, 4) * scale)
        features = inner.backbone(batch.tensors)
        x = heads.keypoint_roi_pool(features, scaled, batch.image_sizes)
        x = heads.keypoint_head(x)
        maps = heads.keypoint_predictor(x)
        return list(maps.split([len(r) for r in scaled]))

    def heatmaps_to_keypoints(self, heatmaps: Sequence[Tensor], rois: Sequence[Tensor]) -> list[Tensor]:
        """Per image ``[N, K, 3]`` ``(x, y, heatmap logit)`` (:func:`ddkit.ops.heatmaps.heatmaps_to_keypoints`, the
        same decoding as torchvision's Keypoint R-CNN)."""
        from ddkit.ops.heatmaps import heatmaps_to_keypoints

        return [heatmaps_to_keypoints(maps.float(), r.to(maps.device).float().reshape(-1, 4))
                for maps, r in zip(heatmaps, rois)]


# ------------------------------------------------------------------------------------------------------ register
@hookimpl
def ddkit_tasks():
    yield TaskSpec(name="classification", factory=ClassificationTask, params=ClassificationParams,
                   summary="image classification: cross-entropy, top-1 accuracy")
    yield TaskSpec(name="detection", factory=DetectionTask, params=DetectionParams,
                   summary="object detection (torchvision detectors): COCO box AP")
    yield TaskSpec(name="keypoints", factory=KeypointTask, params=DetectionParams,
                   summary="keypoint detection (Keypoint R-CNN): COCO keypoint AP")
