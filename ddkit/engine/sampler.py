"""The mixed-ratio batch sampler: every minibatch mixes labeled and pseudo-labeled samples at a fixed ratio.

Data distillation (Radosavovic et al. 2018) trains the student on labeled + pseudo-labeled data with each minibatch
holding both at a fixed expected ratio (6:4 in the paper). :class:`MixedRatioSampler` does that for any number of
sources laid out back to back (a :class:`ddkit.engine.data.ConcatDataset`):

* **Ratio.** The slots of the endless stream of batches are assigned to sources by exact integer rounding of the
  cumulative quota (source 0 against the rest, then source 1 against the rest of the rest, ...), so every batch
  holds ``round(batch_size * p)`` samples of a source give or take one, and over any run of batches the ratio is
  exact to within one sample. Every rank uses the same assignment, so under DDP each rank keeps the ratio.
* **Order.** Each source is an endless sequence of epochs, each a fresh permutation drawn from
  ``(seed, source, epoch)``; rank ``r`` of ``W`` takes positions ``r, r + W, ...`` of it, so ranks see disjoint
  samples within an epoch.
* **State.** The batch of step ``s`` is a pure function of ``(seed, sizes, ratio, batch_size, rank, W, s)``: the
  state is the step alone, so resuming (``load_state_dict``) continues exactly where a run stopped.
"""
from __future__ import annotations

from fractions import Fraction
from typing import Any, Iterator, Sequence

import torch

from ddkit.errors import ConfigError


def _fraction(x: float) -> Fraction:
    return Fraction(x).limit_denominator(1_000_000)


class MixedRatioSampler(torch.utils.data.Sampler[list[int]]):
    """An endless batch sampler over sources of ``sizes`` (indices offset as in a concatenated dataset).

    Args:
        sizes: number of items of each source (labeled first).
        batch_size: samples per batch on this rank.
        ratio: relative weight of each source (default: 6:4 for two sources, equal otherwise); sources of size
            0 are dropped and the others renormalised.
        seed: the permutation seed.
        rank, world_size: this process's share under DDP.
    """

    def __init__(self, sizes: Sequence[int], batch_size: int, ratio: Sequence[float] | None = None, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if not sizes or any(n < 0 for n in sizes) or sum(sizes) == 0:
            raise ConfigError(f"the sampler needs at least one non-empty source, got sizes {list(sizes)}")
        if ratio is None:
            ratio = [6, 4] if len(sizes) == 2 else [1] * len(sizes)
        ratio = list(ratio)
        if len(ratio) < len(sizes):
            raise ConfigError(f"ratio {ratio} has fewer entries than the {len(sizes)} training sources")
        ratio = ratio[:len(sizes)]
        if any(r < 0 for r in ratio):
            raise ConfigError(f"ratio entries must be >= 0, got {ratio}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.sizes = [int(n) for n in sizes]
        self.ratio = [float(r) for r in ratio]
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.offsets = [sum(self.sizes[:j]) for j in range(len(self.sizes))]
        self.active = [j for j, (n, r) in enumerate(zip(self.sizes, self.ratio)) if n > 0 and r > 0]
        if not self.active:
            raise ConfigError(f"no source has both items and a positive ratio (sizes {self.sizes}, ratio {self.ratio})")
        # conditional probability of source active[k] given that the slot is not one of active[:k]
        total = sum(_fraction(self.ratio[j]) for j in self.active)
        probs = [_fraction(self.ratio[j]) / total for j in self.active]
        self._cond: list[Fraction] = []
        rest = Fraction(1)
        for p in probs:
            self._cond.append(p / rest if rest > 0 else Fraction(1))
            rest -= p
        self.step = 0
        self._perm_cache: dict[tuple[int, int], list[int]] = {}

    # ---------------------------------------------------------------------------------------------- arithmetic
    @staticmethod
    def _quota(h: int, p: Fraction) -> int:
        """``round(h * p)`` (halves up) in exact integer arithmetic: slots of the first ``h`` that go to ``p``."""
        return (2 * h * p.numerator + p.denominator) // (2 * p.denominator)

    def _perm(self, source: int, epoch: int) -> list[int]:
        key = (source, epoch)
        perm = self._perm_cache.get(key)
        if perm is None:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + source * 7_919 + epoch) % (2 ** 63))
            perm = torch.randperm(self.sizes[source], generator=g).tolist()
            if len(self._perm_cache) > 4 * len(self.sizes):
                self._perm_cache.clear()
            self._perm_cache[key] = perm
        return perm

    def _items(self, source: int, first: int, stop: int) -> list[int]:
        """Global indices of this rank's draws ``first .. stop - 1`` from ``source``."""
        n, offset, stride = self.sizes[source], self.offsets[source], self.world_size
        return [offset + self._perm(source, q // n)[q % n]
                for q in range(first * stride + self.rank, stop * stride + self.rank, stride)]

    def batch(self, step: int) -> list[int]:
        """The global indices of the batch of ``step`` (slots in order, sources interleaved)."""
        start = step * self.batch_size
        out = [0] * self.batch_size
        # for every h of the batch at once: of the first h slots, those not yet given to a source (rest) and those
        # that source j draws (drawn), by the quota of source j against the sources after it
        rest = list(range(start, start + self.batch_size + 1))
        for k, j in enumerate(self.active):
            drawn = rest if k == len(self.active) - 1 else [self._quota(h, self._cond[k]) for h in rest]
            rest = [h - d for h, d in zip(rest, drawn)]
            slots = [t for t in range(self.batch_size) if drawn[t + 1] > drawn[t]]
            for t, index in zip(slots, self._items(j, drawn[0], drawn[-1])):
                out[t] = index
        return out

    def source_index(self, index: int) -> int:
        """The source a global index belongs to."""
        for j in range(len(self.sizes) - 1, -1, -1):
            if index >= self.offsets[j]:
                return j
        raise IndexError(index)

    # --------------------------------------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[list[int]]:
        step = self.step
        while True:
            yield self.batch(step)
            step += 1

    def __len__(self) -> int:  # endless; DataLoader only needs it for len(loader)
        return 2 ** 62

    def set_step(self, step: int) -> None:
        self.step = int(step)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.seed, "sizes": list(self.sizes), "ratio": list(self.ratio),
                "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("world_size", "seed", "sizes", "ratio", "batch_size"):  # the process count first: it sets the
            if key not in state:                                              # per-process batch_size
                continue
            theirs = list(state[key]) if isinstance(state[key], (list, tuple)) else state[key]
            mine = getattr(self, key)
            if theirs != mine and key == "world_size":
                raise ConfigError(f"cannot resume: the checkpoint was written by {theirs} process(es), this run has "
                                  f"{mine}; resume with the same process count (torchrun --nproc_per_node={theirs}"
                                  f"{'' if theirs > 1 else ', or no torchrun'})")
            if theirs != mine:
                raise ConfigError(f"cannot resume: the checkpoint's sampler had {key}={theirs}, this run has "
                                  f"{mine} (the data or the batch settings changed)")
        self.step = int(state["step"])
