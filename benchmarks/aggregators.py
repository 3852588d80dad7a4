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

``--sweep`` times the same methods over a density sweep instead (crowded scenes, where one class holds hundreds to
thousands of boxes): 300 boxes per view over 80 classes (spread), 300 with 70 % of the objects in 3 classes, and
one class at 100, 300, 1,000 and 3,000 boxes per view; 5 views. Objects get smaller as they get more numerous (their
boxes cover about 40 % of the image, as cells, trees in aerial tiles or cars in a car park do), each view detects
90 % of them with jitter and adds 10 % false positives. ``ensemble_boxes`` runs one image at a time, ddkit's
``*_batch`` functions all images of a density in one call, and class-wise NMS is anchored on
``torchvision.ops.batched_nms`` (one call per image); every row states ms/image and the ratios of the same run.

Usage::

    python benchmarks/aggregators.py                 # 1,000 images (about a minute, mostly ensemble_boxes)
    python benchmarks/aggregators.py --images 200    # quicker
    python benchmarks/aggregators.py --sweep         # density sweep (about 10 minutes on 2 cores)
    python benchmarks/aggregators.py --sweep --quick # fewer images per density (a few minutes)
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
    ap.add_argument("--sweep", action="store_true", help="time the density sweep (crowded scenes) instead")
    ap.add_argument("--quick", action="store_true", help="with --sweep: a fifth of the images per density")
    ap.add_argument("--densities", default="", help="with --sweep: comma-separated row names (default: all)")
    args = ap.parse_args(argv)
    import ensemble_boxes as eb

    if args.sweep:
        if args.threads:
            torch.set_num_threads(args.threads)
        sweep(args)
        return

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


# --------------------------------------------------------------------------------------------- density sweep
#: (row name, boxes per view, class distribution, images per run; --quick divides the images by 5)
DENSITIES: List[Tuple[str, int, str, int]] = [
    ("spread", 300, "spread", 100), ("3 classes", 300, "dominant", 100), ("1 class x 100", 100, "one", 100),
    ("1 class x 300", 300, "one", 50), ("1 class x 1000", 1000, "one", 20), ("1 class x 3000", 3000, "one", 10),
]


def class_probs(kind: str, n_classes: int = 80) -> np.ndarray:
    """``spread``: a skewed distribution over 80 classes; ``dominant``: 70 % in 3 classes; ``one``: one class."""
    if kind == "one":
        return np.array([1.0])
    p = 1.0 / np.arange(1, n_classes + 1) ** 0.7
    if kind == "dominant":
        p = np.concatenate([np.full(3, 0.7 / 3), 0.3 * p[3:] / p[3:].sum()])
    return p / p.sum()


def make_scenes(n_images: int, per_view: int, kind: str, seed: int = 0, n_models: int = 5,
                coverage: float = 0.4) -> List[Image]:
    """Synthetic TTA detections of ``per_view`` boxes per view (90 % of the objects, plus 10 % false positives).

    Object sides are about ``sqrt(coverage / objects)`` (lognormal spread), so crowded scenes have small objects
    covering ``coverage`` of the image in total, as dense real scenes do."""
    rng = np.random.default_rng(seed)
    p = class_probs(kind)
    images = []
    for _ in range(n_images):
        n_obj = per_view
        side = min(0.3, float(np.sqrt(coverage / n_obj)))
        cls = rng.choice(len(p), n_obj, p=p)
        centre = rng.uniform(0.0, 1.0, (n_obj, 2))
        size = side * np.exp(rng.normal(0, 0.35, (n_obj, 2)))
        logit = -np.log(1 / rng.uniform(0.25, 0.95, n_obj) - 1)
        bl, sl, ll = [], [], []
        for _m in range(n_models):
            det = rng.random(n_obj) < 0.9
            k = int(det.sum())
            c = centre[det] + rng.normal(0, 0.04, (k, 2)) * size[det]
            wh = size[det] * np.exp(rng.normal(0, 0.08, (k, 2)))
            s = 1 / (1 + np.exp(-(logit[det] + rng.normal(0, 0.3, k))))
            n_fp = int(rng.poisson(0.1 * per_view))
            fc = rng.uniform(0, 1, (n_fp, 2))
            fwh = side * np.exp(rng.normal(0, 0.5, (n_fp, 2)))
            b = np.concatenate([np.concatenate([c - wh / 2, c + wh / 2], 1),
                                np.concatenate([fc - fwh / 2, fc + fwh / 2], 1)])
            s = np.concatenate([s, rng.uniform(0.01, 0.3, n_fp)])
            lab = np.concatenate([cls[det], rng.choice(len(p), n_fp, p=p)])
            order = np.argsort(-s, kind="stable")
            bl.append(b[order])
            sl.append(s[order])
            ll.append(lab[order].astype(np.float64))
        images.append((bl, sl, ll))
    return images


def _tv_nms(images: List[Image], repeat: int, device: str) -> Tuple[float, List[Tensor]]:
    """torchvision.ops.batched_nms (IoU 0.5), one call per image on tensors prepared beforehand."""
    per_image = [(torch.from_numpy(np.concatenate(b)).to(device), torch.from_numpy(np.concatenate(s)).to(device),
                  torch.from_numpy(np.concatenate(lab)).long().to(device)) for b, s, lab in images]
    torchvision.ops.batched_nms(*per_image[0], 0.5)

    def run() -> List[Tensor]:
        out = [torchvision.ops.batched_nms(b, s, lab, 0.5) for b, s, lab in per_image]
        if device == "cuda":
            torch.cuda.synchronize()
        return out
    return timed(run, repeat)


def _sweep_row(name: str, images: List[Image], methods: Sequence[str], repeat: int, cuda: bool
               ) -> List[str]:
    import ensemble_boxes as eb

    fns = {"wbf": (eb.weighted_boxes_fusion, E.weighted_boxes_fusion_batch),
           "soft_nms": (eb.soft_nms, E.soft_nms_batch),
           "nmw": (eb.non_maximum_weighted, E.non_maximum_weighted_batch),
           "nms": (eb.nms, E.nms_batch)}
    n = len(images)
    cells, notes = [], []
    for m in methods:
        ref_fn, batch_fn = fns[m]
        quiet(ref_fn, *images[0])
        quiet(batch_fn, images[:1])
        t_ref, ref = timed(lambda: [quiet(ref_fn, *im) for im in images])
        t_bat, bat = timed(lambda: quiet(batch_fn, images), repeat)
        worst, mism = deviation(ref, bat)
        if mism:
            notes.append(f"{m}: {mism} of {n} images differ from ensemble_boxes")
        cell = f"{ms(t_ref, n)} / {ms(t_bat, n)} = **{t_ref / t_bat:.1f}x**"
        if cuda:
            quiet(batch_fn, images[:1], device="cuda")
            t_cu, res_cu = timed(lambda: (quiet(batch_fn, images, device="cuda"), torch.cuda.synchronize())[0],
                                 repeat)
            cell += f"; CUDA {ms(t_cu, n)} = {t_ref / t_cu:.1f}x"
            if deviation(bat, res_cu)[1]:
                notes.append(f"{m}: CUDA differs from the CPU on {deviation(bat, res_cu)[1]} images")
        if m == "nms":
            t_tv, _ = _tv_nms(images, repeat, "cpu")
            cell += f"; torchvision {ms(t_tv, n)} ({t_tv / t_bat:.1f}x)"
        cells.append(cell)
    n_boxes = sum(len(s) for _, sl, _ in images for s in sl) / n
    return [f"| {name} ({n_boxes:.0f} boxes/img, {n} img) | " + " | ".join(cells) + " |"] + notes


def sweep(args: argparse.Namespace) -> None:
    """Print the density sweep: per method ``ensemble_boxes ms/img / ddkit batched ms/img = ratio``."""
    methods = args.methods.split(",")
    cuda = torch.cuda.is_available()
    load = ", load average {:.1f}".format(os.getloadavg()[0]) if hasattr(os, "getloadavg") else ""
    print(f"Density sweep, 5 views; {os.cpu_count()} CPUs{load}; torch {torch.__version__}, CUDA: "
          f"{torch.cuda.get_device_name(0) if cuda else 'no'}. Each cell: ensemble_boxes one image at a time "
          f"(one pass) / ddkit *_batch all images in one call (best of {args.repeat}) in ms per image = ratio; "
          f"NMS also against torchvision.ops.batched_nms per image (ratio torchvision / ddkit).\n")
    print("| density | " + " | ".join(methods) + " |")
    print("|---|" + "---:|" * len(methods))
    wanted = [d.strip() for d in args.densities.split(",") if d.strip()]
    notes: List[str] = []
    for name, per_view, kind, n_img in DENSITIES:
        if wanted and name not in wanted:
            continue
        n_img = max(2, n_img // 5) if args.quick else n_img
        row = _sweep_row(name, make_scenes(n_img, per_view, kind, args.seed), methods, args.repeat, cuda)
        print(row[0], flush=True)
        notes += row[1:]
    print("\n" + ("\n".join(notes) if notes else "Every image's result equals ensemble_boxes' (same boxes, labels "
                                                     "and order; within 1e-5)."))


if __name__ == "__main__":
    main()
