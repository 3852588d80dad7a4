"""What a task predicts, as one object: class probabilities (``probs``) or instances (boxes, optional keypoints).

A :class:`PredictionKind` owns everything that differs between the two: how a view's predictions are mapped back
and aggregated, how per-image predictions are packed into shard tensors and sliced out again, how a selector sees
them (:class:`~ddkit.engine.select.ScoredPredictions`), how the selected ones are written, and how they become
COCO results. Look it up once from the task's ``prediction_type`` with :func:`prediction_kind`; code elsewhere
never compares that string.

Per-image prediction of each kind: ``probs``: ``(labels [1], scores [1])``, the argmax category id and its
probability; ``instances``: :class:`~ddkit.types.Instances` (``boxes [N, 4]`` xyxy pixels, ``scores [N]``, ``labels
[N]`` category ids, optional ``keypoints [N, K, 3]``).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ddkit.engine.pseudo import COCO, IMAGE_LABELS
from ddkit.engine.select import ScoredPredictions
from ddkit.engine.shards import pack_instances, pack_probs, unpack_instances
from ddkit.errors import ConfigError


def _sizes(images: Mapping[str, Tensor]) -> list[list[int]]:
    return torch.stack([images["height"], images["width"]], 1).tolist()


class PredictionKind:
    """The interface (see the module docstring); :data:`PROBS` and :data:`INSTANCES` are the two kinds."""

    name: str = ""
    pseudo_format: str = ""  # ddkit.engine.pseudo: COCO or IMAGE_LABELS
    stacks_input: bool = False  # the task stacks its input: one image shape per teacher call
    has_keypoint_heads: bool = False  # keypoints are predicted per instance (RoIs of the aggregated boxes)
    default_aggregator: dict[str, Any] = {}
    bench_metrics: tuple[str, ...] = ()
    quality_metric: str = ""  # the metric that ranks bench rows and quality reports

    def inverse(self, view: Any, preds: Sequence[Any], sizes: Sequence[tuple[int, int]]) -> Any:
        """One view's predictions of a batch mapped back to the original frames (on the CPU)."""
        raise NotImplementedError

    def aggregate(self, aggregator: Any, per_view: Sequence[Any], sizes: Sequence[tuple[int, int]],
                  category_ids: Sequence[int], who: str = "aggregator") -> Any:
        """Ensemble ``per_view`` (one :meth:`inverse` result per view) into one prediction per image; what the
        aggregator returns is checked against its contract (an error names it as ``who``)."""
        raise NotImplementedError

    def pack_ensemble(self, preds: Sequence[Any], num_keypoints: int | None = None) -> dict[str, Tensor]:
        """Aggregated per-image predictions -> concatenated tensors (a shard's ``ensemble``)."""
        raise NotImplementedError

    def pack_view(self, preds: Any, category_ids: Sequence[int], num_keypoints: int | None = None
                  ) -> dict[str, Tensor]:
        """One view's predictions of a batch (an :meth:`inverse` result) -> concatenated tensors."""
        raise NotImplementedError

    def empty_ensemble(self, category_ids: Sequence[int], num_keypoints: int | None = None) -> dict[str, Tensor]:
        return self.pack_ensemble([], num_keypoints)

    def empty_view(self, category_ids: Sequence[int], num_keypoints: int | None = None) -> dict[str, Tensor]:
        raise NotImplementedError

    def unpack(self, packed: Mapping[str, Tensor], images: Mapping[str, Tensor]) -> list[Any]:
        """Per-image predictions of a packed shard part (``images``: the shard's image table)."""
        raise NotImplementedError

    def scored(self, pred: Any) -> ScoredPredictions:
        raise NotImplementedError

    def write(self, writer: Any, meta: Mapping[str, Any], name: str, j: int, pred: Any, selection: Any) -> None:
        """Write image ``j`` of a shard (``meta``: its image table as lists) with what the selector kept."""
        raise NotImplementedError

    def unpack_targets(self, targets: Mapping[str, Tensor]) -> list[dict[str, Tensor]]:
        """Per-image hidden ground truth of a packed shard part."""
        raise NotImplementedError

    def unpack_raw_views(self, views: Sequence[Mapping[str, Tensor]], images: Mapping[str, Tensor]) -> list[Any]:
        """Per-view raw predictions of a shard, each indexable by image."""
        raise NotImplementedError

    def raw_fields(self, per_view: Sequence[Any]) -> dict[str, Any]:
        """The :class:`~ddkit.engine.raw_predictions.RawImage` fields of one image's per-view predictions."""
        raise NotImplementedError


class ProbsKind(PredictionKind):
    name = "probs"
    pseudo_format = IMAGE_LABELS
    stacks_input = True
    default_aggregator = {"name": "prob_mean"}
    bench_metrics = ("accuracy", "selected_accuracy", "coverage", "selected", "agg_ms_per_image")
    quality_metric = "accuracy"

    def inverse(self, view: Any, preds: Sequence[Any], sizes: Sequence[tuple[int, int]]) -> Any:
        return torch.stack([view.inverse_probs(p.detach().float()) for p in preds]).cpu()  # [B, C]

    def aggregate(self, aggregator: Any, per_view: Sequence[Any], sizes: Any, category_ids: Sequence[int],
                  who: str = "aggregator") -> list[Any]:
        from ddkit.engine.aggregation import check_probs_output

        probs = torch.stack(list(per_view))  # [V, B, C] -> [B], [B]
        labels, scores = check_probs_output(aggregator(probs), probs.shape[1], probs.shape[2], who)
        ids = torch.as_tensor(list(category_ids), dtype=torch.int64)
        labels, scores = ids[labels.long().cpu()], scores.float().cpu()
        return [(labels[j:j + 1], scores[j:j + 1]) for j in range(len(labels))]

    def pack_ensemble(self, preds: Sequence[Any], num_keypoints: int | None = None) -> dict[str, Tensor]:
        if not preds:
            return {"labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}
        return {"labels": torch.cat([p[0] for p in preds]), "scores": torch.cat([p[1] for p in preds])}

    def pack_view(self, preds: Any, category_ids: Sequence[int], num_keypoints: int | None = None
                  ) -> dict[str, Tensor]:
        return pack_probs(preds, category_ids)

    def empty_view(self, category_ids: Sequence[int], num_keypoints: int | None = None) -> dict[str, Tensor]:
        return pack_probs(torch.zeros(0, len(category_ids)), category_ids)

    def unpack(self, packed: Mapping[str, Tensor], images: Mapping[str, Tensor]) -> list[Any]:
        n = len(images["image_id"])
        return [(packed["labels"][j:j + 1], packed["scores"][j:j + 1]) for j in range(n)]

    def scored(self, pred: Any) -> ScoredPredictions:
        labels, scores = pred
        return ScoredPredictions(scores.float(), labels.long())

    def write(self, writer: Any, meta: Mapping[str, Any], name: str, j: int, pred: Any, selection: Any) -> None:
        if bool(selection.keep[0]):  # only selected images are listed
            writer.add_image(meta["image_id"][j], name, meta["height"][j], meta["width"][j], meta["index"][j])
            writer.add_label(meta["image_id"][j], int(pred[0][0]), float(pred[1][0]))

    def unpack_targets(self, targets: Mapping[str, Tensor]) -> list[dict[str, Tensor]]:
        return [{"label": int(x)} for x in targets["label"]]

    def unpack_raw_views(self, views: Sequence[Mapping[str, Tensor]], images: Mapping[str, Tensor]) -> list[Any]:
        return [v["probs"] for v in views]

    def raw_fields(self, per_view: Sequence[Any]) -> dict[str, Any]:
        return {"probs": torch.stack(list(per_view))}  # [V, C]


class InstancesKind(PredictionKind):
    name = "instances"
    pseudo_format = COCO
    has_keypoint_heads = True
    default_aggregator = {"name": "box_voting"}
    bench_metrics = ("AP", "AP50", "AR", "precision", "recall", "inst_per_image", "agg_inst_per_image",
                     "gt_per_image", "agg_ms_per_image")
    quality_metric = "AP"

    def inverse(self, view: Any, preds: Sequence[Any], sizes: Sequence[tuple[int, int]]) -> Any:
        return [view.inverse_instances(p, sizes[b]).to("cpu") for b, p in enumerate(preds)]

    def aggregate(self, aggregator: Any, per_view: Sequence[Any], sizes: Any, category_ids: Sequence[int],
                  who: str = "aggregator") -> list[Any]:
        from ddkit.engine.aggregation import aggregate_images

        return aggregate_images(aggregator, [[v[b] for v in per_view] for b in range(len(sizes))], sizes, who)

    def pack_ensemble(self, preds: Sequence[Any], num_keypoints: int | None = None) -> dict[str, Tensor]:
        return pack_instances(preds, num_keypoints)

    def pack_view(self, preds: Any, category_ids: Sequence[int], num_keypoints: int | None = None
                  ) -> dict[str, Tensor]:
        return pack_instances(preds, num_keypoints)

    def empty_view(self, category_ids: Sequence[int], num_keypoints: int | None = None) -> dict[str, Tensor]:
        return pack_instances([], num_keypoints)

    def unpack(self, packed: Mapping[str, Tensor], images: Mapping[str, Tensor]) -> list[Any]:
        return unpack_instances(packed, _sizes(images))

    def scored(self, pred: Any) -> ScoredPredictions:
        kps = None if pred.keypoints is None else pred.keypoints[..., 2]
        return ScoredPredictions(pred.scores, pred.labels, kps)

    def write(self, writer: Any, meta: Mapping[str, Any], name: str, j: int, pred: Any, selection: Any) -> None:
        iid = meta["image_id"][j]  # every readable image is listed, with or without pseudo-labels
        writer.add_image(iid, name, meta["height"][j], meta["width"][j], meta["index"][j])
        vis = None if selection.keypoints is None else selection.keypoints[selection.keep]
        writer.add_instances(iid, pred[selection.keep], vis)

    def unpack_targets(self, targets: Mapping[str, Tensor]) -> list[dict[str, Tensor]]:
        out, start = [], 0
        for n in targets["counts"].tolist():
            sl = slice(start, start + n)
            g = {k: targets[k][sl] for k in ("boxes", "labels", "iscrowd", "area", "keypoints") if k in targets}
            out.append(g)
            start += n
        return out

    def unpack_raw_views(self, views: Sequence[Mapping[str, Tensor]], images: Mapping[str, Tensor]) -> list[Any]:
        return [unpack_instances(v, _sizes(images)) for v in views]

    def raw_fields(self, per_view: Sequence[Any]) -> dict[str, Any]:
        return {"views": list(per_view)}


PROBS = ProbsKind()
INSTANCES = InstancesKind()
KINDS: dict[str, PredictionKind] = {k.name: k for k in (PROBS, INSTANCES)}


def prediction_kind(prediction_type: Any, who: str = "task") -> PredictionKind:
    """The :class:`PredictionKind` of a ``prediction_type`` (``"probs"`` or ``"instances"``); a task object may be
    passed (its ``prediction_type`` is read)."""
    if isinstance(prediction_type, PredictionKind):
        return prediction_type
    if not isinstance(prediction_type, str):
        who = f"task {getattr(prediction_type, 'name', prediction_type)!r}"
        prediction_type = getattr(prediction_type, "prediction_type", None)
    kind = KINDS.get(prediction_type) if isinstance(prediction_type, str) else None
    if kind is None:
        raise ConfigError(f"{who}: prediction_type must be 'probs' or 'instances', got {prediction_type!r}")
    return kind
