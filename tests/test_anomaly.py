"""Anomaly detectors on synthetic series, episodes, stalls (fake clock), stop_on, events, callbacks."""

from __future__ import annotations

import logging
import math
import random
import statistics
import types
import urllib.request

import pytest
from opentelemetry.sdk.metrics import MeterProvider

import otel_ml
from otel_ml import _cbuild, detectors
from otel_ml.anomaly import TYPES, AnomalyConfig, AnomalyError, AnomalyMonitor
from otel_ml.collection import Collection, PullReader
from otel_ml.config import Config
from otel_ml.detectors import DriftDetector
from tests.support.clock import FakeClock
from tests.support.metrics import parse_exposition, points, value

#: The Python detectors, and their C twins where built: every detector test runs on each.
PYTHON = types.SimpleNamespace(
    RollingStats=detectors.PyRollingStats,
    SpikeDetector=detectors.PySpikeDetector,
    PlateauDetector=detectors.PyPlateauDetector,
    ExplosionDetector=detectors.PyExplosionDetector,
)
IMPLEMENTATIONS = [pytest.param(PYTHON, id="python")]
if detectors.DETECTORS_C is not None:
    IMPLEMENTATIONS.append(pytest.param(detectors.DETECTORS_C, id="c"))
each_implementation = pytest.mark.parametrize("impl", IMPLEMENTATIONS)
needs_c = pytest.mark.skipif(detectors.DETECTORS_C is None, reason="otel_ml._cdetectors is not in use")


@each_implementation
def test_rolling_stats_match_the_window(impl):
    stats = impl.RollingStats(3)
    for v in (10.0, 1.0, 2.0, 3.0):
        stats.add(v)
    assert stats.mean == 2.0 and stats.std == pytest.approx(1.0) and len(stats) == 3


@each_implementation
def test_rolling_mean_and_std_match_the_window_recomputed_from_scratch(impl):
    stats, window = impl.RollingStats(50), []
    assert math.isnan(stats.mean) and stats.std == 0.0
    for i in range(500):
        value = 1.0 + (i * 7919 % 101) / 10.0
        assert stats.add_and_mean(value) == pytest.approx(statistics.fmean([*window, value][-50:]), rel=1e-9)
        window = [*window, value][-50:]
        assert stats.mean == pytest.approx(statistics.fmean(window), rel=1e-9) and len(stats) == len(window)
        if len(window) > 1:
            assert stats.std == pytest.approx(statistics.stdev(window), rel=1e-9)
    constant = impl.RollingStats(5)
    for _ in range(10):
        constant.add(0.1)  # the running sums' rounding leaves a variance a hair off zero, either side
    assert constant.mean == pytest.approx(0.1) and 0.0 <= constant.std < 1e-6
    assert not constant.check_and_add(0.1, 6.0, 2, 0.5)  # a flat window flags no equal value


@each_implementation
def test_spike_decisions_match_a_from_scratch_reference_on_a_stream_with_spikes(impl):
    spike, window, got, want = impl.SpikeDetector(window=30, zscore=4.0, min_rise=0.5, warmup=10), [], [], []
    for i in range(3000):
        value = 1.0 + (i * 7919 % 97) / 100.0 + (40.0 if i % 211 == 0 else 0.0)
        anomalous = False
        if len(window) >= 10:
            mean, std = statistics.fmean(window), statistics.stdev(window)
            anomalous = value > mean + 4.0 * std and value - mean > 0.5 * abs(mean)
        if not anomalous:  # a spike stays out of the window
            window = [*window, value][-30:]
        want.append(anomalous)
        got.append(spike.observe(value))
    assert got == want and sum(got) >= 10


@each_implementation
def test_spike_detector_needs_warmup_and_both_a_zscore_and_a_relative_rise(impl):
    spike = impl.SpikeDetector(window=50, zscore=4.0, min_rise=0.5, warmup=10)
    noisy = [1.0 + 0.01 * (i % 5) for i in range(30)]
    assert not any(spike.observe(v) for v in noisy)
    assert not spike.observe(1.2)  # many sigmas above, but only 20% above the mean
    assert spike.observe(5.0)
    assert not spike.observe(1.01)  # back to normal: the spike did not widen the band
    assert spike.observe(5.0)
    early = impl.SpikeDetector(warmup=10)
    assert not early.observe(100.0)  # no verdict before warmup


@each_implementation
def test_spike_detector_absolute_maximum(impl):
    kl = impl.SpikeDetector(zscore=0, maximum=5.0)
    assert [kl.observe(v) for v in (0.1, 4.9, 5.1, 0.2)] == [False, False, True, False]


@each_implementation
def test_plateau_detector_uses_patience_and_tolerance(impl):
    plateau = impl.PlateauDetector(patience=5, tolerance=0.01, smoothing=1)
    improving = [plateau.observe(10.0 - i) for i in range(5)]
    flat = [plateau.observe(5.99) for _ in range(6)]
    assert improving == [False] * 5
    assert flat == [False, False, False, False, True, True]
    assert plateau.observe(4.0) is False  # an improvement ends the plateau
    assert impl.PlateauDetector(patience=0).observe(1.0) is False


@each_implementation
def test_explosion_detector_factor_and_maximum(impl):
    grad = impl.ExplosionDetector(factor=10.0, warmup=3)
    assert [grad.observe(v) for v in (1.0, 1.2, 0.8, 1.1, 50.0, 1.0)] == [False] * 4 + [True, False]
    assert impl.ExplosionDetector(factor=0, maximum=100).observe(101) is True


def _stream(seed: int, n: int) -> list[float]:
    """A noisy loss-like series with spikes, explosions, flat stretches, zeros and negatives."""
    rng = random.Random(seed)
    values, level = [], 5.0
    for i in range(n):
        level = level * 0.999 if i % 700 < 500 else level  # improving, then a plateau
        value = level + rng.gauss(0.0, 0.05 * level)
        if rng.random() < 0.01:
            value *= rng.choice((3.0, 30.0, 1e6))
        if i % 997 == 0:
            value = rng.choice((0.0, -value, 1e-300))
        values.append(value)
    return values


@needs_c
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_c_detectors_give_the_python_verdicts_and_statistics_on_long_streams(seed):
    c = detectors.DETECTORS_C
    rng = random.Random(seed)
    window, warmup = rng.choice((1, 2, 7, 100)), rng.choice((0, 1, 5, 20))
    zscore, factor = rng.choice((0.0, 3.0, 6.0)), rng.choice((0.0, 2.0, 10.0))
    pairs = [
        (PYTHON.SpikeDetector(window, zscore, 0.5, warmup), c.SpikeDetector(window, zscore, 0.5, warmup)),
        (PYTHON.SpikeDetector(window, zscore, maximum=40.0), c.SpikeDetector(window, zscore, maximum=40.0)),
        (
            PYTHON.ExplosionDetector(factor, 0.0, window, warmup),
            c.ExplosionDetector(factor, 0.0, window, warmup),
        ),
        (PYTHON.PlateauDetector(50, 0.01, window), c.PlateauDetector(50, 0.01, window)),
    ]
    stats = (PYTHON.RollingStats(window), c.RollingStats(window))
    verdicts = 0
    for x in _stream(seed, 5000):
        for python, twin in pairs:
            want = python.observe(x)
            assert twin.observe(x) is want
            verdicts += want
        assert stats[1].add_and_mean(x) == pytest.approx(stats[0].add_and_mean(x), rel=1e-12)
        assert stats[1].std == pytest.approx(stats[0].std, rel=1e-9, abs=1e-12)
        assert len(stats[1]) == len(stats[0])
    plateau_python, plateau_c = pairs[3]
    assert (plateau_c.since, plateau_c.best) == (plateau_python.since, pytest.approx(plateau_python.best))
    assert verdicts > 0  # the streams do trip the detectors


@needs_c
def test_a_c_window_grows_as_values_arrive_so_a_huge_window_costs_nothing_up_front():
    stats = detectors.DETECTORS_C.RollingStats(10**15)  # 8 PB if allocated at once
    for v in range(1, 1001):
        stats.add(float(v))
    assert len(stats) == 1000 and stats.mean == 500.5


@each_implementation
def test_detectors_refuse_values_that_are_not_numbers(impl):
    with pytest.raises(TypeError):
        impl.SpikeDetector(warmup=0).observe("1.0")
    with pytest.raises(TypeError):
        impl.RollingStats(3).add_and_mean(None)


@needs_c
def test_a_stale_c_detectors_build_fails_loudly_under_require_c_and_falls_back_otherwise(monkeypatch):
    monkeypatch.setattr(detectors.DETECTORS_C, "DETECTORS", 0)
    monkeypatch.setenv("OTEL_ML_REQUIRE_C", "1")
    with pytest.raises(ImportError, match="stale build"):
        detectors._load_c()
    monkeypatch.setenv("OTEL_ML_REQUIRE_C", "0")
    with pytest.warns(RuntimeWarning, match="using the Python detectors"):
        assert detectors._load_c() is None
    monkeypatch.setenv("OTEL_ML_PURE_PYTHON", "1")
    assert detectors._load_c() is None


def test_the_c_detectors_are_built_and_used_where_ci_requires_it():
    if not _cbuild.require_c():
        pytest.skip("OTEL_ML_REQUIRE_C is not set (.ci/run sets it)")
    assert detectors.DETECTORS_C is not None, "otel_ml/_cdetectors.c was not built"
    monitor = AnomalyMonitor(AnomalyConfig(), rank=0, run_id="r")
    assert type(monitor._detectors["loss"][1]) is detectors.DETECTORS_C.SpikeDetector
    assert type(monitor._plateau) is detectors.DETECTORS_C.PlateauDetector


def _monitor(**config):
    clock = FakeClock(1000.0)
    flagged = []
    last = {"t": None}
    monitor = AnomalyMonitor(
        AnomalyConfig(**config),
        rank=3,
        run_id="r",
        clock=clock,
        flag_step=lambda step, name, attrs: flagged.append((step, name, dict(attrs))),
        last_step_time=lambda: last["t"],
    )
    return monitor, clock, flagged, last


def test_nan_episode_counts_once_logs_once_and_flags_its_step(caplog):
    caplog.set_level(logging.WARNING, logger="otel_ml")
    monitor, _, flagged, _ = _monitor()
    for step, loss in enumerate([1.0, math.nan, math.nan, math.inf, 0.9, math.nan]):
        monitor.observations.append((step, "loss", loss))
    monitor.process()
    assert monitor.counts["nonfinite"] == 2  # steps 1-3 are one episode, step 5 a second
    assert monitor.active["nonfinite"] == 1
    assert [f[0] for f in flagged if f[2]["otel_ml.anomaly.type"] == "nonfinite"] == [1, 5]
    warnings = [r.getMessage() for r in caplog.records if "nonfinite" in r.getMessage()]
    assert len(warnings) == 2 and "rank 3" in warnings[0] and "step 1" in warnings[0]


def test_kl_spike_against_an_absolute_threshold_and_the_rolling_band():
    monitor, _, _, _ = _monitor(kl_max=5.0)
    for step in range(30):
        monitor.observations.append((step, "kl", 0.1 + 0.001 * (step % 3)))
    monitor.observations.append((30, "kl", 3.0))  # far above a tight band
    monitor.process()
    assert monitor.counts["kl_spike"] == 1 and monitor.active["kl_spike"] == 1
    monitor.observations.append((31, "kl", 0.1))
    monitor.observations.append((32, "kl", 6.0))  # above kl_max
    monitor.process()
    assert monitor.counts["kl_spike"] == 2


def test_loss_plateau_and_grad_explosion():
    monitor, _, _, _ = _monitor(plateau_patience=60, spike_window=100)
    for step in range(200):
        monitor.observations.append((step, "loss", 1.0))
        monitor.observations.append((step, "grad_norm", 1.0 if step != 150 else 80.0))
    monitor.process()
    assert monitor.active["loss_plateau"] == 1 and monitor.counts["loss_plateau"] == 1
    assert monitor.counts["grad_explosion"] == 1 and monitor.active["grad_explosion"] == 0


def test_stall_is_detected_from_the_clock_and_ends_with_the_next_step():
    monitor, clock, _, last = _monitor(stall_seconds=60)
    monitor.process()
    assert monitor.active["stall"] == 0  # no step yet: nothing to stall
    last["t"] = clock.now
    clock.now += 59
    monitor.process()
    assert monitor.active["stall"] == 0
    clock.now += 2
    monitor.process()
    assert monitor.active["stall"] == 1 and monitor.counts["stall"] == 1
    last["t"] = clock.now
    monitor.process()
    assert monitor.active["stall"] == 0


def _exported_types(**config) -> tuple[dict, set[str], set[str]]:
    monitor, _, _, _ = _monitor(**config)
    collection = Collection()
    collection.register(prepare=monitor.process)  # as the runtime's pre-collection hook does
    reader = PullReader(collection)
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    monitor.register(provider.get_meter("t"), {"rank": "3", "run_id": "r"})
    monitor.observations.append((0, "loss", math.nan))
    got = points(reader)
    active = {attrs["type"] for attrs, _ in got.get("otel_ml_anomaly_active", [])}
    counted = {attrs["type"] for attrs, _ in got.get("otel_ml_anomalies", [])}
    return got, active, counted


def test_every_checked_type_exports_from_startup_with_rank_and_run_id():
    got, active, counted = _exported_types(drift_keys=("reward",))
    assert active == counted == set(TYPES)
    for kind in TYPES:
        expected = 1 if kind == "nonfinite" else 0
        assert value(got, "otel_ml_anomaly_active", type=kind, rank="3", run_id="r") == expected
        assert value(got, "otel_ml_anomalies", type=kind) == expected


def test_a_type_whose_check_is_off_exports_no_series():
    _, active, counted = _exported_types()  # the defaults: distribution_drift is off
    assert active == counted == set(TYPES) - {"distribution_drift"}
    _, active, _ = _exported_types(stall_seconds=0, kl_zscore=0, kl_max=0, plateau_patience=0)
    assert active == {"nonfinite", "loss_spike", "grad_explosion"}
    _, active, _ = _exported_types(kl_zscore=0, kl_max=5.0)  # an absolute threshold alone checks
    assert "kl_spike" in active
    _, active, counted = _exported_types(anomaly_detection=False)
    assert active == counted == set()


def test_disabled_detection_keeps_nothing():
    monitor, _, _, _ = _monitor(anomaly_detection=False)
    monitor.observations.append((0, "loss", math.nan))
    monitor.process()
    assert monitor.counts["nonfinite"] == 0 and not monitor.observations


def test_callbacks_get_the_anomaly_and_a_failing_one_is_contained(monkeypatch, caplog):
    seen = []
    otel_ml.on_anomaly(seen.append)

    @otel_ml.on_anomaly
    def broken(_):
        raise RuntimeError("pager down")

    monitor, _, _, _ = _monitor()
    monitor.observations.append((7, "grad_norm", math.inf))
    monitor.process()
    assert [(a.type, a.step, a.key, a.rank) for a in seen] == [("nonfinite", 7, "grad_norm", 3)]
    assert "pager down" in caplog.text


def test_config_from_env_and_kwargs():
    cfg = Config.resolve(
        env={"OTEL_ML_STOP_ON": "nonfinite, kl_spike", "OTEL_ML_KL_MAX": "2.5"}, stall_seconds=30
    )
    assert cfg.anomalies.stop_on == ("nonfinite", "kl_spike")
    assert (cfg.anomalies.kl_max, cfg.anomalies.stall_seconds) == (2.5, 30)
    assert Config.resolve(env={}, stop_on=["stall"]).anomalies.stop_on == ("stall",)
    with pytest.raises(ValueError, match="unknown anomaly type"):
        Config.resolve(env={}, stop_on=["explosions"])


def test_stop_on_raises_from_the_next_log_with_the_anomaly(tmp_path):
    t = otel_ml.init(
        prometheus_port=0,
        run_dir=str(tmp_path),
        run_id="s",
        stop_on=["nonfinite"],
        set_global_providers=False,
    )
    try:
        otel_ml.log(0, loss=1.0)
        otel_ml.log(1, loss=float("nan"))
        t.anomalies.process()  # the export thread would do this within half a second
        with pytest.raises(AnomalyError, match="nonfinite on rank 0") as caught:
            otel_ml.log(2, loss=1.0)
        assert caught.value.anomaly.step == 1
        otel_ml.log(3, loss=1.0)  # raised once; training may decide to go on
    finally:
        t.shutdown()


def test_an_anomaly_forces_a_trace_of_its_step_with_an_event(tmp_path):
    import json

    t = otel_ml.init(
        prometheus_port=0,
        run_dir=str(tmp_path / "{run_id}"),
        run_id="ev",
        trace_every=0,
        set_global_providers=False,
    )
    for step in range(5):
        otel_ml.log(step, loss=float("nan") if step == 3 else 1.0)
    t.shutdown()
    lines = (tmp_path / "ev" / "rank-0" / "spans.otlp.jsonl").read_text().splitlines()
    spans = [
        s
        for line in lines
        for rs in json.loads(line)["resourceSpans"]
        for ss in rs["scopeSpans"]
        for s in ss["spans"]
    ]
    (traced,) = spans
    attrs = {a["key"]: a["value"] for a in traced["attributes"]}
    assert attrs["otel_ml.step"] == {"intValue": "3"} and attrs["otel_ml.sampled_by"] == {
        "stringValue": "anomaly"
    }
    (event,) = traced["events"]
    assert event["name"] == "otel_ml.anomaly"
    assert {a["key"]: a["value"] for a in event["attributes"]}["otel_ml.anomaly.type"] == {
        "stringValue": "nonfinite"
    }


def test_episodes_record_first_and_last_step_count_and_end():
    clock = iter(range(100, 200)).__next__
    monitor = AnomalyMonitor(AnomalyConfig(), rank=2, run_id="r", clock=lambda: float(clock()))
    for step in range(5):
        monitor.observations.append((step, "loss", 1.0))
    for step in range(300, 303):
        monitor.observations.append((step, "loss", float("nan")))
    monitor.process()
    (episode,) = monitor.episodes()
    assert (episode["type"], episode["key"], episode["first_step"], episode["last_step"]) == (
        "nonfinite",
        "loss",
        300,
        302,
    )
    assert episode["count"] == 3 and episode["active"] and episode["end_time"] is None
    monitor.observations.append((303, "loss", 1.0))
    monitor.process()
    (ended,) = monitor.episodes()
    assert not ended["active"] and ended["end_time"] > ended["start_time"]
    assert ended["last_step"] == 302


# Distribution drift: the mean leaving its band, the spread collapsing ----------------------------


def _healthy(step: int) -> tuple[float, float]:
    """A reward distribution's (mean, std) of a healthy run: slowly rising mean, steady spread."""
    return 0.5 + 0.002 * step + 0.02 * ((step * 7) % 5 - 2), 1.0 + 0.05 * ((step * 3) % 4)


def test_drift_detector_stays_quiet_on_a_healthy_run_and_during_warmup():
    drift = DriftDetector(window=50, warmup=20)
    assert not any(drift.observe(*_healthy(step)) for step in range(300))
    early = DriftDetector(warmup=20)
    assert not any(early.observe(mean, 0.0 if i == 5 else 1.0) for i, mean in enumerate([1.0] * 10 + [9.0]))


def test_drift_detector_flags_a_collapsing_spread_until_it_recovers():
    drift = DriftDetector(window=50, warmup=20, spread_fraction=0.1)
    for step in range(60):
        drift.observe(*_healthy(step))
    assert not drift.observe(0.6, 0.2)  # narrower, not collapsed
    assert drift.observe(0.6, 0.05) and "spread" in drift.reason
    assert drift.observe(0.6, 0.0)  # persists: the collapsed steps did not become the norm
    assert not drift.observe(*_healthy(61))
    assert not DriftDetector(warmup=20, spread_fraction=0).observe(0.6, 0.0)


def test_drift_detector_flags_the_mean_leaving_its_band_in_either_direction():
    for jump in (-2.0, 3.0):
        drift = DriftDetector(window=50, warmup=20, zscore=6.0)
        for step in range(60):
            drift.observe(*_healthy(step))
        assert drift.observe(_healthy(60)[0] + jump, 1.0) and "mean" in drift.reason
    quiet = DriftDetector(window=50, warmup=20, zscore=0, spread_fraction=0)
    for step in range(60):
        quiet.observe(*_healthy(step))
    assert not quiet.observe(100.0, 0.0)


def test_drift_detector_needs_more_than_noise_when_the_means_barely_vary():
    drift = DriftDetector(window=50, warmup=20, min_shift=0.5)
    for _ in range(40):
        drift.observe(2.0, 1.0)  # identical means: their own band is zero wide
    assert not drift.observe(2.3, 1.0)  # within half the typical spread
    assert drift.observe(2.6, 1.0)


def test_distribution_drift_is_off_by_default_and_watches_only_the_keys_it_is_given():
    off, _, _, _ = _monitor()
    on, _, flagged, _ = _monitor(drift_keys=("reward",), drift_window=50)
    for monitor in (off, on):
        for step in range(60):
            monitor.distributions.append((step, "reward", *_healthy(step)))
            monitor.distributions.append((step, "score", *_healthy(step)))
        monitor.distributions.append((60, "score", 0.6, 0.0))  # a collapse of an unwatched key
        monitor.process()
        assert monitor.counts["distribution_drift"] == 0 and not monitor.distributions
        monitor.distributions.append((61, "reward", 0.6, 0.0))
        monitor.process()
    assert off.counts["distribution_drift"] == 0 and off.active["distribution_drift"] == 0
    assert on.counts["distribution_drift"] == 1 and on.active["distribution_drift"] == 1
    (episode,) = on.episodes()
    assert (episode["key"], episode["first_step"], episode["type"]) == ("reward", 61, "distribution_drift")
    assert [f[0] for f in flagged] == [61]


def test_a_drift_episode_lasts_while_any_watched_key_drifts():
    monitor, _, _, _ = _monitor(drift_keys=("*",), drift_window=50)
    for step in range(60):
        for key in ("reward", "score"):
            monitor.distributions.append((step, key, *_healthy(step)))
    monitor.distributions.append((60, "reward", 0.6, 0.0))
    monitor.distributions.append((60, "score", 0.6, 0.0))
    monitor.distributions.append((61, "reward", *_healthy(61)))  # reward recovered, score not
    monitor.process()
    assert monitor.active["distribution_drift"] == 1 and monitor.counts["distribution_drift"] == 1
    monitor.distributions.append((62, "score", *_healthy(62)))
    monitor.process()
    assert monitor.active["distribution_drift"] == 0 and monitor.counts["distribution_drift"] == 1


def test_drift_options_from_env_and_kwargs(caplog):
    env = {"OTEL_ML_DRIFT_KEYS": "reward, score", "OTEL_ML_DRIFT_WINDOW": "30", "OTEL_ML_DRIFT_ZSCORE": "4"}
    cfg = Config.resolve(env=env, drift_spread_fraction=0.2).anomalies
    assert (cfg.drift_keys, cfg.drift_window, cfg.drift_zscore, cfg.drift_spread_fraction) == (
        ("reward", "score"), 30, 4.0, 0.2,
    )  # fmt: skip
    assert Config.resolve(env={}, drift_keys="reward").anomalies.drift_keys == ("reward",)
    assert Config.resolve(env={}).anomalies.drift_keys == ()
    with caplog.at_level(logging.WARNING, logger="otel_ml"):
        assert Config.resolve(env={"OTEL_ML_DRIFT_WINDOW": "1"}).anomalies.drift_window == 100
    assert "OTEL_ML_DRIFT_WINDOW" in caplog.text
    assert Config.resolve(env={}, stop_on=["distribution_drift"]).anomalies.stop_on == ("distribution_drift",)


def test_logged_rewards_reach_the_drift_check_on_the_export_thread(tmp_path):
    t = otel_ml.init(
        prometheus_port=0, run_dir=str(tmp_path), run_id="d", drift_keys=["reward"], drift_window=30,
        set_global_providers=False,
    )  # fmt: skip
    try:
        for step in range(40):
            mean, std = _healthy(step)
            otel_ml.log(step, reward=[mean - std, mean + std])
        otel_ml.log(40, reward=[0.6, 0.6, 0.6, 0.6])  # every rollout scored alike
        t.flush(timeout=5)
        with urllib.request.urlopen(t.metrics_url, timeout=10) as response:
            got = parse_exposition(response.read().decode())
        (episode,) = t.anomalies.episodes()
    finally:
        t.shutdown()
    labels = {"type": "distribution_drift", "rank": "0", "run_id": "d"}
    assert [v for lab, v in got["otel_ml_anomaly_active"] if labels.items() <= lab.items()] == [1]
    assert [v for lab, v in got["otel_ml_anomalies_total"] if labels.items() <= lab.items()] == [1]
    assert episode["key"] == "reward" and episode["first_step"] == 40
