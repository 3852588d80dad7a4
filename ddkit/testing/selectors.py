"""Contract checks for selectors (kind ``selectors``), reusable by third-party plugin authors::

    from ddkit.testing import registered
    from ddkit.testing.selectors import check_selector_entry

    @pytest.mark.parametrize("entry", registered("selectors"), ids=lambda e: e.spec.name)
    def test_selector_contract(entry):
        check_selector_entry(entry)

See :mod:`ddkit.engine.select` for the interface the checks hold a selector to.
"""
from __future__ import annotations

import json
from typing import Any, Iterable

import torch

from ddkit.engine.select import LabeledStats, ListStream, ScoredPredictions, Selection, check_selection
from ddkit.registry import Entry, validate_params
from ddkit.testing import example_blocks
from ddkit.types import StrategySpec

TASKS = ("classification", "detection", "keypoints")


def build_from_spec(spec: StrategySpec, block: dict[str, Any]) -> Any:
    return spec.factory(**validate_params(spec, block, where=spec.name))


def synthetic_predictions(task: str, num_images: int = 12, num_classes: int = 3, num_keypoints: int = 5,
                          seed: int = 0) -> tuple[LabeledStats, ListStream]:
    """A labeled set's statistics and a stream of random predictions of ``num_images`` unlabeled images.

    Scores are quantised to 0.05 so that ties occur; some images have no prediction.
    """
    g = torch.Generator().manual_seed(seed)
    preds = []
    for i in range(num_images):
        if task == "classification":
            n = 1
        else:
            n = 0 if i % 5 == 4 else int(torch.randint(1, 8, (1,), generator=g))
        scores = (torch.randint(0, 21, (n,), generator=g) * 0.05).float()
        labels = torch.randint(0, num_classes, (n,), generator=g)
        kps = torch.rand(n, num_keypoints, generator=g) if task == "keypoints" else None
        preds.append(ScoredPredictions(scores, labels, kps))
    instances = {c: 3 + 2 * c for c in range(num_classes)}
    stats = LabeledStats(num_images=10 if task != "classification" else sum(instances.values()),
                         instances=instances, num_keypoints=num_keypoints if task == "keypoints" else None,
                         visible_keypoints=sum(instances.values()) * 3 if task == "keypoints" else 0)
    return stats, ListStream(preds)


def _selections(selector: Any, stream: Iterable[ScoredPredictions], who: str) -> list[Selection]:
    return [check_selection(p, selector.select(p), who) for p in stream]


def check_selector(spec: StrategySpec, block: dict[str, Any], task: str) -> None:
    """One selector config on one task's synthetic predictions: every property of the contract."""
    who = f"selector {spec.name!r} {block}"
    labeled, stream = synthetic_predictions(task)
    selector = build_from_spec(spec, block)
    for method in ("fit", "select"):
        assert callable(getattr(selector, method, None)), f"{who} has no {method}() method"
    fitted = selector.fit(labeled, stream)
    assert isinstance(fitted, dict), f"{who}.fit must return a dict of thresholds, got {type(fitted).__name__}"
    json.dumps(fitted, allow_nan=False)  # JSON-serialisable, no inf/nan (use None)
    sels = _selections(selector, stream, who)
    # deterministic: a second selector fitted on the same data selects the same
    again = build_from_spec(spec, block)
    assert again.fit(labeled, stream) == fitted, f"{who}: fit is not deterministic"
    for a, b in zip(sels, _selections(again, stream, who)):
        assert torch.equal(a.keep, b.keep), f"{who}: select is not deterministic"
    # within an image and a category, a kept prediction implies every higher-scoring one is kept
    for pred, sel in zip(stream.predictions, sels):
        for c in pred.labels.unique().tolist():
            m = pred.labels == c
            kept, dropped = pred.scores[m & sel.keep], pred.scores[m & ~sel.keep]
            if len(kept) and len(dropped):
                assert dropped.max() <= kept.min(), f"{who}: dropped a score {float(dropped.max())} above a " \
                                                    f"kept {float(kept.min())} of category {c}"
    # an image without predictions
    empty = ScoredPredictions(torch.zeros(0), torch.zeros(0, dtype=torch.int64),
                              torch.zeros(0, 5) if task == "keypoints" else None)
    sel = check_selection(empty, selector.select(empty), who)
    assert sel.keep.numel() == 0
    # an empty unlabeled set fits without error
    build_from_spec(spec, block).fit(labeled, ListStream([]))


def check_selector_entry(entry: Entry) -> None:
    """Every example config of a registered selector, on classification, detection and keypoint predictions."""
    spec = entry.spec
    assert spec.kind == "selectors", f"{spec.name!r} is a {spec.kind} spec, not a selector"
    blocks = example_blocks(entry)
    assert blocks, f"selector {spec.name!r}: some parameter has no default and the spec has no examples"
    for block in blocks:
        for task in TASKS:
            check_selector(spec, block, task)
