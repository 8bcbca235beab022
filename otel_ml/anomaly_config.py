"""The anomaly detectors' settings (:class:`AnomalyConfig`) and the anomaly types they report.

Its own module so that :mod:`otel_ml.config` (which nests it and accepts its options flat in
``init()``) depends on settings only, not on the detectors that read them.

Example::

    AnomalyConfig.resolve(env={"OTEL_ML_STOP_ON": "nonfinite"}).stop_on   # ('nonfinite',)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from otel_ml import _envparse as p
from otel_ml._settings import option, resolve_values

NONFINITE, KL_SPIKE, LOSS_SPIKE, LOSS_PLATEAU, GRAD_EXPLOSION, STALL, DISTRIBUTION_DRIFT = TYPES = (
    "nonfinite",
    "kl_spike",
    "loss_spike",
    "loss_plateau",
    "grad_explosion",
    "stall",
    "distribution_drift",
)
#: ``drift_keys`` entry that watches every distribution.
ALL_KEYS = "*"


def _types(raw: str) -> tuple[str, ...]:
    chosen = tuple(t.strip().lower() for t in raw.split(",") if t.strip())
    bad = [t for t in chosen if t not in TYPES]
    if bad:
        raise ValueError(f"unknown anomaly type(s) {', '.join(bad)}; known: {', '.join(TYPES)}")
    return chosen


def _keys(raw: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in raw.split(",") if k.strip())


@dataclass
class AnomalyConfig:
    """Detector settings; every option is also an ``init()`` keyword (see README for the table).

    Example::

        AnomalyConfig.resolve(kl_max=5.0).kl_max  # 5.0
    """

    anomaly_detection: bool = field(
        default=True, metadata=option(("OTEL_ML_ANOMALIES",), p.parse_bool, "Run the in-process detectors.")
    )
    stop_on: tuple[str, ...] = field(
        default=(),
        metadata=option(
            ("OTEL_ML_STOP_ON",),
            _types,
            "Anomaly types (comma-separated) after which the next log() raises `otel_ml.AnomalyError`.",
            "none",
        ),
    )
    kl_max: float = field(
        default=0.0,
        metadata=option(("OTEL_ML_KL_MAX",), p.seconds_parser(1, 0.0), "KL above this is a spike (0: off)."),
    )
    kl_zscore: float = field(
        default=6.0,
        metadata=option(
            ("OTEL_ML_KL_ZSCORE",),
            p.seconds_parser(1, 0.0),
            "KL more than this many standard deviations above its rolling mean is a spike (0: off).",
        ),
    )
    loss_spike_zscore: float = field(
        default=6.0,
        metadata=option(
            ("OTEL_ML_LOSS_SPIKE_ZSCORE",),
            p.seconds_parser(1, 0.0),
            "Loss this many standard deviations (and 50%) above its rolling mean is a spike (0: off).",
        ),
    )
    spike_window: int = field(
        default=100,
        metadata=option(
            ("OTEL_ML_SPIKE_WINDOW",), p.int_parser(2), "Values in the rolling window of the spike detectors."
        ),
    )
    plateau_patience: int = field(
        default=1000,
        metadata=option(
            ("OTEL_ML_PLATEAU_PATIENCE",),
            p.int_parser(0),
            "Logged losses without improvement before a plateau is reported (0: off).",
        ),
    )
    plateau_tolerance: float = field(
        default=0.01,
        metadata=option(
            ("OTEL_ML_PLATEAU_TOLERANCE",),
            p.seconds_parser(1, 0.0),
            "Relative drop of the smoothed loss (50-value mean) that counts as an improvement.",
        ),
    )
    grad_norm_max: float = field(
        default=0.0,
        metadata=option(
            ("OTEL_ML_GRAD_NORM_MAX",),
            p.seconds_parser(1, 0.0),
            "Gradient norm above this explodes (0: off).",
        ),
    )
    grad_explosion_factor: float = field(
        default=10.0,
        metadata=option(
            ("OTEL_ML_GRAD_EXPLOSION_FACTOR",),
            p.seconds_parser(1, 0.0),
            "Gradient norm above this times its rolling mean explodes (0: off).",
        ),
    )
    drift_keys: tuple[str, ...] = field(
        default=(),
        metadata=option(
            ("OTEL_ML_DRIFT_KEYS",),
            _keys,
            "Distributions (log() keys, comma-separated; `*` for all) whose mean collapsing or spread "
            "going to zero is a `distribution_drift`.",
            "none (off)",
        ),
    )
    drift_window: int = field(
        default=100,
        metadata=option(
            ("OTEL_ML_DRIFT_WINDOW",),
            p.int_parser(2),
            "Logged steps of a distribution in the drift check's rolling history (it waits 20 first).",
        ),
    )
    drift_zscore: float = field(
        default=6.0,
        metadata=option(
            ("OTEL_ML_DRIFT_ZSCORE",),
            p.seconds_parser(1, 0.0),
            "A distribution's mean this many standard deviations of its recent means (and half its "
            "median spread) from their average drifts (0: off).",
        ),
    )
    drift_spread_fraction: float = field(
        default=0.1,
        metadata=option(
            ("OTEL_ML_DRIFT_SPREAD_FRACTION",),
            p.seconds_parser(1, 0.0),
            "A distribution's standard deviation below this fraction of its recent median drifts (0: off).",
        ),
    )
    stall_seconds: float = field(
        default=600.0,
        metadata=option(
            ("OTEL_ML_STALL_SECONDS",),
            p.seconds_parser(1, 0.0),
            "No log() for this long, while the process lives, is a stall (0: off).",
        ),
    )

    def checked_types(self) -> tuple[str, ...]:
        """The anomaly types this configuration checks, in :data:`TYPES` order: each exports its
        two series from startup; a type whose check is off (``distribution_drift`` by default, or
        a threshold set to 0) exports none, so it costs no series and shows no false "all clear".

        Example::

            AnomalyConfig().checked_types()  # every type but 'distribution_drift'
        """
        if not self.anomaly_detection:
            return ()
        checked = {
            NONFINITE: True,
            KL_SPIKE: self.kl_zscore > 0 or self.kl_max > 0,
            LOSS_SPIKE: self.loss_spike_zscore > 0,
            LOSS_PLATEAU: self.plateau_patience > 0,
            GRAD_EXPLOSION: self.grad_explosion_factor > 0 or self.grad_norm_max > 0,
            STALL: self.stall_seconds > 0,
            DISTRIBUTION_DRIFT: bool(self.drift_keys)
            and (self.drift_zscore > 0 or self.drift_spread_fraction > 0),
        }
        return tuple(kind for kind in TYPES if checked[kind])

    @classmethod
    def resolve(cls, env: Mapping[str, str] | None = None, **kwargs: Any) -> AnomalyConfig:
        values = resolve_values(cls, os.environ if env is None else env, kwargs)
        if "stop_on" in values:
            chosen = values["stop_on"]
            values["stop_on"] = _types(chosen) if isinstance(chosen, str) else _types(",".join(chosen))
        if "drift_keys" in values:
            chosen = values["drift_keys"]
            values["drift_keys"] = _keys(chosen) if isinstance(chosen, str) else tuple(str(k) for k in chosen)
        return cls(**values)
