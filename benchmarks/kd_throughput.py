"""KD training throughput: ddkit vs torchdistill, same teacher, student, data, optimizer and steps, in one run.

Modes (each trains a freshly initialised student for ``--steps`` SGD steps of ``--batch-size`` samples):

* ``student``: ddkit, hard labels only (the cost floor of an epoch);
* ``torch_student``: the same in a bare PyTorch loop (``DataLoader`` + ``RandomSampler``, fused SGD, cross-entropy,
  nothing else): ``--arch tiny`` makes the model cost almost nothing, so the gap to ``student`` is ddkit's own
  per-step work;
* ``ddkit_kd``: ddkit, hard labels + soft targets, teacher forward on every batch;
* ``ddkit_kd_cache``: the same with the per-sample teacher-logit cache (built once, before the timed loop;
  its build time is printed separately);
* ``torchdistill_kd``: torchdistill's DistillationBox with its KDLoss (``alpha=0.5``, same temperature), its
  default pre/post-forward processes and a plain DataLoader with RandomSampler;
* ``torchdistill_kd_fused``: the same with ``fused: true`` in its optimizer's kwargs, the fused SGD step that
  ddkit takes by default (``train.fused``): the like-for-like comparison of the two training loops.

Timing covers the training loop only (no set-up, evaluation or checkpoint writing). The modes run in turns
``--repeats`` times, in a rotated order each time; the table reports the best run of each mode (the one least
disturbed by other processes on the machine) and the median.

    python benchmarks/kd_throughput.py                       # Hinton's MNIST pair, CPU
    python benchmarks/kd_throughput.py --device cuda --steps 500 --threads 0
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import ddkit
from ddkit.engine.train import train_model

ARCHS = {
    "mlp": ({"name": "mlp", "hidden": [1200, 1200], "dropout": 0.5, "input_dropout": 0.2},
            {"name": "mlp", "hidden": [800, 800]}),
    "lenet": ({"name": "lenet", "channels": [32, 64, 128], "hidden": 256}, {"name": "lenet", "channels": [16, 32]}),
    "tiny": ({"name": "mlp", "hidden": [8]}, {"name": "mlp", "hidden": [8]}),
}


class _Pairs(torch.utils.data.Dataset):
    """ddkit items as (image, int label) pairs for torchdistill's default collate."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        image, target = self.ds[i]
        return image, target["label"]


def run_ddkit(task, info, data, teacher_path, student_cfg, args, mode: str, run_dir: Path) -> tuple[float, float]:
    torch.manual_seed(0)
    student = task.build_model(student_cfg, info)
    losses = [{"name": "hard_label"}]
    teacher = None
    if mode != "student":
        losses.append({"name": "soft_target", "temperature": args.temperature})
        teacher = teacher_path
    cfg = {"iterations": args.steps, "batch_size": args.batch_size, "lr": args.lr, "momentum": 0.9,
           "weight_decay": 1e-4, "log_every": 0, "teacher_cache": mode == "ddkit_kd_cache",
           "teacher_cache_dir": str(run_dir.parent / "cache"), "num_workers": args.workers}
    t0 = time.perf_counter()
    res = train_model(task, student, data, cfg, run_dir, teacher=teacher, losses=losses, device=args.device,
                      progress=False)
    setup = time.perf_counter() - t0 - res["train_time_s"]
    return args.steps * args.batch_size / res["train_time_s"], setup


def run_torch_student(student_cfg, task, info, data, args) -> float:
    torch.manual_seed(0)
    device = torch.device(args.device)
    student = task.build_model(student_cfg, info).to(device)
    optimizer = torch.optim.SGD(student.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4, fused=True)
    pairs = _Pairs(data)
    loader = torch.utils.data.DataLoader(pairs, sampler=torch.utils.data.RandomSampler(pairs),
                                         batch_size=args.batch_size, num_workers=args.workers, drop_last=True)
    batches, t0 = iter(loader), time.perf_counter()
    for _ in range(args.steps):
        try:
            images, labels = next(batches)
        except StopIteration:
            batches = iter(loader)
            images, labels = next(batches)
        loss = torch.nn.functional.cross_entropy(student(images.to(device)), labels.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.steps * args.batch_size / (time.perf_counter() - t0)


def run_torchdistill(teacher, student_cfg, task, info, data, args, fused: bool) -> float:
    from torchdistill.core.distillation import DistillationBox

    torch.manual_seed(0)
    student = task.build_model(student_cfg, info)
    device = torch.device(args.device)
    teacher = teacher.to(device)
    student = student.to(device)
    train_config = {
        "num_epochs": 1,
        "train_data_loader": {
            "dataset_id": "train",
            "sampler": {"class_or_func": torch.utils.data.RandomSampler, "kwargs": {}},
            "kwargs": {"batch_size": args.batch_size, "num_workers": args.workers, "drop_last": True},
        },
        "teacher": {"forward_proc": "forward_batch_only", "sequential": [], "requires_grad": False},
        "student": {"forward_proc": "forward_batch_only", "adaptations": None, "sequential": [],
                    "requires_grad": True, "frozen_modules": []},
        "optimizer": {"key": "SGD", "kwargs": {"lr": args.lr, "momentum": 0.9, "weight_decay": 1e-4,
                                               **({"fused": True} if fused else {})}},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {
            "criterion": {"key": "KDLoss", "kwargs": {
                "student_module_path": ".", "student_module_io": "output", "teacher_module_path": ".",
                "teacher_module_io": "output", "temperature": args.temperature, "alpha": 0.5,
                "reduction": "batchmean"}},
            "weight": 1.0}}}},
    }
    box = DistillationBox(teacher, student, {"train": _Pairs(data)}, train_config, device, None, False, 1)
    box.pre_epoch_process(epoch=0)
    done = 0
    t0 = None
    while done < args.steps:
        for sample_batch, targets, supp_dict in box.train_data_loader:  # torchdistill's own training loop shape
            if t0 is None:
                t0 = time.perf_counter()
            sample_batch, targets = sample_batch.to(device), targets.to(device)
            loss = box.forward_process(sample_batch, targets, supp_dict=supp_dict)
            box.post_forward_process(loss)
            done += 1
            if done == args.steps:
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.steps * args.batch_size / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=sorted(ARCHS), default="mlp")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: leave torch's default)")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import torchdistill
    except ImportError:
        torchdistill = None
        print("torchdistill is not installed (pip install torchdistill): its column is skipped", file=sys.stderr)

    task = ddkit.build("tasks", "classification")
    data = ddkit.build("datasets", {"name": "mnist5k", "split": "train"})
    info = data.info
    teacher_cfg, student_cfg = ARCHS[args.arch]
    tmp = Path(tempfile.mkdtemp(prefix="kd_bench_"))
    torch.manual_seed(0)
    teacher = task.build_model(teacher_cfg, info)
    from ddkit.engine.checkpoint import save_model

    save_model(teacher, tmp / "teacher.pt")
    teacher.eval()
    modes = ["student", "torch_student", "ddkit_kd", "ddkit_kd_cache"] + (["torchdistill_kd", "torchdistill_kd_fused"]
                                                         if torchdistill else [])
    rates: dict[str, list[float]] = {m: [] for m in modes}
    cache_build = None
    for r in range(args.repeats):
        for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
            if mode == "torch_student":
                rates[mode].append(run_torch_student(student_cfg, task, info, data, args))
            elif mode.startswith("torchdistill"):
                rates[mode].append(run_torchdistill(teacher, student_cfg, task, info, data, args,
                                                    fused=mode.endswith("fused")))
            else:
                rate, setup = run_ddkit(task, info, data, tmp / "teacher.pt", student_cfg, args, mode,
                                        tmp / f"{mode}_{r}")
                rates[mode].append(rate)
                if mode == "ddkit_kd_cache" and r == 0:
                    cache_build = setup
            print(f"  repeat {r + 1}/{args.repeats} {mode:<16} {rates[mode][-1]:9.1f} samples/s", file=sys.stderr)
    med = {m: statistics.median(v) for m, v in rates.items()}
    best = {m: max(v) for m, v in rates.items()}
    epoch = len(data)
    print(f"\nKD throughput: {args.arch} teacher {teacher_cfg} -> student {student_cfg}")
    print(f"data: mnist5k train ({epoch} images), batch {args.batch_size}, {args.steps} steps, device {args.device}, "
          f"threads {torch.get_num_threads()}, torch {torch.__version__}"
          + (f", torchdistill {torchdistill.__version__}" if torchdistill else ""))
    print(f"{'mode':<22}{'best samples/s':>15}{'median':>10}{'epoch s':>9}{'vs student':>12}")
    for m in modes:
        print(f"{m:<22}{best[m]:15.1f}{med[m]:10.1f}{epoch / best[m]:9.2f}{best['student'] / best[m]:11.2f}x")
    step_ms = {m: 1e3 * args.batch_size / best[m] for m in modes}
    print(f"ddkit's own work per step (student - torch_student, best): "
          f"{step_ms['student'] - step_ms['torch_student']:.3f} ms of {step_ms['student']:.3f} ms")
    for peer in ("torchdistill_kd", "torchdistill_kd_fused") if torchdistill else ():
        for ours in ("ddkit_kd", "ddkit_kd_cache"):
            print(f"{ours} / {peer} speed: best {best[ours] / best[peer]:.3f}, median {med[ours] / med[peer]:.3f}")
    print(f"KD epoch with cache / student-only epoch: best {best['student'] / best['ddkit_kd_cache']:.3f}, median "
          f"{med['student'] / med['ddkit_kd_cache']:.3f} (target <= 1.15); the cache pass ran once, "
          f"{cache_build:.2f}s including model and data set-up")
    return 0


if __name__ == "__main__":
    sys.exit(main())
