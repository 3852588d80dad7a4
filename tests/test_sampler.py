"""The mixed-ratio batch sampler: ratio, determinism, coverage, DDP shares and resume."""
from __future__ import annotations

import math
import random
from collections import Counter
from fractions import Fraction

import pytest
import torch

from ddkit.engine.sampler import MixedRatioSampler
from ddkit.errors import ConfigError


def _sources(s: MixedRatioSampler, batch: list[int]) -> Counter:
    return Counter(s.source_index(i) for i in batch)


def test_every_batch_keeps_the_ratio_when_it_divides_the_batch():
    s = MixedRatioSampler([100, 50], batch_size=10, ratio=[6, 4], seed=0)
    for step in range(40):
        b = s.batch(step)
        assert len(b) == 10
        assert _sources(s, b) == Counter({0: 6, 1: 4}), step


@pytest.mark.parametrize("batch_size,ratio", [(3, [6, 4]), (7, [6, 4]), (5, [1, 2]), (4, [3, 1, 1])])
def test_long_run_ratio_is_exact_and_each_batch_within_one(batch_size, ratio):
    sizes = [37, 23, 11][:len(ratio)]
    s = MixedRatioSampler(sizes, batch_size=batch_size, ratio=ratio, seed=1)
    total = Counter()
    steps = 200
    for step in range(steps):
        c = _sources(s, s.batch(step))
        for j, r in enumerate(ratio):
            assert abs(c[j] - batch_size * r / sum(ratio)) < 1.0 + 1e-9, (step, c)
        total.update(c)
    for j, r in enumerate(ratio):
        assert abs(total[j] - steps * batch_size * r / sum(ratio)) <= 1.0


def test_each_source_is_covered_once_per_epoch():
    s = MixedRatioSampler([12, 8], batch_size=5, ratio=[6, 4], seed=3)
    drawn = [i for step in range(4) for i in s.batch(step)]  # 12 labeled + 8 pseudo = one epoch of each
    assert sorted(i for i in drawn if i < 12) == list(range(12))
    assert sorted(i for i in drawn if i >= 12) == list(range(12, 20))


def test_deterministic_for_a_seed_and_different_across_seeds():
    a = [MixedRatioSampler([50, 30], 8, seed=0).batch(k) for k in range(10)]
    b = [MixedRatioSampler([50, 30], 8, seed=0).batch(k) for k in range(10)]
    c = [MixedRatioSampler([50, 30], 8, seed=1).batch(k) for k in range(10)]
    assert a == b
    assert a != c


def test_ddp_ranks_draw_disjoint_samples_and_keep_the_ratio():
    ranks = [MixedRatioSampler([40, 20], 5, ratio=[6, 4], seed=0, rank=r, world_size=2) for r in range(2)]
    seen = [set(), set()]
    for step in range(6):  # 6 steps x 3 labeled x 2 ranks = 36 < 40: still inside the first epoch
        for r, s in enumerate(ranks):
            b = s.batch(step)
            assert _sources(s, b) == Counter({0: 3, 1: 2})
            seen[r].update(i for i in b if i < 40)
    assert not seen[0] & seen[1]


def test_resume_continues_exactly():
    full = MixedRatioSampler([30, 20], 6, seed=2)
    it = iter(full)
    reference = [next(it) for _ in range(12)]
    first = MixedRatioSampler([30, 20], 6, seed=2)
    it = iter(first)
    head = [next(it) for _ in range(5)]
    first.set_step(5)
    state = first.state_dict()
    second = MixedRatioSampler([30, 20], 6, seed=2)
    second.load_state_dict(state)
    it = iter(second)
    tail = [next(it) for _ in range(7)]
    assert head + tail == reference


def test_resume_refuses_changed_data():
    s = MixedRatioSampler([30, 20], 6, seed=2)
    state = s.state_dict()
    other = MixedRatioSampler([31, 20], 6, seed=2)
    with pytest.raises(ConfigError, match="sizes"):
        other.load_state_dict(state)


def test_single_source_and_empty_pseudo_source():
    s = MixedRatioSampler([7], 4)
    assert sorted(s.batch(0) + s.batch(1)[:3]) == list(range(7))
    t = MixedRatioSampler([10, 0], 4, ratio=[6, 4])
    assert all(i < 10 for k in range(5) for i in t.batch(k))


def test_bad_arguments_are_reported():
    with pytest.raises(ConfigError, match="batch_size"):
        MixedRatioSampler([10], 0)
    with pytest.raises(ConfigError, match="non-empty"):
        MixedRatioSampler([0, 0], 4)
    with pytest.raises(ConfigError, match="ratio"):
        MixedRatioSampler([10, 10], 4, ratio=[1])


def _reference_consumed(s: MixedRatioSampler, slots: int) -> list[int]:
    """Samples of each source among the first ``slots`` slots, from the ratio alone (the module docstring's rule):
    source 0 takes ``round(slots * p0)`` (halves up), source 1 that of the rest against the rest of the ratio, ...;
    the last source with items and a share takes what is left."""
    active = [j for j, (n, r) in enumerate(zip(s.sizes, s.ratio)) if n > 0 and r > 0]
    share = {j: Fraction(s.ratio[j]).limit_denominator(1_000_000) for j in active}
    out, rest, left = [0] * len(s.sizes), slots, sum(share.values())
    for j in active[:-1]:
        out[j] = math.floor(rest * share[j] / left + Fraction(1, 2))
        rest, left = rest - out[j], left - share[j]
    out[active[-1]] = rest
    return out


def _reference_batch(s: MixedRatioSampler, step: int) -> list[int]:
    """Slot by slot: the source whose count grows at the slot, its next draw for this rank, from the permutation of
    ``(seed, source, epoch)``."""
    out = []
    for slot in range(step * s.batch_size, (step + 1) * s.batch_size):
        before, after = _reference_consumed(s, slot), _reference_consumed(s, slot + 1)
        j = next(j for j in range(len(s.sizes)) if after[j] > before[j])
        q, n = before[j] * s.world_size + s.rank, s.sizes[j]
        g = torch.Generator().manual_seed((s.seed * 1_000_003 + j * 7_919 + q // n) % (2 ** 63))
        out.append(s.offsets[j] + torch.randperm(n, generator=g).tolist()[q % n])
    return out


def test_batches_equal_the_slot_by_slot_definition():
    rng = random.Random(0)
    for _ in range(150):
        k = rng.randint(1, 4)
        sizes = [rng.choice([0, 1, 3, 7, 50, 400]) for _ in range(k)]
        ratio = [rng.choice([0, 0.3, 1, 2.5, 4, 6]) for _ in range(k)]
        sizes[0], ratio[0] = max(sizes[0], 1), max(ratio[0], 1)  # at least one source with items and a share
        world = rng.choice([1, 1, 2, 3])
        s = MixedRatioSampler(sizes, rng.randint(1, 70), ratio, seed=rng.randint(0, 99), rank=rng.randrange(world),
                              world_size=world)
        for step in (0, 1, 17, rng.randint(0, 10 ** 6)):  # epoch boundaries fall inside batches
            assert s.batch(step) == _reference_batch(s, step), (sizes, ratio, world, s.rank, s.batch_size, step)


def test_resume_with_another_process_count_names_it():
    # pass 22 (torchrun): a 2-process checkpoint resumed by one process blamed "the data or the batch settings",
    # because each process's batch_size is the global batch split over the processes
    two = MixedRatioSampler([100, 50], batch_size=32, ratio=[6, 4], seed=0, rank=0, world_size=2)
    one = MixedRatioSampler([100, 50], batch_size=64, ratio=[6, 4], seed=0)
    with pytest.raises(ConfigError, match=r"written by 2 process\(es\), this run has 1; resume with the same process "
                                          r"count \(torchrun --nproc_per_node=2\)"):
        one.load_state_dict(two.state_dict())
    with pytest.raises(ConfigError, match="batch_size=32, this run has 64"):  # same count: the batch changed
        one.load_state_dict({**two.state_dict(), "world_size": 1})
