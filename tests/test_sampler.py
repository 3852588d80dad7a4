"""The mixed-ratio batch sampler: ratio, determinism, coverage, DDP shares and resume."""
from __future__ import annotations

from collections import Counter

import pytest

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
