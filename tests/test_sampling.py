"""TraceSampler: every-Nth and tail decisions against exact numbers."""

from __future__ import annotations

import random
import statistics

from otel_ml.regions.sampling import EVERY, SLOW, TraceSampler


def test_the_median_is_that_of_the_last_window_steps():
    rng = random.Random(3)
    sampler = TraceSampler(every=0, factor=2.0, window=7)
    seen: list[float] = []
    assert sampler.median() is None
    for step in range(60):
        duration = rng.choice([0.01, 0.02, rng.uniform(0.005, 0.05)])  # ties included
        sampler.decide(step, duration)
        seen.append(duration)
        assert sampler.median() == statistics.median(seen[-7:])


def test_a_step_slower_than_factor_times_the_recent_median_is_traced():
    sampler = TraceSampler(every=0, factor=2.0, window=10, min_steps=4)
    assert [sampler.decide(i, 1.0) for i in range(4)] == [None] * 4
    assert sampler.decide(4, 2.0) is None  # exactly 2x is not slower than 2x
    assert sampler.decide(5, 2.01) == SLOW


def test_no_tail_decision_before_min_steps():
    sampler = TraceSampler(every=0, factor=2.0, min_steps=3)
    assert [sampler.decide(0, 1.0), sampler.decide(1, 1.0), sampler.decide(2, 50.0)] == [None] * 3


def test_every_nth_step_by_number_and_slow_wins_when_both_apply():
    sampler = TraceSampler(every=5, factor=2.0, window=10, min_steps=2)
    reasons = [sampler.decide(i, 1.0) for i in range(11)]
    assert [i for i, r in enumerate(reasons) if r == EVERY] == [0, 5, 10]
    assert sampler.decide(15, 9.0) == SLOW
