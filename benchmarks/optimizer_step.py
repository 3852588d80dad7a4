"""Optimizer step time: ddkit's step (``train.fused: true``, the default) against torch's default step, in one run.

For the students of ``configs/mnist_kd.yaml`` and ``configs/mnist_dd.yaml``, each with its recipe's optimizer and
with AdamW, the table gives the median time of one ``optimizer.step()``, each after a forward and
backward pass on 64 real digits (so the gradients and the caches are as in training; only the step is timed), for:

* ``ddkit``: the optimizer that ddkit's training builds from the recipe's ``train`` block (torch's fused kernel,
  momentum buffers started at zeros);
* ``torch default``: ``torch.optim.SGD`` / ``AdamW`` with the same hyper-parameters and no ``fused`` / ``foreach``
  argument, which is what ddkit took before ``train.fused`` (``train.fused=false``), and what a plain script gets;
* ``torch foreach``: the same with ``foreach=True`` (torch's multi-tensor step, its default on CUDA).

The steps of the three run in turns, ``--repeats`` rounds of ``--steps`` steps, so a disturbance on the machine hits
all of them alike.

    python benchmarks/optimizer_step.py                  # one thread, CPU
    python benchmarks/optimizer_step.py --threads 0 --device cuda
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import Tensor

import ddkit
from ddkit.engine.train import _optimizer
from ddkit.engine.train_config import TrainConfig, parse_train_config

REPO = Path(__file__).resolve().parents[1]
RECIPES = ("configs/mnist_kd.yaml", "configs/mnist_dd.yaml")  # their students: model and train block
ADAMW = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05}


def cases() -> list[tuple[str, dict, str, dict]]:
    """``(recipe, student model, optimizer name, train block)``: each recipe's student with its own optimizer, and
    with AdamW."""
    out = []
    for recipe in RECIPES:
        student = OmegaConf.to_container(OmegaConf.load(REPO / recipe).student)
        out.append((recipe, student["model"], student["train"]["optimizer"], student["train"]))
        out.append((recipe, student["model"], "adamw", {**student["train"], **ADAMW}))
    return out


def torch_optimizer(cfg: TrainConfig, params: list[torch.Tensor], foreach: bool | None) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay, foreach=foreach)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                             foreach=foreach)


def step_times(optimizers: dict[str, tuple[torch.optim.Optimizer, torch.nn.Module]], batch: tuple[Tensor, Tensor],
               steps: int, repeats: int, sync) -> dict[str, list[float]]:
    """Seconds per ``step()`` of each optimizer: ``repeats`` rounds, each optimizer ``steps`` steps a round, each
    step after a forward and backward pass of its model on ``batch`` (``images [B, ...]``, ``labels [B]``)."""
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    names = list(optimizers)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            opt, model = optimizers[name]
            for _ in range(steps):
                opt.zero_grad(set_to_none=False)
                torch.nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
                sync()
                start = time.perf_counter()
                opt.step()
                sync()
                times[name].append(time.perf_counter() - start)
    return times


def measure(model_cfg: dict, train_block: dict, batch: tuple[Tensor, Tensor], args, task, info) -> dict[str, float]:
    """Median milliseconds per step of ddkit's optimizer and torch's two defaults, on copies of one model."""
    cfg = parse_train_config({**train_block, "fused": True})
    optimizers = {}
    for name in ("ddkit", "torch default", "torch foreach"):
        torch.manual_seed(0)
        model = task.build_model(model_cfg, info).to(args.device).train()
        params = list(model.parameters())
        optimizers[name] = (_optimizer(cfg, params, 1000)[0] if name == "ddkit"
                            else torch_optimizer(cfg, params, None if name == "torch default" else True), model)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    step_times(optimizers, batch, 10, 1, sync)  # warm-up: state allocated, kernels loaded
    times = step_times(optimizers, batch, args.steps, args.repeats, sync)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60, help="steps per optimizer per round")
    p.add_argument("--repeats", type=int, default=3, help="rounds")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: leave torch's default)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    task = ddkit.build("tasks", "classification")
    data = ddkit.build("datasets", {"name": "mnist5k", "split": "train"})
    info = data.info
    samples = [data[i] for i in range(64)]
    batch = (torch.stack([x for x, _ in samples]).to(args.device),
             torch.tensor([t["label"] for _, t in samples], device=args.device))
    print(f"optimizer step, median ms of {args.steps * args.repeats} steps; device {args.device}, "
          f"threads {torch.get_num_threads()}, torch {torch.__version__}")
    print("| student of | model | optimizer | parameters | ddkit ms | torch default ms | torch foreach ms "
          "| default / ddkit |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for recipe, model_cfg, opt_name, train_block in cases():
        size = sum(p.numel() for p in task.build_model(model_cfg, info).parameters())
        ms = measure(model_cfg, train_block, batch, args, task, info)
        print(f"| {recipe} | {model_cfg['name']} | {opt_name} | {size / 1e6:.2f} M | {ms['ddkit']:.3f} "
              f"| {ms['torch default']:.3f} | {ms['torch foreach']:.3f} | {ms['torch default'] / ms['ddkit']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
