"""YOLO through ddkit (the ddkit-ultralytics plugin) against Ultralytics' own trainer, side by side in one run.

1. Training samples/s on the same model (an untrained ``--cfg``), ``--imgsz``, ``--batch`` and data (coco8's 8
   images, repeated ``--repeat`` times, in one YOLO folder both read; on the CPU both with Ultralytics' thread
   count; ``--rounds`` alternating runs, median): ddkit's ``train_model`` (its trainer, the
   plugin's letterboxing and Ultralytics' loss) and ``ultralytics.YOLO(cfg).train`` (plots, AMP check, validation
   and mosaic off; offline). Each side reports the median of per-iteration rates after ``--warmup`` iterations,
   data loading included. Ultralytics also applies its colour/affine augmentation and steps the optimiser once per
   64 images (nominal batch accumulation); ddkit flips only and steps every batch.
2. Labelling images/s with 5 views (identity, hflip, scale x0.5 / x0.75 / x1.25 of the model's imgsz) through
   ``ddkit``'s labelling engine, and the share of the labelling time spent outside the model (reading, transforms,
   inverse maps, WBF, packing; from the engine's ``timing.json``).

Untrained networks: the speed is meaningful, not the labels. Usage::

    YOLO_OFFLINE=1 python benchmarks/yolo_throughput.py                       # CPU, yolov8n, 320 px, batch 8
    YOLO_OFFLINE=1 python benchmarks/yolo_throughput.py --device cuda --imgsz 640 --batch 32 --repeat 16
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")  # no fonts, weights or version checks from the network

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco8"


def make_data(root: Path, repeat: int) -> Path:
    """coco8's train + val images (and labels), each copied ``repeat`` times, as ``root/images/train``; returns the
    Ultralytics data yaml (train = val = that folder)."""
    import yaml

    for sub in ("images", "labels"):
        (root / sub / "train").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        for img in sorted((DATA / "images" / split).glob("*.jpg")):
            label = DATA / "labels" / split / (img.stem + ".txt")
            for r in range(repeat):
                shutil.copy(img, root / "images" / "train" / f"{img.stem}_{r}.jpg")
                if label.is_file():
                    shutil.copy(label, root / "labels" / "train" / f"{img.stem}_{r}.txt")
    meta = yaml.safe_load((DATA / "coco8.yaml").read_text())
    out = root / "data.yaml"
    out.write_text(yaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/train",
                                   "names": meta["names"]}))
    return out


def ddkit_train(root: Path, args: argparse.Namespace, work: Path) -> float:
    """Median samples/s of ddkit's trainer over iterations after the warm-up."""
    import ddkit
    from ddkit.engine.train import train_model

    dataset = ddkit.build("datasets", {"name": "yolo", "root": str(root), "split": "train"})
    task = ddkit.build("tasks", "detection")
    model = task.build_model({"name": "yolo", "cfg": args.cfg, "imgsz": args.imgsz}, dataset.info)
    cfg = {"iterations": args.warmup + args.iters, "batch_size": args.batch, "optimizer": "sgd", "lr": 0.01,
           "hflip": 0.5, "log_every": 1, "amp": False, "num_workers": args.workers}
    train_model(task, model, dataset, cfg, work / "ddkit", device=args.device, progress=False)
    rows = [json.loads(line) for line in (work / "ddkit" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in rows if r.get("samples_per_s")][args.warmup:]
    return statistics.median(rates)


def ultralytics_train(data_yaml: Path, n_images: int, args: argparse.Namespace, work: Path) -> float:
    """Median samples/s of Ultralytics' trainer (time between consecutive batch ends, data loading included)."""
    from ultralytics import YOLO

    model = YOLO(args.cfg)
    ends: list[list[float]] = []

    def on_epoch_start(trainer) -> None:
        ends.append([])

    def on_batch_end(trainer) -> None:
        ends[-1].append(time.perf_counter())

    model.add_callback("on_train_epoch_start", on_epoch_start)
    model.add_callback("on_train_batch_end", on_batch_end)
    per_epoch = max(1, n_images // args.batch)
    epochs = max(2, -(-(args.warmup + args.iters) // per_epoch))
    model.train(data=str(data_yaml), epochs=epochs, imgsz=args.imgsz, batch=args.batch, device=args.device,
                workers=args.workers, plots=False, amp=False, val=False, mosaic=0.0, close_mosaic=0, save=False,
                project=str(work / "ultralytics"), name="run", exist_ok=True, verbose=False, cache=False)
    gaps = [b - a for epoch in ends for a, b in zip(epoch, epoch[1:])]  # within an epoch: no epoch overhead
    return args.batch / statistics.median(gaps[args.warmup:] or gaps)


def ddkit_label(root: Path, args: argparse.Namespace, work: Path) -> tuple[float, float, int]:
    """``(images/s, share of time outside the model, views)`` of labelling with 5 views."""
    import ddkit
    from ddkit.engine.label import label_dataset

    dataset = ddkit.build("datasets", {"name": "yolo", "root": str(root), "split": "train"})
    task = ddkit.build("tasks", "detection")
    model = task.build_model({"name": "yolo", "cfg": args.cfg, "imgsz": args.imgsz}, dataset.info)
    model.to(args.device)
    views = [{"name": "identity"}, {"name": "hflip"}, {"name": "scale", "factors": [0.5, 0.75, 1.25]}]
    cfg = {"transforms": views, "aggregator": {"name": "wbf"}, "selector": {"name": "count_match"},
           "batch_size": args.batch, "max_images": args.label_images}
    label_dataset(task, model, dataset.info, dataset, dataset, {**cfg, "max_images": 2}, work / "label_warmup",
                  device=args.device)
    t0 = time.perf_counter()
    label_dataset(task, model, dataset.info, dataset, dataset, cfg, work / "label", device=args.device)
    wall = time.perf_counter() - t0
    timing = json.loads((work / "label" / "timing.json").read_text())
    n = min(args.label_images, len(dataset))
    return n / wall, 1.0 - timing["model"] / wall, 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg", default="yolov8n.yaml")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=4, help="copies of coco8's 8 images")
    parser.add_argument("--iters", type=int, default=8, help="measured iterations per trainer")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--label-images", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads on the CPU (0: what Ultralytics' trainer sets, cores - 1)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating ddkit / Ultralytics runs (median)")
    args = parser.parse_args()
    import torch
    from ultralytics.utils import NUM_THREADS

    with tempfile.TemporaryDirectory(prefix="yolo_bench_") as tmp:
        work = Path(tmp)
        os.environ.setdefault("YOLO_CONFIG_DIR", str(work / "ultralytics_cfg"))
        data_yaml = make_data(work / "data", args.repeat)
        n_images = 8 * args.repeat
        ours, theirs = [], []
        for r in range(args.rounds):  # alternate, so that a busy moment of a shared machine hits both sides
            if not args.device.startswith("cuda"):  # Ultralytics' trainer sets its own thread count on the CPU
                torch.set_num_threads(args.threads or NUM_THREADS)
            ours.append(ddkit_train(work / "data", args, work / f"r{r}"))
            theirs.append(ultralytics_train(data_yaml, n_images, args, work / f"r{r}"))
        ours, theirs = statistics.median(ours), statistics.median(theirs)
        ips, outside, views = ddkit_label(work / "data", args, work)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{args.cfg}, imgsz {args.imgsz}, batch {args.batch}, {n_images} images, {device}\n")
    print("| measurement | ddkit | Ultralytics | ddkit / Ultralytics |")
    print("|---|---|---|---|")
    print(f"| training samples/s | {ours:.2f} | {theirs:.2f} | {ours / theirs:.2f}x |")
    print(f"| labelling images/s ({views} views: identity, hflip, x0.5 / x0.75 / x1.25 of imgsz) | {ips:.2f} | | |")
    print(f"| labelling time outside the model | {100 * outside:.1f} % | | |")


if __name__ == "__main__":
    main()
