"""Weighted boxes fusion of a whole batch: the greedy clustering (one loop step per rank) and the fused scores."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from ddkit.ops.ensemble import compiled
from ddkit.ops.ensemble.backends import Array, Backend
from ddkit.ops.ensemble.batch import _Batch
from ddkit.ops.ensemble.fusion import _final_order, _Fusion, _fusion_groups, _fusion_inputs
from ddkit.ops.ensemble.sort import _active, _chunk_layout, _chunks, _Segments
from ddkit.ops.ensemble.spatial import escaped_clusters, merge_labels, part_labels, split_by, unpermute


def _wbf_assign(xp: Backend, fu: _Fusion, seg: _Segments, thr: float, need_ws: bool
                ) -> Tuple[Array, Array, Array, Array]:
    """The sequential greedy clustering of WBF, all groups at once: one loop step per rank, not per box.

    Step ``j`` takes the ``j``-th box of every group, computes its IoU with the group's current fused boxes, and
    joins the best one if that IoU is ``> thr`` (first one on ties), or opens a cluster; the fused box is updated as
    ensemble_boxes does (float32 accumulation of ``score * box``, divided by the float64 summed score).

    Returns per sorted position the position of its cluster's first box (``seed``), and per seed position the fused
    box, the summed weighted score and the summed model weight."""
    coords, b1, wv = fu.coords, fu.b1, fu.wv
    n = coords.shape[0]
    # a group of one box is one cluster: these defaults are only overwritten for larger groups
    seed_of = xp.arange(n)
    f_out, conf_out, ws_out = xp.copy(coords), xp.copy(b1), xp.copy(wv)
    coords_t = coords.T
    inf = float("inf")
    for groups, ss in (_chunks(xp, seg.sizes, ratio=True, min_size=2) if n else []):
        pos, valid, s = _chunk_layout(xp, seg.starts, ss, groups)
        gc = len(ss)
        # cluster state indexed by the rank of the cluster's first box; until box j is processed, column j holds
        # box j itself (its coordinates, area, score, weight), which is also the state of the cluster it may open
        fx = xp.contiguous(coords_t[:, pos])                         # [4, gc, s] fused boxes, coordinate-major
        area = xp.contiguous((fx[2] - fx[0]) * (fx[3] - fx[1]))      # inf once a box has joined a cluster
        conf = xp.contiguous(b1[pos])                                # summed weighted scores
        acc = xp.contiguous(xp.cast(conf[None] * fx, xp.f32))        # float32 sums of score * box
        wsum = xp.contiguous(wv[pos]) if need_ws else conf
        notseed = xp.zeros((gc, s), xp.bool_)
        asg = xp.zeros((gc, s), xp.i64)
        fx2, acc2 = fx.reshape(4, -1), acc.reshape(4, -1)
        conf1, area1, ws1 = conf.reshape(-1), area.reshape(-1), wsum.reshape(-1)
        rows = xp.arange(gc)
        for j, a in enumerate(_active(ss, s)):
            if j == 0:
                continue
            c = fx[:, :a, j:j + 1]
            xa = xp.maximum(fx[0, :a, :j], c[0])
            ya = xp.maximum(fx[1, :a, :j], c[1])
            xb = xp.minimum(fx[2, :a, :j], c[2])
            yb = xp.minimum(fx[3, :a, :j], c[3])
            inter = xp.clip0(xb - xa) * xp.clip0(yb - ya)
            iou = inter / (area[:a, :j] + area[:a, j:j + 1] - inter)   # 0 against boxes that joined a cluster
            best = iou.argmax(1)
            join = iou[rows[:a], best] > thr
            notseed[:a, j] = join
            asg[:a, j] = xp.where(join, best, j)
            jr = xp.nonzero(join)
            if jr.shape[0] == 0:
                continue
            fi = jr * s + xp.take(best, jr)         # the joined clusters
            fj = jr * s + j                         # the joining boxes
            sc = conf1[fj]
            new_acc = xp.cast(xp.cast(acc2[:, fi], xp.f64) + sc * fx2[:, fj], xp.f32)
            acc2[:, fi] = new_acc
            new_conf = conf1[fi] + sc
            conf1[fi] = new_conf
            if need_ws:
                ws1[fi] = ws1[fi] + ws1[fj]
            avg = xp.cast(xp.cast(xp.cast(new_acc, xp.f64) / new_conf, xp.f32), xp.f64)
            avg = xp.where(new_conf == 0, fx2[:, fi], avg)
            fx2[:, fi] = avg
            area1[fi] = (avg[2] - avg[0]) * (avg[3] - avg[1])
            area1[fj] = inf
        seed_of[pos[valid]] = xp.gather1(pos, asg)[valid]
        sm = ~notseed & valid
        ps = pos[sm]
        f_out[ps] = fx[:, sm].T
        conf_out[ps] = conf[sm]
        ws_out[ps] = wsum[sm]
    return seed_of, f_out, conf_out, ws_out


def _wbf_assign_parts(xp: Backend, fu: _Fusion, seg: _Segments, thr: float, need_ws: bool
                      ) -> Tuple[Array, Array, Array, Array]:
    """:func:`_wbf_assign` on the independent parts of the groups (:mod:`.spatial`), checked: the same results (on
    the CPU, the compiled loop with its grid on whole groups when numba is there)."""
    if compiled.available(xp):
        return compiled.wbf_assign(fu.coords, fu.b1, fu.wv, seg, thr, need_ws)
    lab = part_labels(xp, fu.coords, seg)
    while True:
        split = split_by(xp, lab, seg)
        if split is None:
            return _wbf_assign(xp, fu, seg, thr, need_ws)
        perm, parts = split
        sub = _Fusion(*(xp.take(getattr(fu, f), perm) if f in ("coords", "b1", "wv") else None
                        for f in ("coords", "b1", "wv", "model", "lab", "img", "scan")))
        seed_of, f_out, conf_out, ws_out = _wbf_assign(xp, sub, parts, thr, need_ws)
        seed_of = unpermute(xp, perm, xp.take(perm, seed_of))
        a, b = escaped_clusters(xp, fu.coords, seg.gidx, lab, seed_of)
        if a.shape[0] == 0:
            return (seed_of, unpermute(xp, perm, f_out), unpermute(xp, perm, conf_out),
                    unpermute(xp, perm, ws_out))
        lab = merge_labels(xp, lab, a, b)


def _model_sums(xp: Backend, presence: Array, wn: Optional[np.ndarray], m_img: Array) -> Tuple[Array, Array]:
    """Per cluster: the summed weight of the models present (``clustered_boxes[idx, 2].sum()``) and of the models
    absent (``weights[mask].sum()``), with numpy's own summation on the same arrays as ensemble_boxes."""
    if wn is None:
        present = xp.cast(presence.sum(1), xp.f64)
        return present, xp.cast(m_img, xp.f64) - present
    m = presence.shape[1]
    if m <= 62:
        code = (xp.cast(presence, xp.i64) * xp.asarray(np.left_shift(1, np.arange(m, dtype=np.int64)))).sum(1)
        inv = xp.unique_inverse(code)
        uniq = np.unique(xp.numpy(code))
        masks = [[(int(c) >> k) & 1 == 1 for k in range(m)] for c in uniq.tolist()]
    else:
        inv = xp.unique_rows_inverse(presence)
        masks = np.unique(xp.numpy(presence), axis=0).tolist()
    wf = wn.astype(np.float64)
    pres = np.array([float(wf[np.asarray(mk, dtype=bool)].sum()) for mk in masks], dtype=np.float64)
    absn = np.array([float(wn[~np.asarray(mk, dtype=bool)].sum()) for mk in masks], dtype=np.float64)
    return xp.take(xp.asarray(pres), inv), xp.take(xp.asarray(absn), inv)


def _wbf(bt: _Batch, wn: Optional[np.ndarray], iou_thr: float, skip_box_thr: float, conf_type: str,
         allows_overflow: bool, clip: bool, tie: str, fn: Optional[str]) -> Tuple[Array, ...]:
    """WBF for a whole batch. Returns image-sorted ``(boxes f64, scores f64, labels f64, label int64, img)``."""
    xp = bt.xp
    fu = _fusion_inputs(bt, wn, skip_box_thr, clip, fn)
    s, seg, first = _fusion_groups(xp, fu, bt.n_images, tie)
    n = s.b1.shape[0]
    need_ws = conf_type in ("box_and_model_avg", "absent_model_aware_avg")
    seed_of, f_out, conf_out, ws_out = _wbf_assign_parts(xp, s, seg, iou_thr, need_ws)
    seeds = xp.nonzero(seed_of == xp.arange(n))
    k = seeds.shape[0]
    inv = xp.full(n, -1, xp.i64)
    inv[seeds] = xp.arange(k)
    cl = xp.take(inv, seed_of)
    cnt = xp.cast(xp.bincount(cl, xp.full(n, 1.0, xp.f64), k), xp.i64)
    nf = xp.cast(cnt, xp.f64)
    single = cnt == 1
    img = xp.take(s.img, seeds)
    b1_seed = xp.take(s.b1, seeds)
    m_img = xp.take(xp.asarray(bt.n_models), img)
    if wn is None:
        wsum_img, wmax_img = xp.cast(m_img, xp.f64), xp.full(k, 1.0, xp.f64)
    else:
        wsum_img = xp.full(k, float(wn.sum()), xp.f64)
        wmax_img = xp.full(k, float(wn.max()), xp.f64)
    f32 = (lambda x: xp.cast(xp.cast(x, xp.f32), xp.f64))
    if conf_type == "max":
        ws1 = xp.where(single, b1_seed, f32(b1_seed))
    else:
        ws1 = xp.where(single, b1_seed, f32(xp.take(conf_out, seeds) / nf))
    if need_ws:
        ws2 = xp.where(single, xp.take(s.wv, seeds), f32(xp.take(ws_out, seeds)))
        mm = max(int(bt.n_models.max()) if len(bt.n_models) else 0, 1)
        presence = xp.zeros(k * mm, xp.bool_)
        presence[cl * mm + s.model] = True
        present, absent = _model_sums(xp, presence.reshape(k, mm), wn, m_img)
        if conf_type == "box_and_model_avg":
            t = xp.where(ws2 == 0, 0.0, ws1 * nf / xp.where(ws2 == 0, 1.0, ws2))
            score = t * present / wsum_img
        else:
            score = ws1 * nf / (ws2 + absent)
    elif conf_type == "max":
        score = ws1 / wmax_img
    elif not allows_overflow:
        score = ws1 * xp.cast(xp.minimum(m_img, cnt), xp.f64) / wsum_img
    else:
        score = ws1 * nf / wsum_img
    lab = xp.take(s.lab, seeds)
    lab_f = xp.where(single, xp.cast(lab, xp.f64), f32(lab))
    concat = xp.take(first, xp.take(seg.gidx, seeds)) * (n + 1) + xp.take(seg.rank, seeds)
    order = _final_order(xp, img, score, concat, tie, np.float64)
    return (xp.take(xp.take(f_out, seeds), order), xp.take(score, order), xp.take(lab_f, order),
            xp.take(lab, order), xp.take(img, order))
