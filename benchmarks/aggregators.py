"""Benchmark of the detection aggregators of :mod:`ddkit.ops.ensemble` against ``ensemble_boxes`` 1.0.9.

Synthetic test-time-augmentation (TTA) output: every image has ~50 objects of 80 classes (a skewed class
distribution, so some labels have dozens of boxes) seen by 5 "transforms" (models) that each detect ~90% of the
objects with jittered boxes and scores, plus ~9 false positives each: ~270 boxes per image, normalized to [0, 1]
with some coordinates slightly outside (clipped by both libraries). Scores are continuous (sigmoid-like).

For WBF, soft-NMS (gaussian), NMW and NMS the script times, on the same images and in the same run:
``ensemble_boxes`` (one call per image), the ddkit drop-in (one call per image), the ddkit batched drop-in (one
call for all images; CPU, and CUDA when available), prints the speed-ups and the largest deviation from
``ensemble_boxes`` (boxes and scores; results with other boxes, labels or order are counted as mismatches). It then
compares class-wise NMS with :func:`torchvision.ops.batched_nms` (one call per image, tensors prepared beforehand)
and ddkit's :func:`~ddkit.ops.ensemble.nms_tensor` (all images in one call, labels offset per image).

Usage::

    python benchmarks/aggregators.py                 # 1,000 images (about a minute, mostly ensemble_boxes)
    python benchmarks/aggregators.py --images 200    # quicker
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, List, Sequence, Tuple

import numpy as np
import torch
import torchvision
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddkit.ops import ensemble as E  # noqa: E402

Image = Tuple[List[np.ndarray], List[np.ndarray], List[np.ndarray]]


def make_images(n_images: int, seed: int = 0, n_models: int = 5, n_classes: int = 80, mean_objects: int = 50,
                false_positives: float = 9.0) -> List[Image]:
    """Synthetic TTA detections: per image, per model, boxes [N, 4] (float64), scores [N], labels [N] (float)."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_classes + 1) ** 0.7
    p /= p.sum()
    images = []
    for _ in range(n_images):
        n_obj = rng.poisson(mean_objects)
        cls = rng.choice(n_classes, n_obj, p=p)
        centre = rng.uniform(0.05, 0.95, (n_obj, 2))
        size = rng.uniform(0.02, 0.35, (n_obj, 2))
        logit = np.log(1 / rng.uniform(0.25, 0.95, n_obj) - 1) * -1
        boxes_list, scores_list, labels_list = [], [], []
        for _m in range(n_models):
            det = rng.random(n_obj) < 0.9
            k = int(det.sum())
            c = centre[det] + rng.normal(0, 0.04, (k, 2)) * size[det]
            wh = size[det] * np.exp(rng.normal(0, 0.08, (k, 2)))
            b = np.concatenate([c - wh / 2, c + wh / 2], 1)
            s = 1 / (1 + np.exp(-(logit[det] + rng.normal(0, 0.3, k))))
            lab = cls[det].copy()
            confused = rng.random(k) < 0.03
            lab[confused] = rng.integers(0, n_classes, int(confused.sum()))
            n_fp = rng.poisson(false_positives)
            fc = rng.uniform(0, 1, (n_fp, 2))
            fwh = rng.uniform(0.01, 0.2, (n_fp, 2))
            b = np.concatenate([b, np.concatenate([fc - fwh / 2, fc + fwh / 2], 1)])
            s = np.concatenate([s, rng.uniform(0.01, 0.3, n_fp)])
            lab = np.concatenate([lab, rng.choice(n_classes, n_fp, p=p)])
            order = np.argsort(-s, kind="stable")          # detectors return boxes by decreasing score
            boxes_list.append(b[order])
            scores_list.append(s[order])
            labels_list.append(lab[order].astype(np.float64))
        images.append((boxes_list, scores_list, labels_list))
    return images


def timed(fn: Callable[[], Any], repeat: int = 1) -> Tuple[float, Any]:
    """Best wall-clock time of ``repeat`` runs (seconds) and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def quiet(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """ensemble_boxes prints and warns for every clipped box: silence it."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def deviation(ref: Sequence[Tuple[np.ndarray, ...]], ours: Sequence[Tuple[np.ndarray, ...]]) -> Tuple[float, int]:
    """Largest |difference| of boxes and scores over images with the same boxes in the same order, and the number
    of images whose results differ in number, labels or order (a box more than 1e-5 away)."""
    worst, mismatches = 0.0, 0
    for (rb, rs, rl), (ob, os_, ol) in zip(ref, ours):
        rb, rs, rl = (np.asarray(x, dtype=np.float64) for x in (rb, rs, rl))
        ob, os_, ol = (np.asarray(x, dtype=np.float64) for x in (ob, os_, ol))
        if rb.shape != ob.shape or rs.shape != os_.shape or not np.array_equal(rl, ol):
            mismatches += 1
            continue
        d = max(float(np.abs(rb - ob).max(initial=0.0)), float(np.abs(rs - os_).max(initial=0.0)))
        if d > 1e-5:
            mismatches += 1
        else:
            worst = max(worst, d)
    return worst, mismatches


def same(a: Sequence[Tuple[np.ndarray, ...]], b: Sequence[Tuple[np.ndarray, ...]]) -> bool:
    return all(all(np.array_equal(x, y) for x, y in zip(ra, rb)) for ra, rb in zip(a, b))


def ms(seconds: float, n: int) -> str:
    return f"{seconds / n * 1e3:.3f}"


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1000, help="number of synthetic images (default 1000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="batched runs are timed as the best of this many")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's default)")
    ap.add_argument("--methods", default="wbf,soft_nms,nmw,nms")
    args = ap.parse_args(argv)
    import ensemble_boxes as eb

    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.images
    images = make_images(n, args.seed)
    n_boxes = sum(len(s) for _, sl, _ in images for s in sl)
    cuda = torch.cuda.is_available()
    load = ", load average {:.1f}".format(os.getloadavg()[0]) if hasattr(os, "getloadavg") else ""
    print(f"{n} images, {n_boxes / n:.0f} boxes per image, 5 models, 80 classes; {os.cpu_count()} CPUs{load}; "
          f"torch {torch.__version__}, CUDA: {torch.cuda.get_device_name(0) if cuda else 'no'}. Wall-clock ms per "
          f"image: ensemble_boxes and ddkit one-image over one pass, batched runs best of {args.repeat}.\n")

    methods = {
        "wbf": (eb.weighted_boxes_fusion, E.weighted_boxes_fusion, E.weighted_boxes_fusion_batch, {}),
        "soft_nms": (eb.soft_nms, E.soft_nms, E.soft_nms_batch, {}),
        "nmw": (eb.non_maximum_weighted, E.non_maximum_weighted, E.non_maximum_weighted_batch, {}),
        "nms": (eb.nms, E.nms, E.nms_batch, {}),
    }
    rows = []
    for name in args.methods.split(","):
        ref_fn, one_fn, batch_fn, kw = methods[name]
        quiet(ref_fn, *images[0], **kw)                       # numba compilation
        quiet(batch_fn, images[:2], **kw)
        t_ref, ref = timed(lambda: [quiet(ref_fn, *im, **kw) for im in images])
        t_one, one = timed(lambda: [quiet(one_fn, *im, **kw) for im in images])
        t_bat, bat = timed(lambda: quiet(batch_fn, images, **kw), args.repeat)
        if not same(one, bat):
            raise SystemExit(f"{name}: the batched results differ from the one-image results")
        t_cuda = None
        if cuda:
            quiet(batch_fn, images[:2], device="cuda", **kw)
            t_cuda, res_cuda = timed(lambda: (quiet(batch_fn, images, device="cuda", **kw),
                                              torch.cuda.synchronize())[0], args.repeat)
            dev_cuda = deviation(bat, res_cuda)
        worst, mism = deviation(ref, bat)
        rows.append((name, t_ref, t_one, t_bat, t_cuda, worst, mism, dev_cuda if cuda else None))

    print("| method | ensemble_boxes ms/img | ddkit one-image ms/img | ddkit batched CPU ms/img | "
          "ddkit batched CUDA ms/img | speed-up one-image | speed-up batched CPU | speed-up batched CUDA | "
          "max abs deviation vs ensemble_boxes |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, t_ref, t_one, t_bat, t_cuda, worst, mism, dev_cuda in rows:
        cu = ms(t_cuda, n) if t_cuda is not None else "n/a"
        su_cu = f"{t_ref / t_cuda:.0f}x" if t_cuda is not None else "n/a"
        dev = f"{worst:.1e}" + (f" ({mism} of {n} images differ)" if mism else " (all images identical)")
        if dev_cuda is not None:
            dev += f"; CUDA vs CPU {dev_cuda[0]:.1e}, {dev_cuda[1]} differ"
        print(f"| {name} | {ms(t_ref, n)} | {ms(t_one, n)} | {ms(t_bat, n)} | {cu} | {t_ref / t_one:.1f}x | "
              f"{t_ref / t_bat:.0f}x | {su_cu} | {dev} |")

    if "nms" in args.methods.split(","):
        nms_vs_torchvision(images, args.repeat, cuda)


def nms_vs_torchvision(images: List[Image], repeat: int, cuda: bool, n_classes: int = 80) -> None:
    """Class-wise NMS at IoU 0.5 on the same tensors: torchvision.ops.batched_nms per image vs ddkit."""
    n = len(images)
    per_image = [(torch.from_numpy(np.concatenate(b)), torch.from_numpy(np.concatenate(s)),
                  torch.from_numpy(np.concatenate(lab)).long()) for b, s, lab in images]
    boxes = torch.cat([b for b, _, _ in per_image])
    scores = torch.cat([s for _, s, _ in per_image])
    groups = torch.cat([lab + i * n_classes for i, (_, _, lab) in enumerate(per_image)])
    offsets = np.cumsum([0] + [len(s) for _, s, _ in per_image])

    def tv() -> List[Tensor]:
        return [torchvision.ops.batched_nms(b, s, lab, 0.5) for b, s, lab in per_image]

    torchvision.ops.batched_nms(*per_image[0], 0.5)
    E.nms_tensor(*per_image[0], 0.5)
    t_tv, keep_tv = timed(tv, repeat)
    t_dd, keep_dd = timed(lambda: E.nms_tensor(boxes, scores, groups, 0.5), repeat)
    t_dd1, _ = timed(lambda: [E.nms_tensor(b, s, lab, 0.5) for b, s, lab in per_image], 1)
    t_drop, _ = timed(lambda: quiet(E.nms_batch, images), repeat)
    tv_set = np.sort(np.concatenate([k.numpy() + offsets[i] for i, k in enumerate(keep_tv)]))
    agree = np.array_equal(tv_set, np.sort(keep_dd.numpy()))
    print("\nClass-wise NMS (IoU 0.5) against torchvision on the same float64 tensors (no clipping):\n")
    print("| NMS implementation | ms/img | speed-up vs torchvision.ops.batched_nms |")
    print("|---|---:|---:|")
    print(f"| torchvision.ops.batched_nms, one call per image | {ms(t_tv, n)} | 1.0x |")
    print(f"| ddkit nms_tensor, one call per image | {ms(t_dd1, n)} | {t_tv / t_dd1:.2f}x |")
    print(f"| ddkit nms_tensor, all images in one call | {ms(t_dd, n)} | {t_tv / t_dd:.2f}x |")
    print(f"| ddkit nms_batch (drop-in: per-model numpy lists in, numpy out, clipping) | {ms(t_drop, n)} | "
          f"{t_tv / t_drop:.2f}x |")
    if cuda:
        bc, sc, gc = boxes.cuda(), scores.cuda(), groups.cuda()
        torchvision.ops.batched_nms(bc[:300], sc[:300], gc[:300], 0.5)
        E.nms_tensor(bc[:300], sc[:300], gc[:300], 0.5)
        pc = [(b.cuda(), s.cuda(), lab.cuda()) for b, s, lab in per_image]
        t_tvc, _ = timed(lambda: ([torchvision.ops.batched_nms(b, s, lab, 0.5) for b, s, lab in pc],
                                  torch.cuda.synchronize()), repeat)
        t_ddc, _ = timed(lambda: (E.nms_tensor(bc, sc, gc, 0.5), torch.cuda.synchronize()), repeat)
        print(f"| CUDA: torchvision.ops.batched_nms, one call per image | {ms(t_tvc, n)} | - |")
        print(f"| CUDA: ddkit nms_tensor, all images in one call | {ms(t_ddc, n)} | {t_tvc / t_ddc:.2f}x (vs CUDA "
              f"torchvision) |")
    print(f"\nSame kept boxes as torchvision: {'yes' if agree else 'NO'}")


if __name__ == "__main__":
    main()
