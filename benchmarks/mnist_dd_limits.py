"""What limits the one-round data-distillation student on MNIST: wrong pseudo-labels, or which digits get one?

    python benchmarks/mnist_dd_limits.py --seeds 0 1 2 3 4      # the README's table (about 12 min per seed)

On the split, teacher and schedule of ``benchmarks/plain_mnist_dd.py`` (same seed), students trained 6:4 on the
labeled digits and

* ``pseudo K``: the teacher's pseudo-labels, the most confident ``K`` of each class's expected count (the script's
  student at ``K = 0.9``);
* ``true labels, same digits``: the digits ``pseudo 0.9`` selected, with their true labels;
* ``true labels, random digits``: as many unlabeled digits drawn at random, with their true labels;

and the fully labeled upper bound. Prints one JSON line per seed, then the gap each student closes per seed and
its mean +- sd.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from plain_mnist_dd import error, load_digits, pseudo_label, train  # benchmarks/ is first on the path

KEEPS = (0.9, 0.8, 0.7)


def students(seed: int) -> dict[str, float]:
    """Test error (%) of the teacher, each student and the upper bound at ``seed``."""
    x, y, (lab, unl, test) = load_digits([0.08, 0.72, 0.2], seed)
    labeled, xu, yu = (x[lab], y[lab]), x[unl], y[unl]
    teacher = train([labeled], 1500, seed)

    def student(part: tuple[torch.Tensor, torch.Tensor]) -> float:
        return error(train([labeled, part], 3000, seed, ratio=[6, 4]), x[test], y[test])

    errors = {"teacher": error(teacher, x[test], y[test])}
    prior = torch.bincount(y[lab], minlength=10) / len(lab)
    for k in KEEPS:
        keep, pseudo = pseudo_label(teacher, xu, k, prior)
        errors[f"pseudo {k}"] = student((xu[keep], pseudo[keep]))
        if k == KEEPS[0]:  # the script's selection: the same digits, and as many drawn at random, true labels
            drawn = torch.randperm(len(unl), generator=torch.Generator().manual_seed(seed))[: int(keep.sum())]
            errors["true labels, same digits"] = student((xu[keep], yu[keep]))
            errors["true labels, random digits"] = student((xu[drawn], yu[drawn]))
    errors["fully labeled"] = error(train([labeled, (xu, yu)], 3000, seed), x[test], y[test])
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        rows.append(students(seed))
        print(json.dumps({"seed": seed, **rows[-1]}), flush=True)
    print("\n| student | " + " | ".join(f"seed {s}" for s in args.seeds) + " | gap closed % mean +- sd |")
    print("|---|" + "---:|" * (len(args.seeds) + 1))
    for name in rows[0]:
        if name in ("teacher", "fully labeled"):
            continue
        gaps = [100 * (r["teacher"] - r[name]) / (r["teacher"] - r["fully labeled"]) for r in rows]
        sd = f" +- {statistics.stdev(gaps):.0f}" if len(gaps) > 1 else ""
        cells = " | ".join(f"{r[name]:.1f} ({g:.0f})" for r, g in zip(rows, gaps))
        print(f"| {name} | {cells} | {statistics.mean(gaps):.0f}{sd} |")


if __name__ == "__main__":
    main()
