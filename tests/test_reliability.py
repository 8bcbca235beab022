"""Reliability of the in-process API: hostile input to log()/span()/tqdm and concurrent lifecycle.

Telemetry must never break or stop the training loop: ``log()`` takes whatever a loop passes
(any key, any value) without raising, says once which key it could not use, and keeps
``/metrics`` a valid exposition whose cardinality stays under the configured caps; ``init()``,
``shutdown()`` and every call from other threads can race without an exception or a hang.
Everything here runs in this process against a real ``/metrics`` server on 127.0.0.1.
"""

from __future__ import annotations

import decimal
import fractions
import io
import logging
import math
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import otel_ml
from otel_ml import names, semconv
from otel_ml._testing import reset
from otel_ml.progress import board as progress
from otel_ml.runtime import Telemetry
from tests.support.metrics import strict_exposition


@pytest.fixture
def fresh_runtime() -> Iterator[None]:
    """No running instance before the test, none left behind after it."""
    reset()
    yield
    reset()


@pytest.fixture
def board() -> progress.ProgressBoard:
    """The process-wide progress board, fresh: task labels of earlier tests do not count here."""
    progress.board.reset()
    return progress.board


def _opts(tmp_path: Any, **extra: Any) -> dict[str, Any]:
    return {
        "prometheus_port": 0,
        "prometheus_host": "127.0.0.1",
        "run_dir": str(tmp_path / "{run_id}"),
        "run_id": "reliability",
        "set_global_providers": False,
        "handle_signals": False,
        "files": "off",
        "summary": False,
        "anomaly_detection": True,
        **extra,
    }


def scrape(telemetry: Telemetry) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(telemetry.metrics_url, timeout=5) as response:
        assert response.status == 200
        return strict_exposition(response.read().decode("utf-8"))


def warnings_naming(caplog: pytest.LogCaptureFixture, key: str) -> list[str]:
    """otel_ml warnings that name ``key`` as one of their arguments (as ``%r``)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "otel_ml" and r.levelno >= logging.WARNING and key in (r.args or ())
    ]


def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {predicate}"
        time.sleep(0.01)


# ------------------------------------------------------------------------------ bad input: values


class _FloatRaises:
    def __float__(self) -> float:
        raise RuntimeError("cannot convert")


#: (key, value, usable). Usable values are exported; unusable ones are dropped with one warning.
VALUES: list[tuple[str, Any, bool]] = [
    ("float", 1.5, True),
    ("nan", math.nan, True),  # NaN is data: counted in otel_ml_nonfinite_total
    ("inf", math.inf, True),
    ("neg_inf", -math.inf, True),
    ("huge", 1.7e308, True),
    ("tiny", 5e-324, True),
    ("neg_zero", -0.0, True),
    ("int", 7, True),
    ("int_beyond_float_precision", 2**60 + 1, True),
    ("int_beyond_float_range", 10**400, False),
    ("neg_int_beyond_float_range", -(10**400), False),
    ("bool", True, True),
    ("none", None, False),
    ("str", "1.5", False),
    ("bytes", b"1.5", False),
    ("complex", 1 + 2j, False),
    ("list", [1.0], False),
    ("dict", {"a": 1.0}, False),
    ("tuple", (1.0,), False),
    ("set", {1.0}, False),
    ("object", object(), False),
    ("float_raises", _FloatRaises(), False),
    ("decimal", decimal.Decimal("2.5"), True),
    ("fraction", fractions.Fraction(1, 4), True),
    ("np_float32", np.float32(0.25), True),
    ("np_int64", np.int64(3), True),
    ("np_bool", np.bool_(True), True),
    ("np_nan", np.float64("nan"), True),
    ("np_0d_array", np.array(0.5), True),
    ("np_array_empty", np.array([]), False),  # several elements are a distribution; none: dropped
    ("t_float32", torch.tensor(0.5), True),
    ("t_float64", torch.tensor(0.25, dtype=torch.float64), True),
    ("t_float16", torch.tensor(1.5, dtype=torch.float16), True),
    ("t_bfloat16", torch.tensor(1.5, dtype=torch.bfloat16), True),
    ("t_int64", torch.tensor(9), True),
    ("t_int8", torch.tensor(-3, dtype=torch.int8), True),
    ("t_uint8", torch.tensor(200, dtype=torch.uint8), True),
    ("t_bool", torch.tensor(True), True),
    ("t_nan", torch.tensor(math.nan), True),
    ("t_requires_grad", torch.tensor(2.0, requires_grad=True), True),
    ("t_one_element", torch.ones(1, 1), True),
    ("t_empty", torch.ones(0), False),
    ("t_complex", torch.tensor(1 + 1j), False),
    ("t_meta", torch.empty((), device="meta"), False),
    ("t_meta_multi", torch.empty(3, device="meta"), False),
]


def _expected(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.item())
    return float(value)


def test_log_takes_every_kind_of_value_and_warns_once_per_unusable_key(
    fresh_runtime: None, board: progress.ProgressBoard, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    telemetry = otel_ml.init(**_opts(tmp_path))
    for step in (1, 2):  # twice: the second time must stay silent
        for key, value, _ in VALUES:
            otel_ml.log(step, **{key: value})
    samples = scrape(telemetry)
    nonfinite = {lbl["metric"]: v for lbl, v in samples["otel_ml_nonfinite_total"]}

    for key, value, usable in VALUES:
        named = warnings_naming(caplog, key)
        if not usable:
            assert len(named) == 1, f"{key}: {named}"
            assert repr(key) in named[0]
            assert telemetry.training.latest(key) is None
            continue
        assert named == [], f"{key} is usable: {named}"
        expected = _expected(value)
        name = telemetry.training.exported_name(key)
        if math.isfinite(expected):
            assert samples[name] == [({"rank": "0", "run_id": "reliability"}, expected)], key
            assert nonfinite[key] == 0
        else:
            assert name not in samples, "a gauge keeps only finite values"
            assert nonfinite[key] == 2, key
    dropped = [v for lbl, v in samples["otel_ml_export_dropped_total"] if lbl["signal"] == "values"]
    assert dropped == [2 * sum(not usable for _, _, usable in VALUES)]
    # Nothing else went wrong on the way (collection, detectors, background jobs).
    assert not [r for r in caplog.records if "failed" in r.getMessage()]


def test_counters_ignore_negative_and_unusable_amounts(
    fresh_runtime: None, board: progress.ProgressBoard, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    telemetry = otel_ml.init(**_opts(tmp_path))
    otel_ml.log(1, samples=8, tokens=100)
    otel_ml.log(2, samples=-8, tokens="many")
    otel_ml.log(3, samples=math.nan, tokens=torch.ones(2))
    otel_ml.log(4, samples=torch.tensor(8), tokens=np.int64(100))
    samples = scrape(telemetry)
    assert samples["otel_ml_samples_total"][0][1] == 16
    assert samples["otel_ml_tokens_total"][0][1] == 200
    assert len([m for m in caplog.messages if "negative samples" in m]) == 1
    assert len(warnings_naming(caplog, "tokens")) == 1


# ------------------------------------------------------------------------------ bad input: keys

#: Keys a loop might produce from data: Unicode, empty, huge, Prometheus-invalid characters,
#: names that sanitize alike, names of otel_ml's own series, text decoded with surrogateescape.
HOSTILE_KEYS = [
    # First, in this order: "a-b" sanitizes like "a b", and its first alternative name,
    # otel_ml_a_b_2 (2 = user keys so far), is taken by "a_b_2".
    "a b",
    "a_b_2",
    "a-b",
    " ",
    "loss/val top-1",
    "前向传播总耗时",
    "emoji😀",
    "a" * 10_000,
    "tab\tnew\nline",
    'quote"back\\slash',
    'metric{label="x"}',
    "nul\x00byte",
    "lone\ud800surrogate",
    "file\udcff.txt",
    "otel_ml_loss",
    "step",
    "export_errors_total",
    "step_duration_seconds_count",
    "UPPER",
    "upper",
    "le",
    "__name__",
    "1digit",
]


def test_hostile_keys_become_distinct_valid_series(
    fresh_runtime: None, board: progress.ProgressBoard, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    telemetry = otel_ml.init(**_opts(tmp_path))
    values = {key: index + 0.5 for index, key in enumerate(HOSTILE_KEYS)}
    otel_ml.log(1, **values)
    otel_ml.log(2, **{"": 1.0})
    otel_ml.log(3, **{"": 2.0, **{key: math.nan for key in HOSTILE_KEYS}})
    samples = scrape(telemetry)

    exported = {key: telemetry.training.exported_name(key) for key in HOSTILE_KEYS}
    assert len(set(exported.values())) == len(HOSTILE_KEYS), "two keys share a series"
    for key, name in exported.items():
        assert name is not None and name.startswith("otel_ml_"), key
        # Each key's own value under its own name: no key overwrote another.
        assert samples[name] == [({"rank": "0", "run_id": "reliability"}, values[key])], key
    metric_labels = [lbl["metric"] for lbl, _ in samples["otel_ml_nonfinite_total"]]
    assert len(metric_labels) == len(set(metric_labels)) == len(HOSTILE_KEYS)
    assert all(len(label) <= names.MAX_LABEL_VALUE_LENGTH for label in metric_labels)
    assert all(v == 1 for _, v in samples["otel_ml_nonfinite_total"])
    # otel_ml's own series are untouched by keys that look like them.
    assert samples["otel_ml_step"] == [({"rank": "0", "run_id": "reliability"}, 3.0)]
    assert "otel_ml_loss" not in samples
    assert len([m for m in caplog.messages if "empty or non-string key" in m]) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "failed" in r.getMessage()]


def test_hostile_steps_never_raise(
    fresh_runtime: None, board: progress.ProgressBoard, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    telemetry = otel_ml.init(**_opts(tmp_path))
    for step in (
        None,
        "ten",
        math.nan,
        math.inf,
        2**70,
        -5,
        torch.tensor(4),
        np.int64(5),
        6.7,
        [7],
        object(),
    ):
        otel_ml.log(step, loss=1.0)
    samples = scrape(telemetry)
    assert samples["otel_ml_step"][0][1] == telemetry.training.step
    assert len([m for m in caplog.messages if "step" in m and "unusable" in m]) == 1


# ------------------------------------------------------------------------------ caps

TINY_CAPS = {"max_metric_keys": 8, "max_span_paths": 4, "max_progress_tasks": 3}


def _user_gauges(samples: dict[str, Any]) -> set[str]:
    own = {s.prometheus_name for s in semconv.METRICS} | {"target_info"}
    histogram_parts = {
        f"{s.name}{suffix}" for s in semconv.METRICS for suffix in ("_bucket", "_count", "_sum")
    }
    return {n for n in samples if n.startswith("otel_ml_") and n not in own and n not in histogram_parts}


def assert_under_caps(samples: dict[str, Any], caps: dict[str, int]) -> None:
    assert len(_user_gauges(samples)) <= caps["max_metric_keys"], sorted(_user_gauges(samples))
    keys = {lbl["metric"] for lbl, _ in samples.get("otel_ml_nonfinite_total", [])}
    assert len(keys) <= caps["max_metric_keys"], keys
    paths = {lbl["path"] for lbl, _ in samples.get("otel_ml_span_self_seconds_total", [])}
    paths |= {lbl["path"] for lbl, _ in samples.get("otel_ml_span_duration_seconds_count", [])}
    assert len(paths) <= caps["max_span_paths"] + 1, paths  # + "(overflow)"
    tasks = {lbl["task"] for lbl, _ in samples.get("otel_ml_progress_active", [])}
    tasks |= {lbl["task"] for lbl, _ in samples.get("otel_ml_progress_completed", [])}
    assert len(tasks) <= caps["max_progress_tasks"] + 1, tasks  # + "(overflow)"


def test_cardinality_caps_hold_with_one_warning_each(
    fresh_runtime: None, board: progress.ProgressBoard, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    telemetry = otel_ml.init(**_opts(tmp_path, **TINY_CAPS))
    bars = []
    for i in range(50):
        otel_ml.log(i, **{f"key_{i}": float(i), "loss": 1.0})
        with otel_ml.span(f"region_{i}"), otel_ml.span("inner"):
            pass
        bar = otel_ml.tqdm(total=10, desc=f"file_{i}.txt", file=io.StringIO(), mininterval=0)
        bar.update(i % 10)
        bars.append(bar)
    otel_ml.step_end()
    samples = scrape(telemetry)
    assert_under_caps(samples, TINY_CAPS)
    tasks = {lbl["task"] for lbl, _ in samples["otel_ml_progress_completed"]}
    assert progress.OVERFLOW in tasks
    paths = {lbl["path"] for lbl, _ in samples["otel_ml_span_self_seconds_total"]}
    assert "(overflow)" in paths
    for text in ("distinct log() keys", "distinct span paths", "distinct progress tasks"):
        assert len([m for m in caplog.messages if text in m]) == 1, text
    for bar in bars:
        bar.close()
    assert_under_caps(scrape(telemetry), TINY_CAPS)


# ------------------------------------------------------------------------------ property-based


def _tensor(value: float, dtype: torch.dtype) -> torch.Tensor:
    if dtype is torch.bool:
        return torch.tensor(value != 0)
    return torch.tensor(value, dtype=torch.float64).to(dtype)


_keys = st.one_of(
    st.text(max_size=30),
    st.text(min_size=200, max_size=600),
    st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3),
    st.sampled_from(
        ["", " ", "a/b c", "le", "step", "loss", "kl", "grad_norm", "lr", "otel_ml_loss", '{}="\n']
    ),
).filter(lambda key: key not in ("samples", "tokens"))  # counters: their own test above

_dtypes = st.sampled_from(
    [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.bool]
)
_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1e-300, max_value=1e-300),
    st.integers(),
    st.integers(min_value=2**1023, max_value=2**1100),
    st.booleans(),
    st.none(),
    st.text(max_size=5),
    st.binary(max_size=5),
    st.lists(st.floats(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.floats(), max_size=2),
    st.builds(_tensor, st.floats(allow_nan=True, allow_infinity=True, width=32), _dtypes),
    st.integers(min_value=0, max_value=4).map(lambda n: torch.zeros(n)),
    st.just(torch.empty((), device="meta")),
    st.just(torch.empty(2, device="meta")),
    st.floats(width=32).map(np.float32),
)


def _usable(value: Any) -> bool:
    """The documented contract: numbers, NumPy scalars, bool, 1-element tensors (not meta), and
    distributions: CPU tensors and lists of two or more numbers (an empty one is dropped)."""
    if isinstance(value, torch.Tensor):
        return value.numel() >= 1 and not value.is_meta and not value.is_complex()
    if isinstance(value, (list, tuple)):
        return len(value) >= 2 and all(isinstance(v, float) for v in value)
    if isinstance(value, (bool, float, np.floating)):
        return True
    if isinstance(value, int):
        try:
            float(value)
        except OverflowError:
            return False
        return True
    return False


PROPERTY_CAPS = {"max_metric_keys": 24, "max_span_paths": 12, "max_progress_tasks": 6}


class Hostile:
    """One instance shared by all examples, and the keys that got an unusable value so far."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry
        self.unusable: set[str] = set()


@pytest.fixture
def hostile(fresh_runtime: None, board: progress.ProgressBoard, tmp_path: Any) -> Hostile:
    return Hostile(otel_ml.init(**_opts(tmp_path, trace_every=1, **PROPERTY_CAPS)))


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same examples on every run: a red build is reproducible
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    step=st.integers(min_value=0, max_value=10**6),
    values=st.dictionaries(_keys, _values, max_size=5),
    span_name=st.one_of(st.text(max_size=40), st.sampled_from(["", "/", "a//b/", "x/" * 30, "\udcff/é"])),
    desc=st.one_of(st.none(), st.text(max_size=40), st.sampled_from(["", ":", "\n", "\udcfe.bin"])),
)
def test_log_span_and_tqdm_never_raise_and_metrics_stay_valid(
    hostile: Hostile,
    caplog: pytest.LogCaptureFixture,
    step: int,
    values: dict[str, Any],
    span_name: str,
    desc: str | None,
) -> None:
    telemetry = hostile.telemetry
    with otel_ml.span(span_name):
        otel_ml.log(step, **values)
    otel_ml.log(step + 1, **values)  # the same keys again: no second warning
    with otel_ml.tqdm(range(3), desc=desc, file=io.StringIO(), mininterval=0) as bar:
        for _ in bar:
            pass
    samples = scrape(telemetry)

    assert_under_caps(samples, PROPERTY_CAPS)
    # Every key that is a metric and ever got an unusable value has exactly one warning naming
    # it, in this whole run; keys with only usable values have none.
    kinds = telemetry.training._kinds
    hostile.unusable.update(key for key, value in values.items() if not _usable(value))
    for key in values:
        if key and kinds.get(key) is not None:  # a metric, not a key dropped at the cap
            assert len(warnings_naming(caplog, key)) == (key in hostile.unusable), (key, values[key])
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "failed" in r.getMessage()]


# ------------------------------------------------------------------------------ lifecycle


def test_calls_before_init_from_many_threads_are_no_ops(
    fresh_runtime: None, board: progress.ProgressBoard
) -> None:
    errors: list[BaseException] = []

    def use() -> None:
        try:
            for step in range(200):
                otel_ml.log(step, loss=1.0)
                with otel_ml.span("early"):
                    pass
                otel_ml.step_end()
                assert otel_ml.flush() is True
            with otel_ml.tqdm(range(5), desc="early", file=io.StringIO()) as bar:
                for _ in bar:
                    pass
            assert otel_ml.shutdown() is True
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=use) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert not [t for t in threads if t.is_alive()]
    assert errors == []
    assert otel_ml.get_telemetry() is None


def test_shutdown_and_init_race_with_threads_that_log_span_and_update_bars(
    fresh_runtime: None, board: progress.ProgressBoard, tmp_path: Any
) -> None:
    errors: list[BaseException] = []
    done = [0] * 8
    stop = threading.Event()

    def train(index: int) -> None:
        try:
            bar = None
            step = 0
            while not stop.is_set():
                step += 1
                otel_ml.log(step, loss=1.0 / step, **{f"thread_{index}": float(step)})
                with otel_ml.span(f"thread_{index}"), otel_ml.span("work"):
                    pass
                if bar is None or step % 25 == 0:
                    if bar is not None:
                        bar.close()
                    bar = otel_ml.tqdm(total=25, desc=f"bar_{index}", file=io.StringIO(), mininterval=0)
                bar.update(1)
                done[index] += 1
            if bar is not None:
                bar.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    def progressed(by: int) -> Any:
        start = list(done)
        return lambda: all(now - then >= by for now, then in zip(done, start, strict=True))

    threads = [threading.Thread(target=train, args=(i,), name=f"trainer-{i}") for i in range(8)]
    for thread in threads:
        thread.start()
    try:
        wait_for(progressed(20))  # running before init(): no-ops

        first = otel_ml.init(**_opts(tmp_path, trace_every=3, files="on"))
        wait_for(progressed(20))
        started = time.monotonic()
        assert otel_ml.shutdown(timeout=2) is True
        assert time.monotonic() - started < 2.5
        wait_for(progressed(20))  # after shutdown: no-ops again

        second = otel_ml.init(**_opts(tmp_path, trace_every=3))
        assert second is not first and not second.closed
        wait_for(progressed(20))
        samples = scrape(second)
        assert samples["otel_ml_step"] and samples["otel_ml_progress_completed"]
        started = time.monotonic()
        assert otel_ml.shutdown(timeout=2) is True
        assert otel_ml.shutdown(timeout=2) is True
        assert time.monotonic() - started < 2.5
        wait_for(progressed(20))
    finally:
        stop.set()
        for thread in threads:
            thread.join(5)
    assert not [t.name for t in threads if t.is_alive()], "a thread hung in an otel_ml call"
    assert errors == [], errors
    wait_for(lambda: not [t.name for t in threading.enumerate() if t.name.startswith("otel-ml")])
