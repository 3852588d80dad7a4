"""Selectors: the contract over every registered one, and count matching against hand computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddkit import ConfigError, get_registry
from ddkit.engine.select import (KEEP_ALL, KEEP_NOTHING, LabeledStats, ListStream, ScoredPredictions, TopK,
                                 kth_largest_threshold, round_half_up)
from ddkit.registry import Entry
from ddkit.testing import registered
from ddkit.testing.selectors import check_selector_entry, synthetic_predictions


def build(block):
    return get_registry().build("selectors", block)


def P(scores, labels, kps=None):
    return ScoredPredictions(torch.tensor(scores, dtype=torch.float32), torch.tensor(labels, dtype=torch.int64),
                             None if kps is None else torch.tensor(kps, dtype=torch.float32))


@pytest.mark.parametrize("entry", registered("selectors"), ids=lambda e: e.spec.name)
def test_selector_contract(entry):
    check_selector_entry(entry)


def test_default_selectors_registered():
    assert {"count_match", "count_match_global", "score_threshold", "top_k"} <= set(get_registry().names("selectors"))


def test_contract_catches_a_broken_selector():
    from ddkit.engine.select import Selection
    from ddkit.types import SelectorSpec

    class KeepsTheWorst:
        def fit(self, labeled, predictions):
            return {}

        def select(self, pred):
            return Selection(pred.scores < 0.5)

    with pytest.raises(AssertionError, match="dropped a score"):
        check_selector_entry(Entry(SelectorSpec(name="worst", factory=KeepsTheWorst), "test", "test"))

    class WrongShape(KeepsTheWorst):
        def select(self, pred):
            return Selection(torch.ones(len(pred) + 1, dtype=torch.bool))

    with pytest.raises(TypeError, match="keep must be bool"):
        check_selector_entry(Entry(SelectorSpec(name="wrong", factory=WrongShape), "test", "test"))


def test_round_half_up_and_kth():
    assert [round_half_up(x) for x in (0.49, 0.5, 1.5, 2.5, 4.5)] == [0, 1, 2, 3, 5]
    assert kth_largest_threshold(np.array([0.1, 0.5, 0.3]), 0) == KEEP_NOTHING
    assert kth_largest_threshold(np.array([0.1, 0.5, 0.3]), 3) == KEEP_ALL
    assert kth_largest_threshold(np.array([0.1, 0.5, 0.3]), 2) == pytest.approx(0.3)


def test_streaming_topk_is_exact():
    rng = np.random.default_rng(0)
    data = rng.random(20_000).astype(np.float32)
    for k in (1, 7, 500, 19_999, 20_000, 30_000):
        top = TopK(k)
        for chunk in np.array_split(data, 97):
            top.add(chunk)
        assert top.threshold() == kth_largest_threshold(data, k)
        assert len(top._parts[0]) <= max(k, 1)


# ------------------------------------------------------------------------------------------- hand computations
# Labeled: 2 images; category 1: 3 instances (m=1.5), category 2: 1 (m=0.5), category 3: 0 -> with N=3 unlabeled
# images the targets are round(4.5)=5, round(1.5)=2, 0.
LABELED = LabeledStats(num_images=2, instances={1: 3, 2: 1, 3: 0})
UNLABELED = [
    P([0.9, 0.8, 0.7, 0.3], [1, 1, 2, 3]),
    P([0.6, 0.6, 0.5, 0.5], [1, 1, 2, 2]),
    P([0.7, 0.6, 0.2, 0.4], [1, 1, 1, 2]),
]


def test_count_match_per_category_by_hand():
    sel = build({"name": "count_match"})
    out = sel.fit(LABELED, ListStream(UNLABELED))
    # c1 scores 0.9 0.8 0.7 0.6 0.6 0.6 0.2: the 5th largest is 0.6, and all three 0.6 are kept (ties) -> 6
    # c2 scores 0.7 0.5 0.5 0.4: the 2nd largest is 0.5, both 0.5 kept -> 3;  c3: target 0 -> none
    assert out["target"] == {"1": 5, "2": 2, "3": 0}
    assert out["score"]["1"] == pytest.approx(0.6) and out["score"]["2"] == pytest.approx(0.5)
    assert out["score"]["3"] is None
    keeps = [sel.select(p).keep.tolist() for p in UNLABELED]
    assert keeps == [[True, True, True, False], [True, True, True, True], [True, True, False, False]]


def test_count_match_global_by_hand():
    for block in ({"name": "count_match_global"}, {"name": "count_match", "per_category": False}):
        sel = build(block)
        out = sel.fit(LABELED, ListStream(UNLABELED))
        # m = 4/2 = 2 -> 6 of 12; sorted 0.9 0.8 0.7 0.7 0.6 0.6 0.6 ...: the 6th is 0.6 -> 7 kept (tie)
        assert out["target"] == {"-1": 6}
        assert out["score"]["-1"] == pytest.approx(0.6)
        kept = sum(int(sel.select(p).keep.sum()) for p in UNLABELED)
        assert kept == 7


def test_count_match_keypoint_threshold_by_hand():
    labeled = LabeledStats(num_images=2, instances={1: 2}, num_keypoints=3, visible_keypoints=3)  # 1.5 / inst
    preds = [P([0.9, 0.1], [1, 1], [[0.9, 0.8, 0.1], [0.99, 0.99, 0.99]]),
             P([0.5], [1], [[0.8, 0.8, 0.05]])]
    sel = build({"name": "count_match"})
    stream = ListStream(preds)
    out = sel.fit(labeled, stream)
    # boxes: k = round(1 x 2) = 2 -> threshold 0.5 keeps instance 0 of image 0 and the instance of image 1.
    # keypoints of the kept ones: 0.9 0.8 0.1 0.8 0.8 0.05; target round(1.5 x 2) = 3 -> 3rd largest 0.8, ties
    # kept -> 4 visible. The dropped instance's 0.99 must not count.
    assert out["keypoint_target"] == 3 and out["keypoint_instances"] == 2
    assert out["keypoint"] == pytest.approx(0.8)
    s0, s1 = sel.select(preds[0]), sel.select(preds[1])
    assert s0.keep.tolist() == [True, False] and s1.keep.tolist() == [True]
    assert s0.keypoints[0].tolist() == [True, True, False] and s1.keypoints[0].tolist() == [True, True, False]
    assert stream.passes == 3  # one pass for the box thresholds, two for the keypoint threshold
    no_kp = build({"name": "count_match", "keypoints": False})
    no_kp.fit(labeled, ListStream(preds))
    assert no_kp.select(preds[0]).keypoints.all()


def test_count_match_classification_by_hand():
    labeled = LabeledStats.from_targets([{"label": 0}] * 6 + [{"label": 1}] * 4, category_ids=[0, 1])
    assert labeled.instances == {0: 6, 1: 4} and labeled.num_images == 10
    preds = [P([s], [c]) for c, s in [(0, .9), (0, .8), (0, .3), (0, .2), (1, .95)]]
    sel = build("count_match")
    out = sel.fit(labeled, ListStream(preds))
    # frac 0.6 x 5 = 3 most confident class-0 images; 0.4 x 5 = 2 class-1 but only one is predicted -> keep it
    assert out["target"] == {"0": 3, "1": 2}
    assert [bool(sel.select(p).keep) for p in preds] == [True, True, True, False, True]


def test_count_match_keep_share_by_hand():
    # targets 5, 2, 0 at keep 1 (above); keep 0.5 -> round(2.25) = 2 of c1 and round(0.75) = 1 of c2
    sel = build({"name": "count_match", "keep": 0.5})
    out = sel.fit(LABELED, ListStream(UNLABELED))
    assert out["target"] == {"1": 2, "2": 1, "3": 0} and out["keep"] == 0.5
    assert out["score"]["1"] == pytest.approx(0.8) and out["score"]["2"] == pytest.approx(0.7)
    keeps = [sel.select(p).keep.tolist() for p in UNLABELED]
    assert keeps == [[True, True, True, False], [False, False, False, False], [False, False, False, False]]
    glob = build({"name": "count_match_global", "keep": 0.5})  # round(0.5 x 2 x 3) = 3: 0.9 0.8 0.7 0.7 (tie)
    assert glob.fit(LABELED, ListStream(UNLABELED))["target"] == {"-1": 3}
    assert sum(int(glob.select(p).keep.sum()) for p in UNLABELED) == 4


@pytest.mark.parametrize("seed", range(5))
def test_count_match_keep_share_against_a_slow_reference(seed):
    """Per class: the round_half_up(keep x frac_c x N) most confident images predicted as c (ties at the k-th kept)."""
    rng = np.random.default_rng(seed)
    n, classes, keep = int(rng.integers(20, 200)), 5, float(rng.uniform(0.05, 1.0))
    counts = rng.integers(0, 30, classes)
    labeled = LabeledStats(num_images=int(counts.sum()), instances={c: int(k) for c, k in enumerate(counts)})
    scores = np.round(rng.random(n), 2).astype(np.float32)  # rounded: ties happen
    labels = rng.integers(0, classes, n)
    preds = [P([s], [c]) for s, c in zip(scores, labels)]
    sel = build({"name": "count_match", "keep": keep})
    sel.fit(labeled, ListStream(preds))
    got = [bool(sel.select(p).keep) for p in preds]
    want = [False] * n
    for c in range(classes):
        k = round_half_up(keep * counts[c] / counts.sum() * n)
        mine = sorted((float(scores[i]) for i in range(n) if labels[i] == c), reverse=True)
        if k > 0 and mine:
            kth = mine[min(k, len(mine)) - 1]
            for i in range(n):
                want[i] = want[i] or (labels[i] == c and float(scores[i]) >= kth)
    assert got == want


@pytest.mark.parametrize("keep", [0.0, 1.5, -0.1])
def test_count_match_keep_outside_its_range_is_one_line(keep):
    with pytest.raises(ConfigError, match="keep is the share of the matched count"):
        build({"name": "count_match", "keep": keep})


def test_labeled_stats_from_detection_targets():
    targets = [{"labels": torch.tensor([1, 1, 2]), "keypoints": torch.tensor([[[0, 0, 2]] * 2, [[0, 0, 0]] * 2,
                                                                              [[1, 1, 1], [0, 0, 0]]]).float(),
                "iscrowd": torch.tensor([0, 0, 1])},
               {"labels": torch.zeros(0, dtype=torch.int64), "keypoints": torch.zeros(0, 2, 3)}]
    st = LabeledStats.from_targets(targets, [1, 2, 3], num_keypoints=2)
    assert st.instances == {1: 2, 2: 0, 3: 0}  # the crowd instance is not counted
    assert st.num_images == 2 and st.visible_keypoints == 2 and st.keypoints_per_instance == 1.0


def test_score_threshold_and_top_k():
    p = P([0.2, 0.9, 0.5, 0.9], [0, 1, 1, 0], [[0.1, 0.7]] * 4)
    st = build({"name": "score_threshold", "threshold": 0.5, "keypoint_threshold": 0.5})
    st.fit(LABELED, ListStream([p]))
    s = st.select(p)
    assert s.keep.tolist() == [False, True, True, True] and s.keypoints[0].tolist() == [False, True]
    tk = build({"name": "top_k", "k": 2})
    tk.fit(LABELED, ListStream([p]))
    assert tk.select(p).keep.tolist() == [False, True, False, True]
    assert build({"name": "top_k", "k": 3, "min_score": 0.6}).select(p).keep.tolist() == [False, True, False, True]


@pytest.mark.parametrize("block, msg", [({"name": "score_threshold", "threshold": 2.0}, "threshold must be"),
                                        ({"name": "top_k", "k": -1}, "k must be"),
                                        ({"name": "count_match", "per_categroy": False}, "per_category"),
                                        ({"name": "count_matsh"}, "count_match")])
def test_bad_selector_blocks(block, msg):
    with pytest.raises(ConfigError, match=msg):
        build(block)


def test_synthetic_stream_has_ties_and_empty_images():
    _, stream = synthetic_predictions("detection")
    scores = torch.cat([p.scores for p in stream.predictions])
    assert len(scores.unique()) < len(scores)
    assert any(len(p) == 0 for p in stream.predictions)
    assert not math.isnan(float(scores.sum()))
