"""The per-rank series budget holds (what ``bench_scale --budget`` prints, and the README's table).

A rank with the default settings, and one with ``trace_modules(depth=2)`` on a 32-layer model,
each in its own process as ``benchmarks/_budget.py`` runs them; the scrape must stay within the
budget the README states for 1,000 ranks on one Prometheus. A new always-on series family (or
label value) shows up here before it shows up in a user's Prometheus bill.
"""

from __future__ import annotations

import pytest

from benchmarks._budget import measure

pytestmark = pytest.mark.integration

#: The README's budget: series of one scrape of one rank.
DEFAULT_SERIES = 140
DEPTH2_32_LAYER_SERIES = 500


@pytest.mark.parametrize(("layers", "budget"), [(0, DEFAULT_SERIES), (32, DEPTH2_32_LAYER_SERIES)])
def test_one_rank_stays_within_its_series_budget(layers, budget):
    got = measure(layers)
    assert got["series"] <= budget, f"{got['series']} series, budget {budget}"
    assert got["series"] >= budget * 0.8  # the config still exports what the budget counts
    assert got["encode_ms"] < 50  # gross regressions only; the 10 ms target is bench_scale's
