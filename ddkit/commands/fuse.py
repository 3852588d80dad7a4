"""``ddkit fuse PRED.json [PRED.json ...] --images COCO.json --method wbf -o OUT.json``: fuse detectors' results.

With ``--gt [GT.json]`` every input and the fused result are scored with pycocotools: boxes, and keypoints (OKS,
a second table and ``keypoint_metrics`` in ``OUT.eval.json``) for the results that carry keypoints when the ground
truth's categories define them.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

from ddkit.errors import ConfigError, DataError

log = logging.getLogger("ddkit.fuse")

HELP = "fuse COCO results files of several detectors with any box aggregator (wbf, nms, soft_nms, ...)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("predictions", nargs="+", metavar="PRED.json",
                        help="COCO results files ([{image_id, category_id, bbox, score}, ...], keypoints too), one "
                             "per model; an aggregator that keeps or fuses keypoints (nms, soft_nms, box_voting, "
                             "keypoint_fusion) carries them to OUT, the others warn that they are dropped")
    parser.add_argument("--images", required=True, metavar="COCO.json",
                        help="COCO file whose 'images' give each image's height and width")
    parser.add_argument("--method", default="wbf", help="a registered box aggregator (default: wbf)")
    parser.add_argument("--iou-thr", type=float, default=None, help="the aggregator's iou_thr")
    parser.add_argument("--weights", type=float, nargs="+", default=None,
                        help="one weight per input file (the aggregator's 'weights' parameter)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="any other aggregator parameter, e.g. --param conf_type=max (repeatable)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.json", help="the fused COCO results file")
    parser.add_argument("--gt", nargs="?", const="", default=None, metavar="GT.json",
                        help="evaluate every input and the fused result with pycocotools against this ground "
                             "truth (default when given without a path: the --images file); the metrics go to "
                             "OUT.eval.json. Boxes always; keypoints (OKS, a second table) too when the GT's "
                             "categories define keypoints and the results carry them, with COCO's sigmas for "
                             "COCO's 17 names, else a default with a warning")
    parser.add_argument("--box-tolerance", type=float, default=None,
                        help="pixels a box may stick out of its image before it is reported; boxes within it are "
                             "clamped to the image (default 0.01: the float32 rounding of boxes that detectron2 or "
                             "mmdet clipped; 0: every box outside is an error)")


def _method_cfg(args: argparse.Namespace) -> dict:
    from omegaconf import OmegaConf

    cfg: dict = {"name": args.method}
    bad = [p for p in args.param if "=" not in p]
    if bad:
        raise ConfigError(f"--param {bad[0]!r} is not of the form key=value (e.g. conf_type=max)")
    if args.param:
        try:
            cfg.update(OmegaConf.to_container(OmegaConf.from_dotlist(list(args.param))))
        except Exception as err:  # omegaconf grammar errors
            raise ConfigError(f"--param: {err}") from None
    if args.iou_thr is not None:
        cfg["iou_thr"] = args.iou_thr
    if args.weights is not None:
        if len(args.weights) != len(args.predictions):
            raise ConfigError(f"--weights has {len(args.weights)} values for {len(args.predictions)} input files")
        cfg["weights"] = list(args.weights)
    weights = cfg.get("weights")
    if isinstance(weights, (list, tuple)) and len(weights) != len(args.predictions):
        raise ConfigError(f"--param weights={list(weights)} has {len(weights)} values for {len(args.predictions)} "
                          f"input files (one weight per file)")
    return cfg


def _box_tolerance(args: argparse.Namespace) -> float:
    from ddkit.engine.fuse import DEFAULT_BOX_TOLERANCE

    tol = DEFAULT_BOX_TOLERANCE if args.box_tolerance is None else args.box_tolerance
    if not math.isfinite(tol) or tol < 0:
        raise ConfigError(f"--box-tolerance must be a number of pixels >= 0, got {args.box_tolerance}")
    return tol


def _inputs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """``(path, what it is)`` of every file fuse reads."""
    named = [(str(p), f"input file {i + 1} (PRED.json)") for i, p in enumerate(args.predictions)]
    named.append((str(args.images), "the --images file"))
    if args.gt:
        named.append((str(args.gt), "the --gt file"))
    return named


def check_output(args: argparse.Namespace) -> None:
    """Refuse an ``-o`` (or its ``OUT.eval.json``) that is a folder or one of the inputs, before anything is read."""
    from ddkit.io import same_file

    out = Path(args.output)
    if out.is_dir():
        raise ConfigError(f"-o {out} is a folder; give a file name, e.g. -o {out / 'fused.json'}")
    eval_path = out.with_name(out.stem + ".eval.json")
    for path, what in _inputs(args):
        if same_file(out, Path(path)):
            raise ConfigError(f"-o {out} is {what}; choose another output")
        if args.gt is not None and same_file(eval_path, Path(path)):
            raise ConfigError(f"-o {out} with --gt writes {eval_path}, which is {what}; choose another output")


def _load_gt(args: argparse.Namespace, coco: dict) -> dict | None:
    """The ``--gt`` ground truth (None without ``--gt``), checked against the ``--images`` file before anything is
    fused or written."""
    from ddkit.engine.fuse import load_coco_file

    if args.gt is None:
        return None
    gt = coco if args.gt == "" else load_coco_file(args.gt)
    if "annotations" not in gt:
        raise ConfigError(f"{args.gt or args.images}: has no 'annotations'; pass the ground truth with --gt GT.json")
    gt_ids = {img.get("id") for img in gt.get("images", []) if isinstance(img, dict)}
    missing = [img["id"] for img in coco["images"] if img["id"] not in gt_ids]
    if missing:
        raise DataError(f"{args.gt}: the ground truth lacks {len(missing)} image(s) of {args.images}, e.g. "
                        f"id {missing[0]}")
    return gt


def gt_category_warning(gt_source: str, gt: dict, preds: list[list[dict]]) -> str | None:
    """One line when results carry category ids that the ground truth's ``categories`` do not list: pycocotools
    scores only the GT's categories, so those detections are left out of every AP (None when all are listed)."""
    listed = {c.get("id") for c in gt.get("categories", []) if isinstance(c, dict)}
    counts: dict[int, int] = {}
    for det in (d for p in preds for d in p):
        if det["category_id"] not in listed:
            counts[det["category_id"]] = counts.get(det["category_id"], 0) + 1
    if not counts:
        return None
    ids = sorted(counts)
    shown = ", ".join(map(str, ids[:10])) + (", ..." if len(ids) > 10 else "")
    return (f"{gt_source}: the results' category ids {shown} ({len(ids)} ids, {sum(counts.values())} detections) "
            f"are not in this "
            f"ground truth's categories, so the AP leaves them out; give a GT file that lists every class the "
            f"detectors predict, or drop those classes from the results")


# The keypoint table's columns (pycocotools' keypoint summary: 20 detections, no small-area range).
KEYPOINT_TABLE_KEYS = ("AP", "AP50", "AP75", "APm", "APl", "AR@20")


def gt_keypoint_sigmas(gt: dict, where: str) -> list[float] | None:
    """OKS sigmas of the ground truth's keypoints: those of the first category (by id) defining ``keypoints`` (COCO
    ``categories[].keypoints``), resolved from their names as datasets do (COCO's 17 by name, else a default with
    a warning); None when no category defines keypoints."""
    from ddkit.engine.coco_file import keypoint_category
    from ddkit.engine.keypoint_meta import resolve_keypoint_meta

    category = keypoint_category(gt.get("categories", []))
    if category is None:
        return None
    names = category["keypoints"]
    k = len(names)
    # scoring needs no flip pairs: the identity keeps resolve_keypoint_meta from warning about them
    return resolve_keypoint_meta(k, where, names=[str(n) for n in names], flip_indices=list(range(k))).sigmas


def _keypoint_rows(gt: dict, where: str, ids: list, named: dict[str, list]) -> tuple[dict, list[float] | None]:
    """``{name: keypoint metrics}`` of every results list in ``named`` that carries keypoints (with the GT's K),
    and the sigmas used; nothing when the ground truth defines no keypoints."""
    from ddkit.engine.coco_eval import coco_evaluate

    sigmas = gt_keypoint_sigmas(gt, where)
    rows: dict[str, dict] = {}
    if sigmas is None:
        return rows, None
    for name, results in named.items():
        kps = next((e["keypoints"] for e in results if "keypoints" in e), None)
        if kps is None:
            continue
        if len(kps) != 3 * len(sigmas):
            log.warning("%s: its results have %d keypoints and %s's categories %d: no keypoint metrics for it",
                        name, len(kps) // 3, where, len(sigmas))
            continue
        rows[name] = coco_evaluate(gt, results, iou_type="keypoints", image_ids=ids, sigmas=sigmas)
    return rows, sigmas


def _evaluate(args: argparse.Namespace, gt: dict, coco: dict, preds: list, fused: list, method: dict) -> None:
    """Every input's and the fused metrics against ``gt``: a table (and a keypoint table when the ground truth
    defines keypoints and the results carry them), and ``OUT.eval.json``."""
    from ddkit.engine.coco_eval import coco_evaluate, format_metrics_table
    from ddkit.io import atomic_write_json

    ids = [img["id"] for img in coco["images"]]
    fused_name = f"fused ({method['name']})"  # the method run (--param name=)
    named = {**{str(path): p for path, p in zip(args.predictions, preds)}, fused_name: fused}
    rows = {name: coco_evaluate(gt, p, image_ids=ids) for name, p in named.items()}
    print(format_metrics_table(rows))
    report = {"method": method, "image_ids": ids, "metrics": rows}
    kp_rows, sigmas = _keypoint_rows(gt, str(args.gt or args.images), ids, named)
    if kp_rows:
        print("keypoints (OKS):")
        print(format_metrics_table(kp_rows, keys=KEYPOINT_TABLE_KEYS))
        if fused_name not in kp_rows:
            why = "the fused result is empty" if not fused else f"{method['name']} drops the inputs' keypoints"
            print(f"no fused keypoint row: {why} (boxes only)")
        report.update(keypoint_metrics=kp_rows, keypoint_sigmas=sigmas)
    out = Path(args.output)
    eval_path = out.with_name(out.stem + ".eval.json")
    atomic_write_json(eval_path, report)
    print(f"metrics -> {eval_path}")


def run(args: argparse.Namespace) -> int:
    from ddkit.engine.fuse import coverage_warnings, fuse_results, load_coco_file, load_results_file
    from ddkit.io import atomic_write_json

    method = _method_cfg(args)
    check_output(args)
    tol = _box_tolerance(args)
    coco = load_coco_file(args.images)
    preds = [load_results_file(p) for p in args.predictions]
    fused = fuse_results(preds, coco, method, sources=list(args.predictions), box_tolerance=tol,
                         images_source=str(args.images))
    gt = _load_gt(args, coco)
    if len(preds) > 1:
        for line in coverage_warnings(preds, list(args.predictions), len(coco["images"]), args.images):
            log.warning(line)
    cat_line = None if gt is None else gt_category_warning(str(args.gt or args.images), gt, preds)
    if cat_line:
        log.warning(cat_line)
    out = Path(args.output)
    atomic_write_json(out, fused, indent=None)
    n_in = sum(len(p) for p in preds)
    print(f"fused {n_in} detections from {len(preds)} files into {len(fused)} with {json.dumps(method)} -> {out}")
    if gt is not None:
        _evaluate(args, gt, coco, preds, fused, method)
    return 0
