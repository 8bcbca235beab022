"""verl-style trackers: ``OtelMLTracking``, with verl's backend protocol ``log(data, step)`` / ``finish()``.

verl's ``Tracking`` fans ``log(data=..., step=...)`` out to its backends; add this one with
``tracking.logger["otel_ml"] = OtelMLTracking()`` (or call it from any trainer that logs a dict
per step). Needs no extra: verl itself is not imported. Nested keys are flattened with ``/``, then
mapped by :func:`split` (:data:`KEYS`):

===========================  =====================================================================
verl key                     exported as
===========================  =====================================================================
``actor/pg_loss``            ``loss`` (``otel_ml_loss``, NaN counted, loss detectors)
``actor/ppo_kl``             ``kl`` (``otel_ml_kl``, the KL-spike detector)
``actor/grad_norm``          ``grad_norm`` (gradient-explosion detector)
``actor/lr``                 ``lr`` (``otel_ml_learning_rate``)
``critic/score/mean``        ``reward`` (``otel_ml_reward``)
``perf/total_num_tokens``    ``tokens`` (``otel_ml_tokens_total``, ``otel_ml_tokens_per_second``)
``train/loss``, ``train/lr`` ``loss``, ``lr`` (verl's SFT trainer)
``timing_s/step``            region ``step`` (``otel_ml_span_duration_seconds{path="step"}``)
``timing_s/<name>``          region ``step/<name>`` (a child of ``step``; top level without it)
``training/global_step``     nothing (it is ``step``)
anything else numeric        its own gauge: ``perf/throughput`` -> ``otel_ml_perf_throughput``
===========================  =====================================================================

Strings, lists and tables are left out. Progress ``train`` follows ``step`` (of ``total_steps=``).

Example::

    tracking.logger["otel_ml"] = OtelMLTracking(total_steps=config.trainer.total_training_steps)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import otel_ml
from otel_ml.integrations._common import TrackerProgress, ensure_started
from otel_ml.integrations._keys import flatten, is_scalar, to_float
from otel_ml.regions import record

#: verl keys that become otel_ml's built-in keys.
KEYS: dict[str, str] = {
    "actor/pg_loss": "loss",
    "actor/ppo_kl": "kl",
    "actor/grad_norm": "grad_norm",
    "actor/lr": "lr",
    "critic/score/mean": "reward",
    "perf/total_num_tokens": "tokens",
    "train/loss": "loss",
    "train/lr": "lr",
    "train/grad_norm": "grad_norm",
}
TIMING_PREFIX = "timing_s/"
STEP_TIMER = "step"
IGNORED = frozenset({"training/global_step"})


def split(data: Mapping[str, Any]) -> tuple[dict[str, Any], float | None, dict[str, float]]:
    """``(log() values, step seconds, {child region: seconds})`` for one verl metrics dict (pure).

    Example::

        split({"actor/pg_loss": 0.1, "timing_s/step": 2.0, "timing_s/gen": 1.2})
        # ({'loss': 0.1}, 2.0, {'gen': 1.2})
    """
    values: dict[str, Any] = {}
    step_seconds: float | None = None
    timers: dict[str, float] = {}
    for key, value in flatten(data).items():
        if key in IGNORED or not is_scalar(value):
            continue
        if key.startswith(TIMING_PREFIX):
            seconds = to_float(value)
            if seconds is not None:
                name = key[len(TIMING_PREFIX) :]
                if name == STEP_TIMER:
                    step_seconds = seconds
                else:
                    timers[name] = seconds
            continue
        values[KEYS.get(key, key)] = value
    return values, step_seconds, timers


class OtelMLTracking:
    """A tracker backend with verl's protocol that exports through otel_ml (see module docstring).

    ``init_options`` go to ``otel_ml.init()`` when otel_ml is not running yet.

    Example::

        tracker = OtelMLTracking(total_steps=100); tracker.log({"actor/pg_loss": 0.3}, step=1)
    """

    def __init__(self, total_steps: int | None = None, **init_options: Any) -> None:
        ensure_started(init_options)
        self._progress = TrackerProgress(total_steps)

    def log(self, data: Mapping[str, Any], step: int) -> None:
        """Export one step's metrics; with ``stop_on``, raises ``otel_ml.AnomalyError`` as ``log()`` does."""
        values, step_seconds, timers = split(data)
        if step_seconds is not None:
            record(STEP_TIMER, step_seconds, timers)
        else:
            for name, seconds in timers.items():
                record(name, seconds)
        otel_ml.log(step, **values)  # after the regions: they belong to the step this call closes
        self._progress.advance(step)

    def finish(self) -> None:
        self._progress.finish()
