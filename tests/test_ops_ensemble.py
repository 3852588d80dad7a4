"""ddkit.ops.ensemble against ensemble_boxes 1.0.9 (the oracle), plus its own contracts.

Parity: the same boxes in the same order, coordinates and scores within 1e-5, on hundreds of seeded random cases per
method (ties on purpose: quantized scores, duplicated boxes, groups larger than numpy's small-sort size).
"""
from __future__ import annotations

import contextlib
import copy
import io
import warnings
from typing import Any, Callable, List, Tuple

import numpy as np
import pytest
import torch

ensemble_boxes = pytest.importorskip("ensemble_boxes")

from ddkit.ops import ensemble as E  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")

CONF_TYPES = ["avg", "max", "box_and_model_avg", "absent_model_aware_avg"]


# --------------------------------------------------------------------------------------------------- helpers
def rand_case(rng: np.random.Generator, max_models: int = 4, max_boxes: int = 14, n_labels: int = 3,
              quant: Any = None, big: bool = False) -> Tuple[list, list, list]:
    """Per-model boxes around a few shared objects, some reversed, out of [0, 1], duplicated or degenerate."""
    n_models = int(rng.integers(1, max_models + 1))
    n_obj = int(rng.integers(1, 8))
    centre = rng.uniform(0, 1, (n_obj, 2))
    size = rng.uniform(0.05, 0.5, (n_obj, 2))
    bl, sl, ll = [], [], []
    for _ in range(n_models):
        n = int(rng.integers(0, max_boxes + 1)) if not big else int(rng.integers(20, 40))
        o = rng.integers(0, n_obj, n)
        c = centre[o] + rng.normal(0, 0.05, (n, 2))
        wh = size[o] * np.exp(rng.normal(0, 0.2, (n, 2)))
        b = np.concatenate([c - wh / 2, c + wh / 2], 1)
        if n and rng.random() < 0.3:                               # reversed corners
            r = rng.random(n) < 0.3
            b[r] = b[r][:, [2, 3, 0, 1]]
        if n > 1 and rng.random() < 0.3:                           # exact duplicates (ties in IoU and score)
            b[-1] = b[0]
        if n and rng.random() < 0.1:                               # zero-area box
            b[0, 2] = b[0, 0]
        s = rng.uniform(0.01, 1, n)
        if quant:
            s = np.ceil(s * quant) / quant                         # many exact ties, never 0
        if n > 1 and rng.random() < 0.3:
            s[-1] = s[0]
        lab = rng.integers(0, 1 if big else n_labels, n).astype(np.float64)
        bl.append(b)
        sl.append(s)
        ll.append(lab)
    return bl, sl, ll


def cases(seed: int, n: int, **kw: Any) -> List[Tuple[list, list, list]]:
    rng = np.random.default_rng(seed)
    return [rand_case(rng, quant=[None, 10, 4][i % 3], **kw) for i in range(n)]


def oracle(fn: Callable[..., Any], case: Tuple[list, list, list], **kw: Any) -> Any:
    """ensemble_boxes on a deep copy (it may modify its inputs), silenced; None where it crashes."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return fn(*copy.deepcopy(case), **copy.deepcopy(kw))
        except (ValueError, ZeroDivisionError):
            return None


def finite(res: Any) -> bool:
    return all(np.isfinite(np.asarray(r, dtype=np.float64)).all() for r in res)


def assert_same(ref: Any, ours: Any, what: str = "", exact: bool = False) -> None:
    """Same boxes in the same order, coordinates and scores within 1e-5 (``exact``: bit for bit)."""
    rb, rs, rl = (np.asarray(x, dtype=np.float64) for x in ref)
    ob, os_, ol = (np.asarray(x, dtype=np.float64) for x in ours)
    assert ob.shape == rb.shape and os_.shape == rs.shape, f"{what}: {ob.shape} vs {rb.shape}"
    np.testing.assert_array_equal(ol, rl, err_msg=what)
    tol = 0 if exact else 1e-5
    np.testing.assert_allclose(os_, rs, rtol=0, atol=tol, err_msg=what)
    np.testing.assert_allclose(ob, rb, rtol=0, atol=tol, err_msg=what)


def assert_identical(a: Any, b: Any, what: str = "") -> None:
    for x, y in zip(a, b):
        assert x.dtype == y.dtype, what
        np.testing.assert_array_equal(x, y, err_msg=what)


def weights_for(rng: np.random.Generator, m: int, zero: bool = False) -> Any:
    kind = int(rng.integers(0, 3))
    if kind == 0:
        w: Any = list(rng.uniform(0.2, 3, m))
    elif kind == 1:
        w = [int(x) for x in rng.integers(1, 4, m)]
    else:
        w = rng.uniform(0.2, 3, m).astype(np.float32)
    if zero and m > 1:
        w = np.array(w)
        w[rng.integers(0, m)] = 0
    return w


def check_parity(ref_fn: Callable[..., Any], one_fn: Callable[..., Any], batch_fn: Callable[..., Any],
                 cs: List[Any], kws: List[dict]) -> int:
    """ours == oracle for every case (where the oracle gives a finite answer), and batch == one-image.

    WBF, NMS and soft-NMS reproduce ensemble_boxes' arithmetic bit for bit (float32 accumulation included); NMW
    accumulates its means in float64 (documented), so it is compared within 1e-5."""
    ours_all, checked = [], 0
    exact = one_fn is not E.non_maximum_weighted
    for case, kw in zip(cs, kws):
        ours = one_fn(*case, **kw)
        ours_all.append(ours)
        ref = oracle(ref_fn, case, **kw)
        if ref is not None and finite(ref):
            assert_same(ref, ours, f"{one_fn.__name__} {kw}", exact=exact)
            checked += 1
    groups: dict = {}
    for i, kw in enumerate(kws):   # one batched call per distinct set of arguments
        key = repr({k: (np.asarray(v).tolist(), str(np.asarray(v).dtype)) for k, v in sorted(kw.items())})
        groups.setdefault(key, []).append(i)
    for idx in groups.values():
        batched = batch_fn([cs[i] for i in idx], **kws[idx[0]])
        assert len(batched) == len(idx)
        for i, res in zip(idx, batched):
            assert_identical(ours_all[i], res, f"{batch_fn.__name__} image {i}")
    return checked


# ----------------------------------------------------------------------------------------- parity: WBF
@pytest.mark.parametrize("conf_type", CONF_TYPES)
@pytest.mark.parametrize("allows_overflow", [False, True])
def test_wbf_matches_ensemble_boxes(conf_type: str, allows_overflow: bool) -> None:
    cs = cases(1, 150)
    kws = [dict(conf_type=conf_type, allows_overflow=allows_overflow)] * len(cs)
    assert check_parity(ensemble_boxes.weighted_boxes_fusion, E.weighted_boxes_fusion,
                        E.weighted_boxes_fusion_batch, cs, kws) >= 140


@pytest.mark.parametrize("conf_type", CONF_TYPES)
def test_wbf_matches_with_weights_thresholds(conf_type: str) -> None:
    rng = np.random.default_rng(2)
    cs = cases(3, 120)
    kws = [dict(weights=weights_for(rng, len(c[0]), zero=rng.random() < 0.3), conf_type=conf_type,
                iou_thr=float(rng.choice([0.0, 0.3, 0.55, 0.8, 1.0])), skip_box_thr=float(rng.choice([0, 0.2, 0.5])),
                allows_overflow=bool(rng.random() < 0.5)) for c in cs]
    assert check_parity(ensemble_boxes.weighted_boxes_fusion, E.weighted_boxes_fusion,
                        E.weighted_boxes_fusion_batch, cs, kws) >= 90


def test_wbf_large_groups_with_ties() -> None:
    """Groups over 16 boxes with tied scores: ensemble_boxes' numpy (SIMD) argsort order is reproduced."""
    cs = cases(4, 40, big=True)
    kws = [dict(conf_type="avg")] * len(cs)
    assert check_parity(ensemble_boxes.weighted_boxes_fusion, E.weighted_boxes_fusion,
                        E.weighted_boxes_fusion_batch, cs, kws) == len(cs)


def test_wbf_float32_inputs() -> None:
    rng = np.random.default_rng(5)
    cs = [tuple([np.asarray(x, np.float32) for x in part] for part in c) for c in cases(6, 60)]
    kws = [dict(weights=weights_for(rng, len(c[0]))) for c in cs]
    assert check_parity(ensemble_boxes.weighted_boxes_fusion, E.weighted_boxes_fusion,
                        E.weighted_boxes_fusion_batch, cs, kws) == len(cs)


# ----------------------------------------------------------------------------- parity: NMW, NMS, soft-NMS
def test_nmw_matches_ensemble_boxes() -> None:
    rng = np.random.default_rng(7)
    cs = cases(8, 200)
    kws = [dict()] * 100 + [dict(weights=weights_for(rng, len(c[0]), zero=rng.random() < 0.3),
                                 iou_thr=float(rng.choice([0.0, 0.3, 0.55, 0.8])),
                                 skip_box_thr=float(rng.choice([0, 0.2]))) for c in cs[100:]]
    assert check_parity(ensemble_boxes.non_maximum_weighted, E.non_maximum_weighted,
                        E.non_maximum_weighted_batch, cs, kws) >= 170


def test_nmw_large_groups_and_float32() -> None:
    cs = cases(9, 30, big=True) + [tuple([np.asarray(x, np.float32) for x in part] for part in c)
                                   for c in cases(10, 30)]
    assert check_parity(ensemble_boxes.non_maximum_weighted, E.non_maximum_weighted,
                        E.non_maximum_weighted_batch, cs, [dict()] * len(cs)) == len(cs)


def test_nms_matches_ensemble_boxes() -> None:
    rng = np.random.default_rng(11)
    cs = cases(12, 200) + cases(13, 30, big=True)
    kws = [dict()] * 100 + [dict(weights=weights_for(rng, len(c[0]), zero=rng.random() < 0.3),
                                 iou_thr=float(rng.choice([0.0, 0.3, 0.5, 0.8, 1.0]))) for c in cs[100:]]
    assert check_parity(ensemble_boxes.nms, E.nms, E.nms_batch, cs, kws) >= 200


@pytest.mark.parametrize("method", [1, 2, 3])
def test_soft_nms_matches_ensemble_boxes(method: int) -> None:
    rng = np.random.default_rng(14 + method)
    cs = cases(20 + method, 150) + cases(30 + method, 15, big=True)
    kws = [dict(method=method)] * 80 + [dict(method=method, weights=weights_for(rng, len(c[0])),
                                             iou_thr=float(rng.choice([0.3, 0.5])),
                                             sigma=float(rng.choice([0.1, 0.5])),
                                             thresh=float(rng.choice([0.001, 0.1, 0.3]))) for c in cs[80:]]
    assert check_parity(ensemble_boxes.soft_nms, E.soft_nms, E.soft_nms_batch, cs, kws) >= 150


@pytest.mark.parametrize("method", [1, 2])
def test_soft_nms_without_numba_matches_ensemble_boxes(method: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The vectorized numpy loops (what runs without numba; with it, the compiled kernels take every group size)."""
    monkeypatch.setattr(E, "USE_NUMBA", False)
    rng = np.random.default_rng(16 + method)
    cs = cases(24 + method, 60) + cases(34 + method, 4, big=True) + crowded_cases(228 + method, 3)
    kws = [dict(method=method)] * 30 + [dict(method=method, iou_thr=float(rng.choice([0.3, 0.5])),
                                             sigma=float(rng.choice([0.1, 0.5])),
                                             thresh=float(rng.choice([0.001, 0.1, 0.3]))) for c in cs[30:]]
    assert check_parity(ensemble_boxes.soft_nms, E.soft_nms, E.soft_nms_batch, cs, kws) >= 60


def test_nms_and_soft_nms_float32_inputs() -> None:
    cs = [tuple([np.asarray(x, np.float32) for x in part] for part in c) for c in cases(40, 60)]
    for ref_fn, fn, bfn in ((ensemble_boxes.nms, E.nms, E.nms_batch),
                            (ensemble_boxes.soft_nms, E.soft_nms, E.soft_nms_batch)):
        assert check_parity(ref_fn, fn, bfn, cs, [dict()] * len(cs)) >= 55


def test_nms_method_is_the_same_as_nms_and_soft_nms() -> None:
    for case in cases(41, 20):
        assert_identical(E.nms_method(*case), E.nms(*case))
        assert_identical(E.nms_method(*case, method=2), E.soft_nms(*case))
        ref = oracle(ensemble_boxes.nms_method, case, method=1)
        if ref is not None:
            assert_same(ref, E.nms_method(*case, method=1))


# ------------------------------------------------------------------------------------------------ edge cases
ALL = [
    (ensemble_boxes.weighted_boxes_fusion, E.weighted_boxes_fusion, E.weighted_boxes_fusion_batch),
    (ensemble_boxes.non_maximum_weighted, E.non_maximum_weighted, E.non_maximum_weighted_batch),
    (ensemble_boxes.nms, E.nms, E.nms_batch),
    (ensemble_boxes.soft_nms, E.soft_nms, E.soft_nms_batch),
]
IDS = ["wbf", "nmw", "nms", "soft_nms"]


def assert_empty(res: Any) -> None:
    b, s, lab = res
    assert b.shape == (0, 4) and s.shape == (0,) and lab.shape == (0,)


@pytest.mark.parametrize("ref_fn,fn,bfn", ALL, ids=IDS)
def test_empty_inputs(ref_fn: Any, fn: Any, bfn: Any) -> None:
    assert_empty(fn([], [], []))
    assert_empty(fn([np.zeros((0, 4))], [np.zeros(0)], [np.zeros(0)]))
    assert_empty(fn([[], []], [[], []], [[], []]))
    assert_empty(fn([np.array([[0.1, 0.1, 0.1, 0.5]])], [np.array([0.9])], [np.array([1.0])]))   # zero area
    if fn is not E.nms:
        thr = {"thresh": 0.95} if fn is E.soft_nms else {"skip_box_thr": 0.95}
        assert_empty(fn([np.array([[0.1, 0.1, 0.3, 0.5]])], [np.array([0.9])], [np.array([1.0])], **thr))
    out = bfn([([], [], []), ([np.array([[0.1, 0.2, 0.3, 0.4]])], [np.array([0.5])], [np.array([2])])])
    assert_empty(out[0])
    assert out[1][0].shape == (1, 4)
    assert bfn([]) == []


@pytest.mark.parametrize("ref_fn,fn,bfn", ALL, ids=IDS)
def test_one_box_and_reversed_and_out_of_range(ref_fn: Any, fn: Any, bfn: Any) -> None:
    case = ([np.array([[0.5, 0.7, 0.1, 0.2]])], [np.array([0.8])], [np.array([3.0])])
    ours = fn(*case)
    assert_same(oracle(ref_fn, case), ours)
    np.testing.assert_allclose(ours[0], [[0.1, 0.2, 0.5, 0.7]])
    case = ([np.array([[-0.2, 0.1, 0.6, 1.3], [0.3, 0.3, 0.4, 0.4]])], [np.array([0.8, 0.3])], [np.array([0, 0])])
    ours = fn(*case)
    assert_same(oracle(ref_fn, case), ours)
    np.testing.assert_allclose(ours[0][0], [0.0, 0.1, 0.6, 1.0])


def test_fix_ups_warn_once_per_call() -> None:
    case = ([np.array([[0.5, 0.7, 0.1, 0.2], [-0.1, 0.0, 0.5, 0.5], [0.2, 0.2, 0.2, 0.4]])],
            [np.array([0.8, 0.7, 0.6])], [np.array([0, 0, 0])])
    for fn in (E.weighted_boxes_fusion, E.non_maximum_weighted, E.nms, E.soft_nms):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            fn(*case)
        text = " ".join(str(r.message) for r in rec)
        assert "clipped" in text and "zero-area" in text, fn.__name__
        assert len(rec) <= 3


@pytest.mark.parametrize("ref_fn,fn,bfn", ALL, ids=IDS)
def test_iou_exactly_at_threshold(ref_fn: Any, fn: Any, bfn: Any) -> None:
    """IoU([0, 0, .5, 1], [0, 0, 1, 1]) is exactly 0.5: not merged/suppressed at 0.5 (strict >), merged below."""
    case = ([np.array([[0.0, 0.0, 1.0, 1.0]]), np.array([[0.0, 0.0, 0.5, 1.0]])],
            [np.array([0.9]), np.array([0.6])], [np.array([1]), np.array([1])])
    at = fn(*case, iou_thr=0.5)
    below = fn(*case, iou_thr=0.4999)
    assert_same(oracle(ref_fn, case, iou_thr=0.5), at)
    assert_same(oracle(ref_fn, case, iou_thr=0.4999), below)
    assert len(at[1]) == 2
    if fn is E.soft_nms:
        assert len(below[1]) == 2          # gaussian decay keeps both
    else:
        assert len(below[1]) == 1


@pytest.mark.parametrize("ref_fn,fn,bfn", ALL, ids=IDS)
def test_equal_iou_with_two_clusters_joins_the_first(ref_fn: Any, fn: Any, bfn: Any) -> None:
    """A box overlapping two earlier clusters equally (IoU 1/3) joins the first one, as in ensemble_boxes."""
    case = ([np.array([[0.0, 0.0, 0.5, 0.5], [0.5, 0.0, 1.0, 0.5], [0.25, 0.0, 0.75, 0.5]])],
            [np.array([0.9, 0.8, 0.7])], [np.array([1, 1, 1])])
    ours = fn(*case, iou_thr=0.3)
    assert_same(oracle(ref_fn, case, iou_thr=0.3), ours, exact=fn is not E.non_maximum_weighted)
    if fn in (E.weighted_boxes_fusion, E.non_maximum_weighted):
        assert len(ours[1]) == 2 and ours[0][0][2] > 0.5 and ours[0][1][0] == 0.5


def test_wbf_tie_order_and_labels() -> None:
    """Equal scores: the order of numpy's argsort, which ensemble_boxes uses, is reproduced."""
    b = np.array([[0.1, 0.1, 0.2, 0.2], [0.5, 0.5, 0.6, 0.6], [0.3, 0.3, 0.4, 0.4], [0.7, 0.7, 0.8, 0.8],
                  [0.11, 0.1, 0.2, 0.2], [0.52, 0.5, 0.6, 0.6]])
    case = ([b], [np.full(6, 0.5)], [np.array([0, 1, 0, 1, 0, 1.7])])
    for ref_fn, fn, _ in ALL:
        assert_same(oracle(ref_fn, case), fn(*case), fn.__name__)


def test_zero_weights() -> None:
    """A zero-weight model contributes zero scores; where ensemble_boxes stays finite, results agree."""
    rng = np.random.default_rng(50)
    checked = 0
    for case in cases(51, 60):
        m = len(case[0])
        if m < 2:
            continue
        w = list(rng.uniform(0.5, 2, m))
        w[int(rng.integers(0, m))] = 0.0
        for ref_fn, fn, _ in ALL:
            ours = fn(*case, weights=w)
            assert finite(ours), fn.__name__
            ref = oracle(ref_fn, case, weights=w)
            if ref is not None and finite(ref):
                assert_same(ref, ours, fn.__name__)
                checked += 1
    assert checked > 100


def test_zero_score_cluster_is_finite_where_ensemble_boxes_gives_nan() -> None:
    """Documented difference: 0/0 in the weighted mean -> the cluster's first box (ensemble_boxes: NaN)."""
    case = ([np.array([[0.1, 0.1, 0.5, 0.5], [0.12, 0.1, 0.5, 0.5]])], [np.array([0.0, 0.0])], [np.array([1, 1])])
    ref = oracle(ensemble_boxes.weighted_boxes_fusion, case)
    assert np.isnan(ref[0]).all()
    first = case[0][0][np.argsort(case[1][0])[::-1][0]]     # the box ensemble_boxes processes first
    b, s, lab = E.weighted_boxes_fusion(*case)
    np.testing.assert_array_equal(b, [first])
    np.testing.assert_array_equal(s, [0.0])
    b, s, lab = E.weighted_boxes_fusion(*case, conf_type="box_and_model_avg")
    np.testing.assert_array_equal(s, [0.0])
    b, s, lab = E.non_maximum_weighted(*case)
    np.testing.assert_allclose(b, [first])


# ------------------------------------------------------------------------------------- inputs, errors, dtypes
@pytest.mark.parametrize("ref_fn,fn,bfn", ALL, ids=IDS)
def test_inputs_not_mutated(ref_fn: Any, fn: Any, bfn: Any) -> None:
    for case in cases(60, 10):
        before = copy.deepcopy(case)
        w = [2.0] + [1.0] * (len(case[0]) - 1)
        w_before = list(w)
        fn(*case, weights=w)
        bfn([case, case], weights=w)
        assert w == w_before
        for part, part0 in zip(case, before):
            assert len(part) == len(part0)
            for x, x0 in zip(part, part0):
                np.testing.assert_array_equal(x, x0)
    # ensemble_boxes.nms with weights rescales the caller's scores in place; ours does not
    scores = [np.array([0.9]), np.array([0.8])]
    E.nms([np.array([[0.1, 0.1, 0.5, 0.5]])] * 2, scores, [np.array([0])] * 2, weights=[1, 3])
    assert scores[0][0] == 0.9 and scores[1][0] == 0.8


BAD = [
    (dict(conf_type="foo"), "conf_type"),
    (dict(iou_thr=1.5), "iou_thr"),
    (dict(iou_thr=-0.1), "iou_thr"),
    (dict(iou_thr="a"), "iou_thr"),
    (dict(weights=[1, 2, 3]), "weights"),
    (dict(weights=[1, -2]), "weights"),
    (dict(weights=[0, 0]), "weights"),
    (dict(weights=[1, float("nan")]), "weights"),
    (dict(skip_box_thr=float("nan")), "skip_box_thr"),
    (dict(allows_overflow="yes"), "allows_overflow"),
]


@pytest.mark.parametrize("kw,name", BAD)
def test_wbf_bad_arguments_raise_value_error(kw: dict, name: str) -> None:
    case = ([np.array([[0.1, 0.1, 0.5, 0.5]])] * 2, [np.array([0.9])] * 2, [np.array([0])] * 2)
    with pytest.raises(ValueError, match=name):
        E.weighted_boxes_fusion(*case, **kw)
    with pytest.raises(ValueError, match=name):
        E.weighted_boxes_fusion_batch([case], **kw)


@pytest.mark.parametrize("fn,kw,name", [
    (E.soft_nms, dict(method=4), "method"), (E.soft_nms, dict(method=2, sigma=0), "sigma"),
    (E.nms_method, dict(method=True), "method"), (E.nms, dict(iou_thr=2), "iou_thr"),
    (E.soft_nms, dict(thresh=None), "thresh"), (E.nms, dict(weights=[1]), "weights"),
    (E.non_maximum_weighted, dict(iou_thr=-1), "iou_thr"), (E.non_maximum_weighted, dict(weights=[1, 2, 3]), "weights"),
])
def test_other_bad_arguments(fn: Any, kw: dict, name: str) -> None:
    case = ([np.array([[0.1, 0.1, 0.5, 0.5]])] * 2, [np.array([0.9])] * 2, [np.array([0])] * 2)
    with pytest.raises(ValueError, match=name):
        fn(*case, **kw)


@pytest.mark.parametrize("fn", [E.weighted_boxes_fusion, E.non_maximum_weighted, E.nms, E.soft_nms])
def test_malformed_lists_raise_value_error(fn: Any) -> None:
    b, s, lab = [np.array([[0.1, 0.1, 0.5, 0.5]])] * 2, [np.array([0.9])] * 2, [np.array([0])] * 2
    with pytest.raises(ValueError, match="scores_list"):
        fn(b, s[:1], lab)
    with pytest.raises(ValueError, match="labels_list"):
        fn(b, s, lab[:1])
    with pytest.raises(ValueError, match="scores_list"):
        fn(b, [np.array([0.9, 0.8])] * 2, lab)
    with pytest.raises(ValueError, match="boxes_list"):
        fn([np.array([[0.1, 0.1, 0.5]])] * 2, s, lab)
    with pytest.raises(ValueError, match="NaN"):
        fn([np.array([[0.1, np.nan, 0.5, 0.5]])] * 2, s, lab)
    with pytest.raises(ValueError, match="boxes_list"):
        fn(None, s, lab)
    with pytest.raises(ValueError, match="batch"):
        {E.weighted_boxes_fusion: E.weighted_boxes_fusion_batch, E.non_maximum_weighted: E.non_maximum_weighted_batch,
         E.nms: E.nms_batch, E.soft_nms: E.soft_nms_batch}[fn]([(b, s)])


def test_accepts_lists_and_tensors_and_keeps_dtypes() -> None:
    case = cases(70, 1)[0]
    ref = E.weighted_boxes_fusion(*case)
    as_lists = tuple([x.tolist() for x in part] for part in case)
    assert_identical(E.weighted_boxes_fusion(*as_lists), ref)
    as_tensors = tuple([torch.from_numpy(x) for x in part] for part in case)
    assert_identical(E.weighted_boxes_fusion(*as_tensors), ref)
    assert_identical(E.weighted_boxes_fusion_batch([as_tensors], device="cpu")[0], ref)
    assert ref[0].dtype == np.float64 and ref[2].dtype == np.float64
    nmw = E.non_maximum_weighted(*case)
    assert nmw[0].dtype == np.float32 and nmw[1].dtype == np.float32     # as ensemble_boxes
    int_labels = (case[0], case[1], [x.astype(np.int64) for x in case[2]])
    assert E.nms(*int_labels)[2].dtype == np.int64


# the GPU joins the device-parametrised tests where there is one (CI has none: nothing is skipped there)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_torch_backend_equals_numpy_backend(device: str) -> None:
    """The torch code path (forced on the CPU; the one CUDA tensors take) gives the numpy CPU path's results."""
    cs = cases(80, 40) + cases(81, 6, big=True)
    runs = [(E.weighted_boxes_fusion_batch, dict(conf_type="box_and_model_avg", weights=[1, 2, 1, 3][:1])),
            (E.non_maximum_weighted_batch, {}), (E.nms_batch, {}), (E.soft_nms_batch, dict(method=1)),
            (E.soft_nms_batch, dict(method=2))]
    for bfn, kw in runs:
        subset = [c for c in cs if len(c[0]) == 1] if "weights" in kw else cs
        ref = bfn(subset, **kw)
        try:
            E.FORCE_TORCH = device == "cpu"
            got = bfn(subset, **kw, device=device)
        finally:
            E.FORCE_TORCH = False
        exact = bfn is not E.soft_nms_batch and device == "cpu"  # GPU reductions may sum in another order
        for a, b in zip(ref, got):
            for x, y in zip(a, b):
                np.testing.assert_allclose(x, y, rtol=0, atol=0 if exact else 1e-12)
                assert x.shape == y.shape


def test_chunking_and_strategies_do_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny chunks (many dense chunks, split by size), and NMS by rounds instead of all pairs: same results."""
    cs = cases(85, 40) + cases(86, 5, big=True)
    runs = [(E.weighted_boxes_fusion_batch, dict(conf_type="absent_model_aware_avg")),
            (E.non_maximum_weighted_batch, {}), (E.nms_batch, {}), (E.soft_nms_batch, dict(method=2))]
    ref = [bfn(cs, **kw) for bfn, kw in runs]
    monkeypatch.setattr(E, "_SLOTS", 64)
    monkeypatch.setattr(E, "_SMALL_CHUNK", 0)
    monkeypatch.setattr(E, "_SMALL_PAIRS", 0)
    for (bfn, kw), r in zip(runs, ref):
        for a, b in zip(r, bfn(cs, **kw)):
            assert_identical(a, b, bfn.__name__)


def test_numba_argsort_port() -> None:
    numba = pytest.importorskip("numba")

    @numba.njit
    def nb_argsort(a: np.ndarray) -> np.ndarray:
        return np.argsort(a)

    rng = np.random.default_rng(90)
    for n in list(range(0, 40)) + [64, 100]:
        for dt in (np.float64, np.float32):
            a = (rng.integers(0, 4, n) / 4).astype(dt)
            np.testing.assert_array_equal(E._numba_argsort(a), nb_argsort(a))


# ------------------------------------------------------------------------------------------------ tensor cores
@pytest.mark.parametrize("device", DEVICES)
def test_tensor_cores_match_drop_ins_in_range(device: str) -> None:
    """Inside [0, 1] with distinct scores, the tensor cores compute what the drop-ins compute (on every device)."""
    rng = np.random.default_rng(100)
    for _ in range(25):
        bl, sl, ll = rand_case(rng)
        bl = [np.clip(np.sort(b.reshape(-1, 2, 2), axis=1).reshape(-1, 4), 0.01, 0.99) for b in bl]
        bl = [b[[i for i in range(len(b)) if b[i, 2] > b[i, 0] and b[i, 3] > b[i, 1]]] for b in bl]
        sl = [rng.uniform(0.05, 1, len(b)) for b in bl]
        ll = [rng.integers(0, 3, len(b)) for b in bl]
        boxes = torch.from_numpy(np.concatenate(bl)) if bl else torch.zeros((0, 4), dtype=torch.float64)
        scores = torch.from_numpy(np.concatenate(sl)) if bl else torch.zeros(0, dtype=torch.float64)
        labels = torch.from_numpy(np.concatenate(ll)) if bl else torch.zeros(0, dtype=torch.long)
        model = torch.from_numpy(np.repeat(np.arange(len(bl)), [len(b) for b in bl]))
        boxes, scores, labels, model = (t.to(device) for t in (boxes, scores, labels, model))
        w = list(rng.uniform(0.5, 2, len(bl)))
        for ct in CONF_TYPES:
            tb, ts, tl = E.wbf_tensor(boxes, scores, labels, model, len(bl), weights=w, conf_type=ct)
            db, ds, dl = E.weighted_boxes_fusion(bl, sl, ll, weights=w, conf_type=ct)
            assert tb.device.type == device and tl.dtype == torch.long
            assert_same((db, ds, dl), (tb.cpu().numpy(), ts.cpu().numpy(), tl.cpu().numpy()))
        tb, ts, tl = E.nmw_tensor(boxes, scores, labels, model, len(bl), weights=w)
        assert_same(E.non_maximum_weighted(bl, sl, ll, weights=w), (tb.cpu().numpy(), ts.cpu().numpy(),
                                                                    tl.cpu().numpy()))
        for method in (1, 2):
            keep, dec = E.soft_nms_tensor(boxes, scores, labels, method=method)
            db, ds, dl = E.soft_nms(bl, sl, ll, method=method)
            assert sorted(map(tuple, boxes[keep].cpu().numpy().round(12))) == sorted(map(tuple, db.round(12)))
            assert bool((dec[:-1] >= dec[1:]).all()) and bool((dec <= scores[keep]).all())


@pytest.mark.parametrize("device", DEVICES)
def test_nms_tensor_matches_torchvision_in_pixels(device: str) -> None:
    torchvision = pytest.importorskip("torchvision")
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        n = int(torch.randint(0, 300, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 600
        wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 150 + 1
        boxes = torch.cat([xy, xy + wh], 1)
        scores = torch.rand(n, generator=g, dtype=torch.float64)
        labels = torch.randint(0, 5, (n,), generator=g)
        boxes, scores, labels = boxes.to(device), scores.to(device), labels.to(device)
        for thr in (0.3, 0.5, 0.7):
            ref = torchvision.ops.batched_nms(boxes, scores, labels, thr)
            assert torch.equal(E.nms_tensor(boxes, scores, labels, thr), ref)


def box_voting_reference(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, nms_thr: float,
                         vote_thr: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Obviously correct (slow) box voting: per label, sort by score (stable), greedy NMS, then weighted vote."""
    def iou(a: np.ndarray, b: np.ndarray) -> float:
        iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
        ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
        inter = iw * ih
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    out = []
    for lab in np.unique(labels):
        idx = [i for i in np.argsort(-scores, kind="stable") if labels[i] == lab]
        kept: List[int] = []
        for i in idx:
            if all(iou(boxes[k], boxes[i]) <= nms_thr for k in kept):
                kept.append(i)
        for k in kept:
            voters = [i for i in range(len(boxes)) if labels[i] == lab and iou(boxes[k], boxes[i]) >= vote_thr]
            w = scores[voters]
            box = (w[:, None] * boxes[voters]).sum(0) / w.sum() if w.sum() != 0 else boxes[k]
            out.append((k, box))
    out.sort(key=lambda kb: (-scores[kb[0]], kb[0]))
    keep = [k for k, _ in out]
    return (np.array([b for _, b in out]).reshape(-1, 4), scores[keep], labels[keep])


def test_box_helpers() -> None:
    torchvision = pytest.importorskip("torchvision")
    from ddkit.ops import boxes as B

    g = torch.Generator().manual_seed(1)
    a = torch.rand(7, 4, generator=g, dtype=torch.float64) * 10
    b = torch.rand(5, 4, generator=g, dtype=torch.float64) * 10
    a_ok, b_ok = B.order_box_corners(a), B.order_box_corners(b)
    assert bool((a_ok[:, 2:] >= a_ok[:, :2]).all()) and not torch.equal(a_ok, a)
    assert torch.equal(B.order_box_corners(a_ok), a_ok)
    torch.testing.assert_close(B.box_iou(a_ok, b_ok), torchvision.ops.box_iou(a_ok, b_ok), rtol=0, atol=0)
    torch.testing.assert_close(B.elementwise_box_iou(a_ok[:, None], b_ok[None]), B.box_iou(a_ok, b_ok),
                               rtol=0, atol=0)
    torch.testing.assert_close(B.box_area(a_ok[None]), B.box_area(a_ok)[None])


def test_box_voting_matches_slow_reference() -> None:
    rng = np.random.default_rng(110)
    for t in range(40):
        n = int(rng.integers(0, 40))
        c = rng.uniform(0, 100, (max(n // 4, 1), 2))[rng.integers(0, max(n // 4, 1), n)]
        c = c + rng.normal(0, 4, (n, 2))
        wh = rng.uniform(5, 30, (n, 2))
        boxes = np.concatenate([c - wh / 2, c + wh / 2], 1)
        scores = rng.uniform(0, 1, n) if t % 2 else np.ceil(rng.uniform(0, 1, n) * 4) / 4
        labels = rng.integers(0, 3, n)
        nms_thr, vote_thr = float(rng.choice([0.3, 0.5])), float(rng.choice([0.5, 0.8]))
        rb, rs, rl = box_voting_reference(boxes, scores, labels, nms_thr, vote_thr)
        tb, ts, tl = E.box_voting_tensor(torch.from_numpy(boxes), torch.from_numpy(scores),
                                         torch.from_numpy(labels), nms_thr, vote_thr)
        np.testing.assert_allclose(tb.numpy(), rb, rtol=0, atol=1e-9)
        np.testing.assert_array_equal(ts.numpy(), rs)
        np.testing.assert_array_equal(tl.numpy(), rl)


def test_box_voting_moves_boxes_towards_voters() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    scores = torch.tensor([0.9, 0.9, 0.5])
    labels = torch.tensor([1, 1, 1])
    b, s, lab = E.box_voting_tensor(boxes, scores, labels, nms_thr=0.5, vote_thr=0.5)
    torch.testing.assert_close(b, torch.tensor([[0.5, 0.0, 10.5, 10.0], [50.0, 50.0, 60.0, 60.0]]))
    torch.testing.assert_close(s, torch.tensor([0.9, 0.5]))
    b, s, lab = E.box_voting_tensor(boxes, scores, labels, nms_thr=0.5, vote_thr=0.9)   # the second does not vote
    torch.testing.assert_close(b[0], boxes[0])


def test_tensor_cores_validate() -> None:
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="boxes"):
        E.nms_tensor(boxes[0], torch.ones(1), torch.zeros(1))
    with pytest.raises(ValueError, match="scores"):
        E.nms_tensor(boxes, torch.ones(2), torch.zeros(1))
    with pytest.raises(ValueError, match="model_idx"):
        E.wbf_tensor(boxes, torch.ones(1), torch.zeros(1), torch.tensor([2]), 2)
    with pytest.raises(ValueError, match="vote_thr"):
        E.box_voting_tensor(boxes, torch.ones(1), torch.zeros(1), vote_thr=2)
    assert E.nms_tensor(torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0)).shape == (0,)
    b, s, lab = E.wbf_tensor(torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0, dtype=torch.long),
                             torch.zeros(0, dtype=torch.long), 2)
    assert b.shape == (0, 4) and s.shape == (0,) and lab.shape == (0,)


# ------------------------------------------------------------------------------- crowded scenes (one class)
def crowded_case(rng: np.random.Generator, quant: Any = None) -> Tuple[list, list, list]:
    """One dominant class: 30-120 small objects covering ~40 % of the image seen by 2-5 jittered views, plus
    false positives, a second class, reversed corners, duplicates and coordinates outside [0, 1]."""
    n_obj = int(rng.integers(30, 121))
    side = np.sqrt(0.4 / n_obj)
    centre = rng.uniform(0, 1, (n_obj, 2))
    size = side * np.exp(rng.normal(0, 0.35, (n_obj, 2)))
    bl, sl, ll = [], [], []
    for _ in range(int(rng.integers(2, 6))):
        det = rng.random(n_obj) < 0.9
        k = int(det.sum())
        c = centre[det] + rng.normal(0, 0.05, (k, 2)) * size[det]
        wh = size[det] * np.exp(rng.normal(0, 0.1, (k, 2)))
        n_fp = int(rng.integers(0, 12))
        fc, fwh = rng.uniform(0, 1, (n_fp, 2)), side * np.exp(rng.normal(0, 0.5, (n_fp, 2)))
        b = np.concatenate([np.concatenate([c - wh / 2, c + wh / 2], 1), np.concatenate([fc - fwh / 2, fc + fwh / 2], 1)])
        s = np.concatenate([rng.uniform(0.3, 1, k), rng.uniform(0.01, 0.3, n_fp)])
        if quant:
            s = np.ceil(s * quant) / quant
        if len(b) > 2 and rng.random() < 0.3:
            b[-1], s[-1] = b[0], s[0]                                # an exact duplicate
        if len(b) and rng.random() < 0.2:
            b[0] = b[0][[2, 3, 0, 1]]                                # reversed corners
        lab = (rng.random(len(b)) < 0.1).astype(np.float64)         # 90 % in class 0
        bl.append(b)
        sl.append(s)
        ll.append(lab)
    return bl, sl, ll


def crowded_cases(seed: int, n: int) -> List[Tuple[list, list, list]]:
    rng = np.random.default_rng(seed)
    return [crowded_case(rng, quant=[None, None, 20][i % 3]) for i in range(n)]


@pytest.mark.parametrize("conf_type", CONF_TYPES)
def test_wbf_crowded_matches_ensemble_boxes(conf_type: str) -> None:
    rng = np.random.default_rng(200)
    cs = crowded_cases(201, 12)
    kws = [dict(conf_type=conf_type, iou_thr=float(rng.choice([0.0, 0.3, 0.55, 0.8])),
                weights=[float(w) for w in rng.uniform(0.5, 2, len(c[0]))] if i % 2 else None)
           for i, c in enumerate(cs)]
    assert check_parity(ensemble_boxes.weighted_boxes_fusion, E.weighted_boxes_fusion,
                        E.weighted_boxes_fusion_batch, cs, kws) == len(cs)


def test_nmw_and_nms_crowded_match_ensemble_boxes() -> None:
    rng = np.random.default_rng(210)
    cs = crowded_cases(211, 12)
    kws = [dict(iou_thr=float(rng.choice([0.0, 0.3, 0.55, 0.8]))) for _ in cs]
    assert check_parity(ensemble_boxes.non_maximum_weighted, E.non_maximum_weighted,      # slow in ensemble_boxes
                        E.non_maximum_weighted_batch, cs[:5], kws[:5]) == 5
    assert check_parity(ensemble_boxes.nms, E.nms, E.nms_batch, cs, kws) == len(cs)


@pytest.mark.parametrize("method", [1, 2])
def test_soft_nms_crowded_matches_ensemble_boxes(method: int) -> None:
    """Continuous scores take the parts path; quantized ones (ties) fall back to whole groups: both exact."""
    rng = np.random.default_rng(220 + method)
    cs = crowded_cases(225 + method, 9)
    kws = [dict(method=method, iou_thr=float(rng.choice([0.3, 0.5])), sigma=float(rng.choice([0.1, 0.5])),
                thresh=float(rng.choice([0.001, 0.3]))) for _ in cs]
    assert check_parity(ensemble_boxes.soft_nms, E.soft_nms, E.soft_nms_batch, cs, kws) == len(cs)


def pile_case(rng: np.random.Generator, quant: Any = None) -> Tuple[list, list, list]:
    """One class, 250-400 boxes in 3 views: piles on two spots (every box overlaps dozens of others), a few boxes
    covering nearly the whole image (they meet every cell of a grid made fine by many small boxes), duplicates."""
    bl, sl, ll = [], [], []
    spots = rng.uniform(0.3, 0.7, (2, 2))
    for _ in range(3):
        n_pile, n_big, n_small = int(rng.integers(15, 30)), int(rng.integers(1, 3)), int(rng.integers(60, 100))
        c = spots[rng.integers(0, 2, n_pile)] + rng.normal(0, 0.01, (n_pile, 2))
        wh = 0.08 * np.exp(rng.normal(0, 0.2, (n_pile, 2)))
        big = np.concatenate([rng.uniform(0, 0.05, (n_big, 2)), rng.uniform(0.95, 1, (n_big, 2))], 1)
        sc, swh = rng.uniform(0, 1, (n_small, 2)), rng.uniform(0.01, 0.03, (n_small, 2))
        b = np.concatenate([np.concatenate([c - wh / 2, c + wh / 2], 1), big,
                            np.concatenate([sc - swh / 2, sc + swh / 2], 1)])
        b[-3:] = b[:3]                                             # exact duplicates
        s = rng.uniform(0.01, 1, len(b))
        if quant:
            s = np.ceil(s * quant) / quant
        bl.append(b)
        sl.append(s)
        ll.append(np.zeros(len(b)))
    return bl, sl, ll


def test_compiled_overlap_pairs_match_brute_force() -> None:
    """The compiled soft-NMS pair search: every pair of a group with a positive intersection once, with the IoU
    ensemble_boxes computes, also where its work arrays must grow (piles: far more pairs than 4 per box; boxes
    covering the whole grid: more cell entries than 8 per box)."""
    pytest.importorskip("numba")
    from ddkit.ops.ensemble import backends, compiled, sort

    rng = np.random.default_rng(270)
    grew = False
    for t in range(6):
        bl, _, _ = pile_case(rng) if t % 2 else crowded_case(rng)
        c = np.clip(np.sort(np.concatenate(bl).reshape(-1, 2, 2), axis=1).reshape(-1, 4), 0, 1)
        c = c[(c[:, 2] > c[:, 0]) & (c[:, 3] > c[:, 1])]
        g = np.sort(rng.random(len(c)) < 0.2).astype(np.int64)    # two groups, sorted
        seg = sort._segments(backends._NUMPY, g)
        gptr, pa, pb, iou = compiled.overlap_pairs(c, seg)
        area = (c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1])
        want = {}
        for i in range(len(c)):
            for j in range(i):
                w = min(c[i, 3], c[j, 3]) - max(c[i, 1], c[j, 1])
                h = min(c[i, 2], c[j, 2]) - max(c[i, 0], c[j, 0])
                if g[i] == g[j] and w > 0 and h > 0:
                    want[(i, j)] = (w * h) / (area[j] + area[i] - w * h)    # as ensemble_boxes, j selected first
        got = {(int(a), int(b)): float(v) for a, b, v in zip(pa, pb, iou)}
        assert len(got) == len(pa) and got == want
        assert [int(x) for x in gptr] == [0, int((g[pa] == 0).sum()), len(pa)] and np.all(g[pa][:-1] <= g[pa][1:])
        grew |= len(pa) > 4 * len(c) + 16
    assert grew


@pytest.mark.parametrize("method", [1, 2])
def test_soft_nms_piles_match_ensemble_boxes(method: int) -> None:
    """Piles of boxes where every box overlaps dozens of others, and boxes that cover the whole image: the
    compiled path's grown work arrays give ensemble_boxes' results exactly (ties included: quantized scores)."""
    rng = np.random.default_rng(280 + method)
    cs = [pile_case(rng, quant=[None, 20][i % 2]) for i in range(4)]
    kws = [dict(method=method, iou_thr=float(rng.choice([0.3, 0.5])), sigma=float(rng.choice([0.1, 0.5])),
                thresh=float(rng.choice([0.001, 0.3]))) for _ in cs]
    assert check_parity(ensemble_boxes.soft_nms, E.soft_nms, E.soft_nms_batch, cs, kws) == len(cs)


def run_all(cs: List[Any]) -> List[Any]:
    """Every batched drop-in and tensor core on the cases (group sizes 1 to hundreds, ties, duplicates)."""
    out: List[Any] = []
    for ct in CONF_TYPES:
        out += E.weighted_boxes_fusion_batch(cs, conf_type=ct, iou_thr=0.3)
    out += E.non_maximum_weighted_batch(cs) + E.nms_batch(cs, iou_thr=0.3)
    out += E.soft_nms_batch(cs, method=1) + E.soft_nms_batch(cs, method=2, thresh=0.2)
    for bl, sl, ll in cs[:8]:
        if not sum(len(s) for s in sl):
            continue
        b, s, lab = (torch.from_numpy(np.concatenate(x)) for x in (bl, sl, ll))
        model = torch.from_numpy(np.repeat(np.arange(len(bl)), [len(x) for x in bl]))
        out.append(E.wbf_tensor(b * 640, s, lab.long(), model, len(bl), iou_thr=0.4))
        out.append(E.nmw_tensor(b * 640 - 100, s, lab.long(), model, len(bl)))
        out.append(E.soft_nms_tensor(b, s, lab, method=2))
        out.append((E.nms_tensor(b, s, lab, 0.4),))
        out.append(E.box_voting_tensor(b * 640, s, lab, 0.5, 0.6))
    return out


def assert_runs_identical(a: List[Any], b: List[Any]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        for x, y in zip(ra, rb):
            x, y = (np.asarray(v.numpy() if isinstance(v, torch.Tensor) else v) for v in (x, y))
            assert x.dtype == y.dtype and x.shape == y.shape
            np.testing.assert_array_equal(x, y)


def test_parts_give_the_results_of_whole_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every group split into parts (even tiny ones; tiny pair blocks and few strips) == no group split."""
    cs = cases(230, 40) + cases(231, 6, big=True) + crowded_cases(232, 3)
    monkeypatch.setattr(E, "USE_NUMBA", False)               # the vectorized loops (as on CUDA)
    monkeypatch.setattr(E, "_SPATIAL_MIN", 10 ** 9)
    whole = run_all(cs)
    monkeypatch.setattr(E, "_SPATIAL_MIN", 0)
    assert_runs_identical(whole, run_all(cs))
    monkeypatch.setattr(E, "_PAIR_BLOCK", 5)
    monkeypatch.setattr(E, "_MAX_STRIPS", 2)
    assert_runs_identical(whole, run_all(cs))
    pytest.importorskip("numba")                             # installed with ensemble_boxes
    monkeypatch.setattr(E, "USE_NUMBA", True)                # the compiled CPU loops and their grid index
    monkeypatch.setattr(E, "_SOFT_COMPILED_MIN", 0)
    assert_runs_identical(whole, run_all(cs))


def test_wbf_parts_that_leak_are_merged_and_rerun(monkeypatch: pytest.MonkeyPatch) -> None:
    """An L-shaped cluster: its hull covers a box that overlaps none of its members (another part), so the parts
    are merged and run again; the result stays exact."""
    from ddkit.ops.ensemble import spatial, wbf

    merged: List[int] = []

    def spy(*args: Any) -> Any:
        a, b = spatial.escaped_clusters(*args)
        merged.append(int(a.shape[0]))
        return a, b

    monkeypatch.setattr(wbf, "escaped_clusters", spy)
    monkeypatch.setattr(E, "USE_NUMBA", False)
    monkeypatch.setattr(E, "_SPATIAL_MIN", 0)
    # two boxes forming an L fuse into a box covering the corner, where a third box sits alone
    b = np.array([[0.0, 0.0, 0.4, 0.1], [0.0, 0.0, 0.1, 0.4], [0.3, 0.3, 0.4, 0.4]])
    case = ([b], [np.array([0.9, 0.8, 0.7])], [np.array([0, 0, 0])])
    for thr in (0.0, 0.1):
        merged.clear()
        ours = E.weighted_boxes_fusion(*case, iou_thr=thr)
        assert_same(oracle(ensemble_boxes.weighted_boxes_fusion, case, iou_thr=thr), ours, exact=True)
        assert merged and merged[0] > 0


@pytest.mark.parametrize("device", DEVICES)
def test_crowded_torch_backend_equals_numpy_backend(device: str) -> None:
    cs = crowded_cases(240, 4)
    runs = [(E.weighted_boxes_fusion_batch, dict(conf_type="absent_model_aware_avg")),
            (E.non_maximum_weighted_batch, {}), (E.nms_batch, {}), (E.soft_nms_batch, dict(method=2))]
    for bfn, kw in runs:
        ref = bfn(cs, **kw)
        try:
            E.FORCE_TORCH = device == "cpu"
            got = bfn(cs, **kw, device=device)
        finally:
            E.FORCE_TORCH = False
        exact = bfn is not E.soft_nms_batch and device == "cpu"
        for a, b in zip(ref, got):
            for x, y in zip(a, b):
                assert x.shape == y.shape
                np.testing.assert_allclose(x, y, rtol=0, atol=0 if exact else 1e-12)


def test_overlap_pairs_match_brute_force() -> None:
    """The spatial index finds exactly the pairs with a positive intersection (touching edges excluded)."""
    from ddkit.ops.ensemble import backends, spatial

    rng = np.random.default_rng(250)
    for t in range(30):
        n = int(rng.integers(0, 80))
        xy = np.round(rng.uniform(-50, 50, (n, 2)), 0 if t % 2 else 6)          # integers: many touching edges
        wh = np.round(rng.uniform(1, 30 if t % 3 else 100, (n, 2)), 0 if t % 2 else 6)
        c = np.concatenate([xy, xy + wh], 1)
        g = rng.integers(0, 3, n)
        want = {(i, j) for i in range(n) for j in range(i + 1, n) if g[i] == g[j]
                and min(c[i, 2], c[j, 2]) > max(c[i, 0], c[j, 0]) and min(c[i, 3], c[j, 3]) > max(c[i, 1], c[j, 1])}
        for xp in (backends._NUMPY, backends._Torch(torch.device("cpu"))):
            pi, pj = spatial.overlap_pairs(xp, xp.asarray(c), xp.asarray(g))
            got = [(min(i, j), max(i, j)) for i, j in zip(xp.numpy(pi).tolist(), xp.numpy(pj).tolist())]
            assert len(got) == len(set(got)) and set(got) == want


def test_box_voting_crowded_matches_slow_reference() -> None:
    rng = np.random.default_rng(260)
    for bl, sl, ll in crowded_cases(261, 4):
        boxes = np.clip(np.sort(np.concatenate(bl).reshape(-1, 2, 2), axis=1).reshape(-1, 4), 0, 1) * 100
        ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, scores, labels = boxes[ok], np.concatenate(sl)[ok], np.concatenate(ll)[ok].astype(np.int64)
        nms_thr, vote_thr = float(rng.choice([0.3, 0.5])), float(rng.choice([0.5, 0.8]))
        rb, rs, rl = box_voting_reference(boxes, scores, labels, nms_thr, vote_thr)
        tb, ts, tl = E.box_voting_tensor(torch.from_numpy(boxes), torch.from_numpy(scores),
                                         torch.from_numpy(labels), nms_thr, vote_thr)
        np.testing.assert_allclose(tb.numpy(), rb, rtol=0, atol=1e-9)
        np.testing.assert_array_equal(ts.numpy(), rs)
        np.testing.assert_array_equal(tl.numpy(), rl)
