"""Aggregators: the contract over every registered aggregator (builtin or installed), oracles for the builtins."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import ddkit
from ddkit import ConfigError, Instances
from ddkit.ops.heatmaps import heatmaps_to_keypoints, spatial_softmax
from ddkit.testing import build_examples, registered
from ddkit.testing.aggregators import (check_aggregator, check_heatmap_aggregator, check_instance_aggregator,
                                       check_prob_aggregator, random_views)

CASES = [(f"{e.spec.name}[{i}]", e.spec.input, agg)
         for e in registered("aggregators") for i, agg in enumerate(build_examples(e))]


def _build(name, **kw):
    return ddkit.build("aggregators", {"name": name, **kw})


@pytest.mark.parametrize("input,agg", [(i, a) for _, i, a in CASES], ids=[c[0] for c in CASES])
def test_aggregator_contract(input, agg):
    check_aggregator(agg, input)


def test_every_aggregator_declares_a_known_input():
    for entry in registered("aggregators"):
        assert entry.spec.input in ("instances", "heatmaps", "probs"), entry.spec.name


# ------------------------------------------------------------------------------------------ the checks can fail
class _Unsorted:
    """Wraps a good aggregator and reverses its output order."""

    def __init__(self, agg):
        self.agg = agg

    def __call__(self, views, image_size):
        out = self.agg(views, image_size)
        return out[torch.arange(len(out) - 1, -1, -1)]


class _Mutating:
    def __init__(self, agg):
        self.agg = agg

    def __call__(self, views, image_size):
        if views and len(views[0]):
            views[0].scores.mul_(0.5)
        return self.agg(views, image_size)


class _BadBatch:
    def __init__(self, agg):
        self.agg = agg

    def __call__(self, views, image_size):
        return self.agg(views, image_size)

    def batch(self, views_lists, image_sizes):
        return [self.agg(v[:1], s) for v, s in zip(views_lists, image_sizes)]


def test_instance_checks_catch_broken_aggregators():
    names = [e.spec.name for e in registered("aggregators") if e.spec.input == "instances"]
    if not names:
        pytest.skip("no instance aggregator registered")
    good = _build(names[0])
    with pytest.raises(AssertionError, match="sorted"):
        check_instance_aggregator(_Unsorted(good))
    with pytest.raises(AssertionError, match="modified"):
        check_instance_aggregator(_Mutating(good))
    with pytest.raises(AssertionError, match="batch"):
        check_instance_aggregator(_BadBatch(good))


def test_heatmap_and_prob_checks_catch_broken_aggregators():
    with pytest.raises(AssertionError, match="inside their RoI"):
        check_heatmap_aggregator(lambda maps, rois: heatmaps_to_keypoints(maps.mean(0), rois) + 100.0)
    with pytest.raises(AssertionError, match="argmax"):
        check_prob_aggregator(lambda p: (p.mean(0).argmin(-1), p.mean(0).amin(-1)))
    with pytest.raises(AssertionError, match="int64"):
        check_prob_aggregator(lambda p: (p.mean(0).argmax(-1).int(), p.mean(0).amax(-1)))


# ---------------------------------------------------------------------------------------------------- heatmaps
def test_heatmap_mean_logits_equals_decoding_the_mean_map():
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(5, 6, 17, 14, 14, generator=g)
    xy = torch.rand(6, 2, generator=g) * 100
    rois = torch.cat([xy, xy + torch.rand(6, 2, generator=g) * 80 + 1], 1)
    got = _build("heatmap_mean")(maps, rois)
    from torchvision.models.detection.roi_heads import heatmaps_to_keypoints as tv

    want_xy, want_scores = tv(maps.mean(0), rois)
    assert torch.equal(got[..., :2], want_xy[..., :2]) and torch.equal(got[..., 2], want_scores)
    one = _build("heatmap_mean")(maps[:1], rois)
    assert torch.equal(one, heatmaps_to_keypoints(maps[0], rois))


def test_heatmap_mean_softmax_mode():
    g = torch.Generator().manual_seed(1)
    maps = torch.randn(3, 4, 5, 10, 12, generator=g) * 3
    rois = torch.tensor([[0.0, 0.0, 24.0, 20.0]]).repeat(4, 1)
    got = _build("heatmap_mean", mode="softmax")(maps, rois)
    want = heatmaps_to_keypoints(spatial_softmax(maps).mean(0), rois)
    assert torch.equal(got, want)
    assert bool(((got[..., 2] >= 0) & (got[..., 2] <= 1)).all())
    # softmax averaging keeps one over-confident view from deciding alone
    maps = torch.zeros(3, 1, 1, 8, 8)
    maps[0, 0, 0, 1, 1] = 50.0  # one view, extremely sure, at cell (1, 1)
    maps[1:, 0, 0, 6, 6] = 5.0  # two views, fairly sure, at cell (6, 6)
    roi = torch.tensor([[0.0, 0.0, 8.0, 8.0]])
    assert _build("heatmap_mean")(maps, roi)[0, 0, :2].tolist() == [1.5, 1.5]
    assert _build("heatmap_mean", mode="softmax")(maps, roi)[0, 0, :2].tolist() == [6.5, 6.5]


def test_heatmap_mean_errors():
    with pytest.raises(ConfigError, match="mode"):
        _build("heatmap_mean", mode="median")
    agg = _build("heatmap_mean")
    with pytest.raises(ValueError, match="finite"):
        agg(torch.full((1, 1, 1, 4, 4), float("nan")), torch.tensor([[0.0, 0.0, 4.0, 4.0]]))
    with pytest.raises(ValueError, match="no views"):
        agg(torch.zeros(0, 1, 1, 4, 4), torch.tensor([[0.0, 0.0, 4.0, 4.0]]))


# ------------------------------------------------------------------------------------------------------- probs
def _ref_majority(probs):
    v, n, c = probs.shape
    labels, scores = [], []
    for i in range(n):
        votes = [0] * c
        for j in range(v):
            votes[int(np.argmax(probs[j, i]))] += 1
        mean = probs[:, i].mean(0)
        best = max(range(c), key=lambda k: (votes[k], mean[k], -k))
        labels.append(best)
        scores.append(votes[best] / v)
    return labels, scores


@pytest.mark.parametrize("seed", range(3))
def test_prob_aggregators_vs_references(seed):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(5, 40, 4, generator=g), -1)
    probs[:, :10] = torch.softmax(torch.randint(0, 3, (5, 10, 4), generator=g).float() * 5, -1)  # ties
    p = probs.double().numpy()
    labels, scores = _build("prob_mean")(probs)
    assert labels.tolist() == p.mean(0).argmax(-1).tolist()
    np.testing.assert_allclose(scores.numpy(), p.mean(0).max(-1), rtol=1e-5)
    labels, scores = _build("prob_max")(probs)
    assert labels.tolist() == p.max(0).argmax(-1).tolist()
    np.testing.assert_allclose(scores.numpy(), p.max(0).max(-1), rtol=1e-6)
    labels, scores = _build("majority_vote")(probs)
    ref_l, ref_s = _ref_majority(probs.numpy())
    assert labels.tolist() == ref_l
    np.testing.assert_allclose(scores.numpy(), ref_s)


def test_majority_vote_tie_uses_mean_probability():
    probs = torch.tensor([[[0.6, 0.4, 0.0]], [[0.3, 0.7, 0.0]], [[0.5, 0.1, 0.4]], [[0.1, 0.8, 0.1]]])
    labels, scores = _build("majority_vote")(probs)
    assert labels.tolist() == [1] and scores.tolist() == [0.5]


# ----------------------------------------------------------------------------------- boxes vs ensemble_boxes
def _random_case(seed, num_views=None, num_keypoints=None):
    g = torch.Generator().manual_seed(seed)
    size = (int(torch.randint(30, 900, (1,), generator=g)), int(torch.randint(30, 900, (1,), generator=g)))
    v = num_views or int(torch.randint(1, 6, (1,), generator=g))
    views = random_views(v, size, num_objects=int(torch.randint(1, 12, (1,), generator=g)), num_classes=3,
                         num_keypoints=num_keypoints, generator=g, jitter=0.3, drop=0.3)
    # duplicate detections within a view (as before NMS), so that a view can put several boxes in one cluster
    out = []
    for view in views:
        dup = torch.rand(len(view), generator=g) < 0.5
        d = view[dup]
        wh = (d.boxes[:, 2:] - d.boxes[:, :2]).repeat(1, 2)
        boxes = d.boxes + (torch.rand(len(d), 4, generator=g) - 0.5) * 0.2 * wh
        boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([size[1], size[0]] * 2, dtype=torch.float32))
        boxes = torch.cat([boxes[:, :2].minimum(boxes[:, 2:]), boxes[:, :2].maximum(boxes[:, 2:])], 1)
        ok = ((boxes[:, 2] - boxes[:, 0]) > 0.5) & ((boxes[:, 3] - boxes[:, 1]) > 0.5)
        extra = Instances(boxes[ok], d.scores[ok] * 0.7, d.labels[ok],
                          None if d.keypoints is None else d.keypoints[ok], size)
        kps = None if view.keypoints is None else torch.cat([view.keypoints, extra.keypoints])
        out.append(Instances(torch.cat([view.boxes, extra.boxes]), torch.cat([view.scores, extra.scores]),
                             torch.cat([view.labels, extra.labels]), kps, size))
    return out, size


def _normalized(views, size):
    h, w = size
    scale = np.array([w, h, w, h], dtype=np.float64)
    return ([v.boxes.double().numpy() / scale for v in views], [v.scores.double().numpy() for v in views],
            [v.labels.numpy() for v in views])


def _rows(boxes, scores, labels):
    """Rows (label, score, box) sorted lexicographically, to compare results whose tie order may differ."""
    a = np.concatenate([np.asarray(labels, np.float64)[:, None], np.asarray(scores, np.float64)[:, None],
                        np.asarray(boxes, np.float64).reshape(-1, 4)], 1)
    return a[np.lexsort(np.round(a, 5).T[::-1])]


def _assert_same(out, size, eb_boxes, eb_scores, eb_labels, atol=2e-5):
    h, w = size
    ours = _rows(out.boxes.double().numpy() / np.array([w, h, w, h]), out.scores.numpy(), out.labels.numpy())
    ref = _rows(eb_boxes, eb_scores, eb_labels)
    assert ours.shape == ref.shape, f"{len(ours)} boxes, ensemble_boxes gives {len(ref)}"
    np.testing.assert_allclose(ours, ref, atol=atol, rtol=1e-5)


def _eb():
    eb = pytest.importorskip("ensemble_boxes")
    warnings.filterwarnings("ignore")
    return eb


WBF_CONFIGS = [{}, {"conf_type": "max"}, {"conf_type": "box_and_model_avg"}, {"conf_type": "absent_model_aware_avg"},
               {"allows_overflow": True, "iou_thr": 0.4}, {"skip_box_thr": 0.3, "iou_thr": 0.7}]


@pytest.mark.parametrize("cfg", WBF_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_wbf_matches_ensemble_boxes(cfg):
    eb = _eb()
    for seed in range(8):
        views, size = _random_case(seed)
        weights = [1.0 + (i % 3) for i in range(len(views))] if seed % 2 else None
        out = _build("wbf", **cfg, weights=weights)(views, size)
        ref = eb.weighted_boxes_fusion(*_normalized(views, size), weights=weights, **cfg)
        _assert_same(out, size, *ref)


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _flat(views, weights=None):
    """All views' boxes, scores (times ``w / sum(w)`` with weights, as ensemble_boxes' NMS does) and labels."""
    boxes = torch.cat([v.boxes for v in views]).double().tolist()
    w = [1.0] * len(views) if weights is None else [x / sum(weights) for x in weights]
    scores = [float(s) * w[i] for i, v in enumerate(views) for s in v.scores.double()]
    labels = torch.cat([v.labels for v in views]).tolist()
    return boxes, scores, labels


def _ref_nms(views, iou_thr, weights=None):
    """Greedy class-wise NMS, the textbook loop."""
    boxes, scores, labels = _flat(views, weights)
    kept = []
    for i in sorted(range(len(boxes)), key=lambda i: (-scores[i], i)):
        if all(labels[j] != labels[i] or _iou(boxes[i], boxes[j]) <= iou_thr for j in kept):
            kept.append(i)
    return [boxes[i] for i in kept], [scores[i] for i in kept], [labels[i] for i in kept]


def _ref_soft_nms(views, method, iou_thr, sigma, thresh, weights=None):
    """Soft-NMS (Bodla et al. 2017), the textbook loop; returns kept boxes with their decayed scores."""
    boxes, scores, labels = _flat(views, weights)
    out = []
    for label in sorted(set(labels)):
        rest = [i for i in range(len(boxes)) if labels[i] == label]
        s = {i: scores[i] for i in rest}
        while rest:
            i = max(rest, key=lambda j: (s[j], -j))
            rest.remove(i)
            out.append(i)
            for j in rest:
                o = _iou(boxes[i], boxes[j])
                if method == "linear":
                    s[j] *= (1 - o) if o > iou_thr else 1.0
                else:
                    s[j] *= float(np.exp(-(o * o) / sigma))
        scores = [s.get(i, scores[i]) for i in range(len(scores))]
    kept = [i for i in out if scores[i] > thresh]
    return [boxes[i] for i in kept], [scores[i] for i in kept], [labels[i] for i in kept]


def _pixels(out):
    return out.boxes.double().numpy(), out.scores.numpy(), out.labels.numpy()


@pytest.mark.parametrize("iou_thr", [0.3, 0.5, 0.8])
def test_nms_matches_reference_and_nmw_matches_ensemble_boxes(iou_thr):
    eb = _eb()
    for seed in range(8):
        views, size = _random_case(100 + seed)
        weights = [1.0 + (i % 3) for i in range(len(views))] if seed % 2 else None
        out = _build("nms", iou_thr=iou_thr, weights=weights)(views, size)
        np.testing.assert_allclose(_rows(*_pixels(out)), _rows(*_ref_nms(views, iou_thr, weights)), rtol=1e-6)
        out = _build("nmw", iou_thr=iou_thr, weights=weights)(views, size)
        _assert_same(out, size, *eb.non_maximum_weighted(*_normalized(views, size), iou_thr=iou_thr,
                                                         weights=weights))


@pytest.mark.parametrize("method", ["gaussian", "linear"])
def test_soft_nms_matches_reference(method):
    """Kept boxes with their decayed scores (ensemble_boxes.soft_nms would return the input scores)."""
    for seed in range(8):
        views, size = _random_case(200 + seed)
        cfg = {"iou_thr": 0.3 + 0.1 * (seed % 4), "sigma": 0.2 + 0.1 * (seed % 3), "thresh": 0.02 * (seed % 5)}
        weights = [1.0 + (i % 2) for i in range(len(views))] if seed % 2 else None
        out = _build("soft_nms", method=method, weights=weights, **cfg)(views, size)
        ref = _ref_soft_nms(views, method, weights=weights, **cfg)
        np.testing.assert_allclose(_rows(*_pixels(out)), _rows(*ref), rtol=1e-5, atol=1e-6)


def _ref_box_voting(views, nms_thr, vote_thr):
    boxes = torch.cat([v.boxes for v in views]).double().tolist()
    scores = torch.cat([v.scores for v in views]).double().tolist()
    labels = torch.cat([v.labels for v in views]).tolist()
    order = sorted(range(len(boxes)), key=lambda i: (-scores[i], i))
    kept = []
    for i in order:
        if all(labels[j] != labels[i] or _iou(boxes[i], boxes[j]) <= nms_thr for j in kept):
            kept.append(i)
    out = []
    for i in kept:
        voters = [j for j in range(len(boxes)) if labels[j] == labels[i] and _iou(boxes[i], boxes[j]) >= vote_thr]
        wsum = sum(scores[j] for j in voters)
        out.append(([sum(scores[j] * boxes[j][c] for j in voters) / wsum for c in range(4)], scores[i], labels[i]))
    return ([o[0] for o in out], [o[1] for o in out], [o[2] for o in out])


@pytest.mark.parametrize("thr", [(0.5, 0.8), (0.3, 0.5), (0.7, 0.7)])
def test_box_voting_matches_reference(thr):
    for seed in range(6):
        views, size = _random_case(300 + seed)
        out = _build("box_voting", nms_thr=thr[0], vote_thr=thr[1])(views, size)
        b, s, lab = _ref_box_voting(views, *thr)
        h, w = size
        _assert_same(out, size, np.array(b).reshape(-1, 4) / np.array([w, h, w, h]), s, lab)


def test_oracle_comparison_can_fail():
    """The comparison helper sees a changed threshold."""
    eb = _eb()
    views, size = _random_case(7, num_views=4)
    out = _build("wbf", iou_thr=0.2)(views, size)
    with pytest.raises(AssertionError):
        _assert_same(out, size, *eb.weighted_boxes_fusion(*_normalized(views, size), iou_thr=0.8))


# ------------------------------------------------------------------------------------- boxes: specifics
BOX_NAMES = ["nms", "soft_nms", "nmw", "wbf", "box_voting"]


@pytest.mark.parametrize("name", BOX_NAMES)
def test_batch_equals_per_image_with_mixed_view_counts(name):
    agg = _build(name)
    cases = [_random_case(400 + i, num_keypoints=17 if i % 3 == 0 else None) for i in range(8)]
    batched = agg.batch([v for v, _ in cases], [s for _, s in cases])
    for (views, size), got in zip(cases, batched):
        want = agg(views, size)
        assert torch.equal(got.boxes, want.boxes) and torch.equal(got.scores, want.scores)
        assert torch.equal(got.labels, want.labels)
        assert (got.keypoints is None) == (want.keypoints is None)
        if got.keypoints is not None:
            assert torch.equal(got.keypoints, want.keypoints)


@pytest.mark.parametrize("name", ["nms", "soft_nms", "box_voting"])
def test_keypoints_follow_the_kept_box(name):
    views, size = _random_case(500, num_views=3, num_keypoints=5)
    out = _build(name)(views, size)
    assert out.keypoints is not None and out.keypoints.shape == (len(out), 5, 3)
    all_boxes = torch.cat([v.boxes for v in views])
    all_scores = torch.cat([v.scores for v in views])
    all_kps = torch.cat([v.keypoints for v in views])
    for i in range(len(out)):
        if name == "box_voting":  # the voted box moved; the survivor has the output's score
            src = int(torch.nonzero(all_scores == out.scores[i])[0])
        else:
            src = int(torch.nonzero((all_boxes == out.boxes[i]).all(1))[0])
        assert torch.equal(out.keypoints[i], all_kps[src])


@pytest.mark.parametrize("name", ["wbf", "nmw"])
def test_fused_boxes_drop_keypoints(name):
    views, size = _random_case(501, num_views=3, num_keypoints=5)
    assert _build(name)(views, size).keypoints is None


def test_box_inputs_are_pixels_not_clipped():
    """Fusing two boxes far outside [0, 1] works in pixels (ensemble_boxes would clip them to 1)."""
    a = Instances(torch.tensor([[100.0, 200.0, 300.0, 400.0]]), torch.tensor([0.8]), torch.tensor([0]))
    b = Instances(torch.tensor([[110.0, 210.0, 310.0, 410.0]]), torch.tensor([0.6]), torch.tensor([0]))
    out = _build("wbf")([a, b], (480, 640))
    want = (0.8 * torch.tensor([100.0, 200.0, 300.0, 400.0]) + 0.6 * torch.tensor([110.0, 210.0, 310.0, 410.0])) / 1.4
    torch.testing.assert_close(out.boxes[0], want)
    assert out.scores.tolist() == pytest.approx([0.7]) and out.image_size == (480, 640)


BAD_PARAMS = [("nms", {"iou_thr": 1.5}, "iou_thr"), ("nms", {"weights": [-1.0]}, "weights"),
              ("nms", {"weights": [0.0, 0.0]}, "weights"), ("soft_nms", {"method": "cubic"}, "method"),
              ("soft_nms", {"sigma": 0.0}, "sigma"), ("soft_nms", {"iou_thr": -0.1}, "iou_thr"),
              ("nmw", {"iou_thr": 2}, "iou_thr"), ("wbf", {"conf_type": "median"}, "conf_type"),
              ("wbf", {"iou_thr": -1.0}, "iou_thr"), ("wbf", {"skip_box_thr": float("nan")}, "skip_box_thr"),
              ("wbf", {"allows_overflow": 1}, "allows_overflow"), ("box_voting", {"vote_thr": 1.1}, "vote_thr"),
              ("box_voting", {"nms_thr": -0.5}, "nms_thr"), ("heatmap_mean", {"mode": "max"}, "mode")]


@pytest.mark.parametrize("name,block,key", BAD_PARAMS, ids=[f"{n}-{k}" for n, _, k in BAD_PARAMS])
def test_bad_params_are_config_errors_naming_the_key(name, block, key):
    with pytest.raises(ConfigError, match=key):
        _build(name, **block)
    cls = ddkit.get_registry().get("aggregators", name).spec.factory
    with pytest.raises(ValueError, match=key):
        cls(**block)


@pytest.mark.parametrize("name", BOX_NAMES)
def test_box_call_errors_name_the_input(name):
    agg = _build(name)
    good = Instances(torch.tensor([[1.0, 2.0, 10.0, 12.0]]), torch.tensor([0.9]), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"views\[1\].boxes\[0\].*outside"):
        agg([good, Instances(torch.tensor([[-1.0, 2.0, 10.0, 12.0]]), torch.ones(1), torch.tensor([1]))], (20, 20))
    with pytest.raises(ValueError, match=r"views\[0\].*\(10, 10\)"):
        agg([Instances(good.boxes, good.scores, good.labels, None, (10, 10))], (20, 20))
    with pytest.raises(ValueError, match=r"xyxy"):
        agg([Instances(torch.tensor([[10.0, 2.0, 1.0, 12.0]]), torch.ones(1), torch.tensor([1]))], (20, 20))
    with pytest.raises(ValueError, match="image 1"):
        agg.batch([[good], [good]], [(20, 20), (5, 5)])
    with pytest.raises(ValueError, match="image_sizes"):
        agg.batch([[good]], [(20, 20), (5, 5)])
    if name in ("nms", "wbf", "nmw", "soft_nms"):
        weighted = _build(name, weights=[1.0, 2.0])
        with pytest.raises(ValueError, match="weights"):
            weighted([good, good, good], (20, 20))
