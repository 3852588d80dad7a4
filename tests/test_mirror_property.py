"""Labelling an image and its horizontal mirror with a flip-closed view set gives mirrored pseudo-labels: boxes
mirrored, keypoints mirrored with their left/right pairs swapped, scores equal (up to float error). Every registered
detection and keypoint model is checked (untrained, tiny), with the aggregators that apply to it.

The property holds whatever the network (a CNN is not flip-equivariant): both images see the same two network
inputs, ``I`` and ``flip(I)``, and only the roles of the views swap.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import ddkit
from ddkit.engine.label import Labeller, build_strategies, parse_label_config
from ddkit.ops.geometry import hflip_boxes, hflip_keypoints
from ddkit.testing import example_blocks, registered
from ddkit.testing.models import info_for_task

pytestmark = pytest.mark.usefixtures("one_thread")

VIEW_SETS = ([{"name": "identity"}, {"name": "hflip"}],
             [{"name": "scale", "factors": [0.75, 1.0], "flip": True}])


def check_mirror_property(task: Any, model: torch.nn.Module, info: Any, label_cfg: dict[str, Any],
                          image: torch.Tensor, atol: float = 1e-3) -> int:
    """Label ``image`` and its mirror; assert the mirror property; return the number of pseudo-label instances."""
    strategies = build_strategies(parse_label_config(label_cfg), task, info)
    labeller = Labeller(task, model.eval(), info, strategies)
    a, b = labeller.label([image, image.flip(-1)])
    w = image.shape[-1]
    assert len(a) == len(b)
    order_a, order_b = _score_order(a.scores, hflip_boxes(a.boxes, w)), _score_order(b.scores, b.boxes)
    assert torch.allclose(a.scores[order_a], b.scores[order_b], atol=1e-5)
    # match by score order, then compare geometry: mirrored boxes (and keypoints with pairs swapped)
    assert torch.equal(a.labels[order_a], b.labels[order_b])
    assert torch.allclose(hflip_boxes(a.boxes[order_a], w), b.boxes[order_b], atol=atol)
    if a.keypoints is not None and len(a):
        flip = info.flip_indices or list(range(a.keypoints.shape[1]))
        mirrored = hflip_keypoints(a.keypoints[order_a], w, flip)
        got = b.keypoints[order_b]
        assert torch.allclose(mirrored[..., :2], got[..., :2], atol=atol)
        assert torch.allclose(mirrored[..., 2], got[..., 2], atol=1e-4)
    return len(a)


def _score_order(scores: torch.Tensor, boxes: torch.Tensor, tie: float = 1e-5) -> torch.Tensor:
    """Indices sorting instances by score; scores within ``tie`` of each other (two clusters of an untrained model
    can score the same) are ordered by their boxes ``[N, 4]``, so that the two images' orders pair the same
    instances."""
    order = torch.argsort(scores, stable=True)
    if len(order) < 2:
        return order
    group = torch.cat([torch.zeros(1, dtype=torch.long), (scores[order].diff() > tie).long().cumsum(0)])
    keys = boxes[order].round(decimals=2).numpy()
    # np.lexsort: the last key is the primary one
    tied = np.lexsort((keys[:, 3], keys[:, 2], keys[:, 1], keys[:, 0], group.numpy()))
    return order[torch.from_numpy(tied)]


def _block(entry: Any) -> dict[str, Any]:
    """The spec's first example with its score threshold at 0, so that an untrained model predicts something."""
    import dataclasses

    block = {"name": entry.spec.name, **example_blocks(entry)[0]}
    fields = {f.name for f in dataclasses.fields(entry.spec.params)} if entry.spec.params else set()
    block.update({k: 0.0 for k in ("score_thresh", "conf") if k in fields})
    return block


def _build(task: Any, entry: Any, info: Any) -> torch.nn.Module:
    """Untrained heads start from constant biases (RetinaNet's prior): noise on every weight breaks the exact score
    ties that would make any ranking, mirrored or not, arbitrary."""
    torch.manual_seed(0)
    model = task.build_model(_block(entry), info)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _models(task_name: str) -> list[Any]:
    return [e for e in registered("models") if task_name in (e.spec.task, *getattr(e.spec, "also_tasks", ()))]


def _aggregators(keypoints: bool) -> list[str]:
    names = [e.spec.name for e in registered("aggregators") if e.spec.input == "instances"]
    return ["keypoint_fusion"] if keypoints else names


@pytest.mark.parametrize("entry", _models("detection"), ids=lambda e: e.spec.name)
def test_detectors_label_mirrored_images_mirrored(entry):
    task = ddkit.build("tasks", "detection")
    info = info_for_task("detection")
    model = _build(task, entry, info)
    image = torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(1))
    for agg in _aggregators(False):
        for views in VIEW_SETS:
            n = check_mirror_property(task, model, info, {"transforms": views, "aggregator": {"name": agg}}, image)
            assert n > 0, f"{entry.spec.name} / {agg}: nothing to compare"


# models built for keypoints first (a model that also serves keypoints, as yolo, needs a pose example of its own:
# its package tests it with check_mirror_property)
@pytest.mark.parametrize("entry", [e for e in registered("models") if e.spec.task == "keypoints"],
                         ids=lambda e: e.spec.name)
def test_keypoint_models_label_mirrored_images_mirrored(entry):
    task = ddkit.build("tasks", "keypoints")
    info = info_for_task("keypoints", num_keypoints=5)
    info.flip_indices = [0, 2, 1, 4, 3]  # two left/right pairs: a swap is visible
    model = _build(task, entry, info)
    image = torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(1))
    cfgs = [({"aggregator": {"name": "keypoint_fusion"}}, VIEW_SETS)]
    if hasattr(getattr(model, "roi_heads", None), "keypoint_predictor"):  # heatmaps on RoIs: the paper's path
        # identity + hflip only: resizing a mirror differs from mirroring a resize by ~1e-6, which the heatmap's
        # argmax can turn into a one-cell (~1 px) jump; flips alone are exact
        cfgs.append(({"aggregator": {"name": "box_voting"}, "keypoints": {"aggregator": {"name": "heatmap_mean"}}},
                     VIEW_SETS[:1]))
    for cfg, view_sets in cfgs:
        for views in view_sets:
            n = check_mirror_property(task, model, info, {"transforms": views, **cfg}, image)
            assert n > 0, f"{entry.spec.name} / {cfg}: nothing to compare"
