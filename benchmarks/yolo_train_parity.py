"""YOLO trained in ddkit against the same YOLO trained by Ultralytics' own trainer: box AP on held-out images.

A user who trains a teacher in ddkit (the ddkit-ultralytics plugin) rather than with ``yolo train`` wants to know
what that costs. Both sides train the same untrained network (``--cfg``, ``--imgsz``) from the same seed on the same
YOLO folder and see the same number of images, each with its own defaults:

* ddkit: ``train_model`` with the YOLO KD benchmark's train block (``configs/synthetic_det_kd_yolo.yaml``: AdamW,
  LR 0.002 with warmup and steps, horizontal flips, an optimizer step per batch), ``--iters`` iterations of
  ``--batch`` images; ``--ema`` adds an EMA of the weights (``train.ema_decay``);
* Ultralytics: ``YOLO(cfg).train`` for as many epochs as that is images, at its defaults (mosaic, HSV, scale and
  translate augmentation, ``optimizer: auto``, an optimizer step per 64 images, linear LR decay, EMA), offline, with
  plots and per-epoch validation off.

Both final models are scored by the same code, ``ddkit eval``'s (pycocotools box AP; the Ultralytics file through
``--trust-checkpoint``'s loader), on the held-out images. SYNTHETIC data: ddkit's generated shapes (600 images of
128 px, 1-3 shapes of 3 classes; the split of the YOLO KD benchmark: 300 to train, 300 to test), written once as a
YOLO folder. Usage::

    python benchmarks/yolo_train_parity.py                   # yolov8n at 128 px, 600 iterations of 8, CPU
    python benchmarks/yolo_train_parity.py --seeds 0 1 2 --ultralytics nbs=8 mosaic=0 hsv_h=0 hsv_s=0 hsv_v=0 \
        translate=0 scale=0 optimizer=AdamW lr0=0.002   # Ultralytics set up like ddkit's recipe
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import yaml

os.environ.setdefault("YOLO_OFFLINE", "1")  # no fonts, weights or version checks from the network

TRAIN = {"optimizer": "adamw", "lr": 0.002, "weight_decay": 5.0e-4, "warmup": 50, "steps": [0.67, 0.89],
         "hflip": 0.5, "clip_grad_norm": 10.0, "log_every": 100}


def write_shapes(root: Path) -> Path:
    """The YOLO KD benchmark's shapes and split as ``root/images/{train,val}`` + labels; returns the data yaml."""
    from torchvision.utils import save_image

    import ddkit
    from ddkit.engine.data import split_dataset

    shapes = ddkit.build("datasets", {"name": "synthetic_shapes", "num_images": 600, "image_size": 128,
                                      "num_classes": 3, "max_objects": 3})
    split = split_dataset(shapes, labeled=0.5, unlabeled=0.0, test=0.5, seed=0)
    index = {c["id"]: i for i, c in enumerate(shapes.info.categories)}
    for part, subset in (("train", split.labeled), ("val", split.test)):
        (root / "images" / part).mkdir(parents=True)
        (root / "labels" / part).mkdir(parents=True)
        for i in subset.indices:
            image, target = shapes[i]
            h, w = image.shape[-2:]
            save_image(image, root / "images" / part / f"{i:04d}.png")
            rows = [f"{index[int(c)]} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} {(x1 - x0) / w:.6f} "
                    f"{(y1 - y0) / h:.6f}" for (x0, y0, x1, y1), c in zip(target["boxes"].tolist(), target["labels"])]
            (root / "labels" / part / f"{i:04d}.txt").write_text("".join(r + "\n" for r in rows))
    data_yaml = root / "data.yaml"
    data_yaml.write_text(yaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/val",
                                         "names": {i: c["name"] for i, c in enumerate(shapes.info.categories)}}))
    return data_yaml


def box_ap(path: Path, root: Path, trust: bool) -> dict[str, float]:
    """pycocotools box AP of a model file on the held-out images, as ``ddkit eval`` scores it (batch 8)."""
    import ddkit
    from ddkit.engine.checkpoint import load_model

    test = ddkit.build("datasets", {"name": "yolo", "root": str(root), "split": "val"})
    task, model, _ = load_model(path, trust_foreign=trust)
    return task.evaluate(model, test, 8)


def ddkit_side(root: Path, args: argparse.Namespace, seed: int, work: Path) -> tuple[dict[str, float], float]:
    import torch

    import ddkit
    from ddkit.engine.train import train_model

    train = ddkit.build("datasets", {"name": "yolo", "root": str(root), "split": "train"})
    task = ddkit.build("tasks", "detection")
    torch.manual_seed(seed)  # the initial weights (train_model seeds the rest)
    model = task.build_model({"name": "yolo", "cfg": args.cfg, "imgsz": args.imgsz}, train.info)
    cfg = {**TRAIN, "iterations": args.iters, "batch_size": args.batch}
    if args.ema:
        cfg.update(ema_decay=0.99, ema_tau=50)
    t0 = time.perf_counter()
    result = train_model(task, model, train, cfg, work / f"ddkit{seed}", seed=seed, device="cpu", progress=False)
    return box_ap(Path(result["model_path"]), root, False), time.perf_counter() - t0


def ultralytics_side(data_yaml: Path, args: argparse.Namespace, seed: int,
                     work: Path) -> tuple[dict[str, float], float, int]:
    from ultralytics import YOLO

    epochs = math.ceil(args.iters * args.batch / 300)
    t0 = time.perf_counter()
    YOLO(args.cfg).train(data=str(data_yaml), epochs=epochs, imgsz=args.imgsz, batch=args.batch, device="cpu",
                         workers=0, seed=seed, deterministic=True, plots=False, val=False, amp=False,
                         project=str(work / "ultralytics"), name=f"seed{seed}", exist_ok=True, verbose=False,
                         **args.ultralytics)
    seconds = time.perf_counter() - t0
    return box_ap(work / "ultralytics" / f"seed{seed}" / "weights" / "last.pt", data_yaml.parent, True), seconds, epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg", default="yolov8n.yaml")
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=600, help="ddkit's iterations; Ultralytics: as many images")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--ema", action="store_true", help="ddkit also keeps an EMA of the weights (0.99, tau 50)")
    parser.add_argument("--ultralytics", nargs="*", default=[], metavar="KEY=VALUE",
                        help="Ultralytics train arguments instead of its defaults, e.g. nbs=8 mosaic=0")
    args = parser.parse_args()
    args.ultralytics = {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in args.ultralytics)}
    import torch

    rows = []
    with tempfile.TemporaryDirectory(prefix="yolo_parity_") as tmp:
        work = Path(tmp)
        os.environ.setdefault("YOLO_CONFIG_DIR", str(work / "ultralytics_cfg"))
        data_yaml = write_shapes(work / "shapes")
        for seed in args.seeds:
            ours, ours_s = ddkit_side(data_yaml.parent, args, seed, work)
            theirs, theirs_s, epochs = ultralytics_side(data_yaml, args, seed, work)
            rows.append((seed, ours, ours_s, theirs, theirs_s))
    changed = ", ".join(f"{k}={v}" for k, v in args.ultralytics.items()) or "its defaults"
    print(f"\n{args.cfg}, imgsz {args.imgsz}, batch {args.batch}: ddkit {args.iters} iterations"
          f"{' (+ EMA)' if args.ema else ''}, Ultralytics {epochs} epochs of 300 images ({changed}); CPU, "
          f"{torch.get_num_threads()} threads; SYNTHETIC shapes, 300 test images\n")
    print("| seed | ddkit AP | AP50 | AP75 | time s | Ultralytics AP | AP50 | AP75 | time s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    cells = lambda m, seconds: " | ".join([*(f"{100 * m[k]:.1f}" for k in ("AP", "AP50", "AP75")), f"{seconds:.0f}"])
    for seed, ours, ours_s, theirs, theirs_s in rows:
        print(f"| {seed} | {cells(ours, ours_s)} | {cells(theirs, theirs_s)} |")
    if len(rows) > 1:
        mean = lambda side: statistics.mean(100 * r[side]["AP"] for r in rows)
        print(f"\nmean AP: ddkit {mean(1):.1f}, Ultralytics {mean(3):.1f}")


if __name__ == "__main__":
    main()
