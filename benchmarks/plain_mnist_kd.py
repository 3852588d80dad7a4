"""The script a user would write instead of ddkit: Hinton et al.'s knowledge distillation on the 5,000 real MNIST
digits, plain PyTorch.

    python benchmarks/plain_mnist_kd.py --seed 0          # prints one JSON line

A small CNN teacher on the 1,000 labeled digits, then the same 784-800-800-10 MLP student trained alone on them and
with soft targets (0.9 x the T^2-scaled KL at T = 4 + 0.1 x the hard labels where there are labels) on the transfer
set of the labeled and the 3,000 unlabeled digits, each drawn equally often, the teacher run live on every student
batch. Same split (ddkit's ``split_indices``), models and schedules as ``configs/mnist_kd.yaml``; the loop is
``plain_mnist_dd.py``'s.
"""
import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from plain_mnist_dd import error, load_digits, mistakes, train

SPLIT = [0.2, 0.6, 0.2]  # labeled, unlabeled, test: configs/mnist_kd.yaml's data.split


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 800), nn.ReLU(), nn.Linear(800, 800), nn.ReLU(),
                         nn.Linear(800, 10))


def soft_target_loss(teacher, temperature=4.0, alpha=0.9):
    """Hinton et al.: ``(1 - alpha) * CE + alpha * T^2 * KL``, the teacher run on the student's batch; the
    cross-entropy over the digits with a label (``y >= 0``)."""
    def loss(logits, x, y):
        with torch.no_grad():
            soft = F.softmax(teacher(x) / temperature, dim=1)
        kl = F.kl_div(F.log_softmax(logits / temperature, dim=1), soft, reduction="batchmean")
        known = y >= 0
        ce = F.cross_entropy(logits[known], y[known]) if known.any() else 0.0
        return (1 - alpha) * ce + alpha * temperature ** 2 * kl
    return loss


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    x, y, (lab, unl, test) = load_digits(SPLIT, args.seed)
    teacher = train([(x[lab], y[lab])], 3000, args.seed)
    student = dict(make=mlp, shift=0, lr=0.1, wd=1e-4, warmup=100, nesterov=False, clip=5.0)
    start = time.perf_counter()
    alone = train([(x[lab], y[lab])], 3000, args.seed, **student)
    alone_s = time.perf_counter() - start
    transfer = [(x[lab], y[lab]), (x[unl], torch.full((len(unl),), -1))]  # no labels for the unlabeled digits
    kd = train(transfer, 3000, args.seed, ratio=[len(lab), len(unl)], loss=soft_target_loss(teacher), **student)
    kd_s = time.perf_counter() - start - alone_s
    errs = {name: error(m, x[test], y[test]) for name, m in (("teacher", teacher), ("alone", alone), ("kd", kd))}
    cut = (errs["alone"] - errs["kd"]) / errs["alone"]
    print(json.dumps({"seed": args.seed, "split": SPLIT, **errs, "relative_error_reduction": cut,
                      "seconds_alone": alone_s, "seconds_kd": kd_s,
                      "wrong": {k: mistakes(m, x[test], y[test]).tolist() for k, m in (("alone", alone), ("kd", kd))}}))


if __name__ == "__main__":
    main()
