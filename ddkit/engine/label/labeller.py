"""The labeller: every view of a batch through the teacher, mapped back, ensembled per image.

::

    images --forward_image of every view--> teacher (views of one shape in one call) --> inverse_instances /
        inverse_probs --> aggregator (batched) [--> keypoints: RoIs of the aggregated boxes mapped into each view,
        keypoint head, inverse_heatmaps, heatmap aggregator]

Several teachers (an ensemble of models, the paper's model distillation combined with data distillation) each
see every view; the aggregator ensembles all of their predictions, teacher by teacher, view by view.

Python API (``ddkit predict`` and the labelling stage use the same)::

    strategies = build_strategies(parse_label_config(block), task, info)
    preds = Labeller(task, model, info, strategies).label(images)   # one aggregated prediction per image
    preds = Labeller(task, [model_a, model_b], info, strategies).label(images)  # views x teachers ensembled
    preds = Labeller.from_block(task, model, info, block).label(images)  # the same
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ddkit.engine.label.config import Strategies, build_strategies, parse_label_config
from ddkit.engine.label.frames import ViewFrames, model_frames, to_view_frame
from ddkit.ops.geometry import scale_boxes
from ddkit.types import DatasetInfo, Instances


class Timer:
    """Wall-clock seconds per phase (``model`` is time inside the teacher)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def __call__(self, phase: str) -> "_Phase":
        return _Phase(self, phase)

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in sorted(self.seconds.items())}


class _Phase:
    def __init__(self, timer: Timer, phase: str):
        self.timer, self.phase = timer, phase

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        self.timer.seconds[self.phase] += time.perf_counter() - self.t0


@dataclass
class BatchPredictions:
    """The packed predictions of one batch (see :mod:`ddkit.engine.shards`): the ensemble, the untransformed
    view's own (``None`` without one) and, with ``keep_raw``, every ensembled view's own."""

    ensemble: dict[str, Tensor]
    single: dict[str, Tensor] | None = None
    raw: list[dict[str, Tensor]] | None = None


class Labeller:
    """Runs every view of a batch through the teacher (or each of several teachers) and aggregates per image."""

    def __init__(self, task: Any, model: nn.Module | Sequence[nn.Module], info: DatasetInfo, strategies: Strategies,
                 device: torch.device | str = "cpu", keep_raw: bool = False, timer: Timer | None = None):
        self.models = [model] if isinstance(model, nn.Module) else list(model)
        if not self.models:
            raise ValueError("Labeller needs at least one teacher model")
        self.task, self.info, self.s = task, info, strategies
        self.kind = strategies.kind
        self.device = torch.device(device)
        self.keep_raw = keep_raw
        self.timer = timer or Timer()
        self.category_ids = [int(c["id"]) for c in info.categories]
        num_views = len(strategies.views)
        # every (teacher, view) prediction is one slot, teacher-major: slot m * num_views + v
        self.ens_slots = [m * num_views + v for m in range(len(self.models)) for v in strategies.ensemble_views]
        self.slot_names = [self._slot_name(i) for i in self.ens_slots]
        self.keypoints = strategies.keypoint_block is not None  # a heatmap stage, or an aggregator that fuses them
        self.num_keypoints = info.num_keypoints if self.keypoints else None

    @classmethod
    def from_block(cls, task: Any, model: nn.Module, info: DatasetInfo, block: Any, registry: Any = None,
                   device: torch.device | str = "cpu", where: str = "label") -> "Labeller":
        """A labeller of a ``label`` block's views and aggregators (its selector is checked, not used)."""
        strategies = build_strategies(parse_label_config(block, where), task, info, registry, where=where)
        return cls(task, model, info, strategies, device)

    def _slot_name(self, slot: int) -> str:
        m, v = divmod(slot, len(self.s.views))
        name = self.s.view_names[v]
        return name if len(self.models) == 1 else f"teacher{m + 1}/{name}"

    def _view(self, slot: int) -> Any:
        return self.s.views[slot % len(self.s.views)]

    # ----------------------------------------------------------------------------------------- teacher calls
    def _frames(self, view_images: list[list[Tensor]], sizes: list[tuple[int, int]]) -> list[list[ViewFrames]]:
        """``[M][V]``: each view's images at the size each teacher runs them (:mod:`~ddkit.engine.label.frames`),
        for the boxes and the keypoint stage alike."""
        with self.timer("transform"):
            return [[model_frames(self.task, model, view, imgs, sizes)
                     for view, imgs in zip(self.s.views, view_images)] for model in self.models]

    def _predict(self, frames: list[list[ViewFrames]], view_images: list[list[Tensor]]) -> list[list[Any]]:
        """Predictions ``[M * V][B]`` (teacher-major slots) of the transformed images ``[V][B]``."""
        return [p for model, own in zip(self.models, frames) for p in self._predict_one(model, own, view_images)]

    def _predict_one(self, model: nn.Module, frames: list[ViewFrames],
                     view_images: list[list[Tensor]]) -> list[list[Any]]:
        """One teacher's predictions ``[V][B]`` of its ``frames`` of the transformed images ``[V][B]``, in each view's
        frame; images of one shape share a call."""
        groups: dict[Any, list[tuple[int, int]]] = defaultdict(list)
        shapes = {tuple(x.shape) for f in frames for x in f.images}
        # Same-shape images batch without padding. Images of many sizes (real photos) go one call per view
        # instead, so that calls stay large; a task that stacks its input (probs) always gets one shape per call.
        by_shape = self.kind.stacks_input or len(shapes) <= len(view_images)
        for v, f in enumerate(frames):
            for b, x in enumerate(f.images):
                groups[(f.native, tuple(x.shape) if by_shape else v)].append((v, b))
        out: list[list[Any]] = [[None] * len(imgs) for imgs in view_images]
        with torch.no_grad():
            for (native, _), members in groups.items():
                with self.timer("model"):
                    preds = self.task.predict(model, [frames[v].images[b] for v, b in members], native_size=native)
                if len(preds) != len(members):
                    raise RuntimeError(f"task {self.task.name!r}: predict returned {len(preds)} results for "
                                       f"{len(members)} images")
                for (v, b), p in zip(members, preds):
                    ratio = frames[v].ratios[b]
                    out[v][b] = p if ratio is None else to_view_frame(p, ratio, tuple(view_images[v][b].shape[-2:]))
        return out

    def _no_keypoints(self, inst: Instances) -> Instances:
        return Instances(inst.boxes, inst.scores, inst.labels, torch.zeros(len(inst), self.info.num_keypoints, 3),
                         inst.image_size)

    def _keypoints(self, frames: list[list[ViewFrames]], view_images: list[list[Tensor]], ens: list[Instances],
                   sizes: list[tuple[int, int]]) -> list[Instances]:
        """Keypoints of the aggregated boxes: RoIs mapped into each view, heatmaps back into the RoI frame,
        averaged by the heatmap aggregator."""
        todo = [b for b, inst in enumerate(ens) if len(inst)]
        if not todo:
            return [self._no_keypoints(i) for i in ens]
        rois: dict[int, list[Tensor]] = {}  # per view: the aggregated boxes in its frame, shared by every teacher
        maps_per_view: list[list[Tensor]] = []
        for slot in self.ens_slots:
            m, v = divmod(slot, len(self.s.views))
            view, model, seen = self.s.views[v], self.models[m], frames[m][v]
            if v not in rois:
                with self.timer("transform"):
                    rois[v] = [view.forward_instances(Instances(ens[b].boxes, ens[b].scores, ens[b].labels,
                                                                image_size=sizes[b]), sizes[b]).boxes.to(self.device)
                               for b in todo]
            in_frame = [r if seen.ratios[b] is None else scale_boxes(r, *seen.ratios[b]) for b, r in zip(todo, rois[v])]
            with torch.no_grad(), self.timer("model"):
                maps = self.task.keypoint_heatmaps(model, [seen.images[b] for b in todo], in_frame,
                                                   native_size=seen.native)
            with self.timer("inverse"):
                maps_per_view.append([view.inverse_heatmaps(m) for m in maps])
        out = list(ens)
        with self.timer("aggregate"):
            for j, b in enumerate(todo):
                stacked = torch.stack([maps_per_view[k][j] for k in range(len(self.ens_slots))])
                kps = self.s.keypoint_aggregator(stacked, ens[b].boxes.to(stacked.device)).cpu()
                out[b] = Instances(ens[b].boxes, ens[b].scores, ens[b].labels, kps, sizes[b])
        return [self._no_keypoints(inst) if inst.keypoints is None else inst for inst in out]

    # ----------------------------------------------------------------------------------------- one batch
    def _run(self, images: list[Tensor]) -> tuple[list[tuple[int, int]], list[list[Tensor]], list[Any], list[Any]]:
        """``(sizes, view images [V][B], per-slot predictions mapped back [M * V], aggregated per image [B])``."""
        sizes = [(int(x.shape[-2]), int(x.shape[-1])) for x in images]
        with self.timer("transform"):
            images = [x.to(self.device) for x in images]
            view_images = [[view.forward_image(x) for x in images] for view in self.s.views]
        frames = self._frames(view_images, sizes)
        preds = self._predict(frames, view_images)
        with self.timer("inverse"):
            back = [self.kind.inverse(self._view(i), p, sizes) for i, p in enumerate(preds)]
        with self.timer("aggregate"):
            ens = self.kind.aggregate(self.s.aggregator, [back[i] for i in self.ens_slots], sizes,
                                      self.category_ids, f"aggregator {self.s.aggregator_block['name']!r}")
        if self.s.keypoint_aggregator is not None:
            ens = self._keypoints(frames, view_images, ens, sizes)
        elif self.keypoints:
            ens = [self._no_keypoints(i) if i.keypoints is None else i for i in ens]
        return sizes, view_images, back, ens

    def label(self, images: list[Tensor]) -> list[Any]:
        """``images`` (readable, ``[C, H, W]``) -> one aggregated prediction per image (see
        :mod:`ddkit.engine.prediction_kinds`: :class:`Instances` with keypoints, or ``(labels [1], scores [1])``)."""
        return self._run(images)[3]

    def label_batch(self, images: list[Tensor]) -> BatchPredictions:
        """``images`` -> the packed ensemble, the first teacher's single view and (``keep_raw``) every ensembled
        slot's own predictions."""
        _, _, back, ens = self._run(images)
        kind = self.kind
        out = BatchPredictions(kind.pack_ensemble(ens, self.num_keypoints))
        if self.s.single_index is not None:
            out.single = kind.pack_view(back[self.s.single_index], self.category_ids, self.num_keypoints)
        if self.keep_raw:
            out.raw = [kind.pack_view(back[i], self.category_ids) for i in self.ens_slots]
        return out
