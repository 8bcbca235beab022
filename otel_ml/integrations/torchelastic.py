"""torchrun's elastic agent: restarts, rendezvous and worker-group state as series.

torchrun's agent (not the workers) publishes ``torch.distributed.elastic.metrics``: a
``success``/``failure``/``duration.ms`` triple for each of its operations (``_rendezvous``,
``_restart_workers``, ``_start_workers``, ``_monitor_workers``, ...), the remaining restarts and
the worker group's state on every monitor tick. :class:`OtelMLMetricHandler` turns them into

* ``otel_ml_elastic_operations_total{operation, outcome}``: ``operation="restart_workers"`` counts
  restarts, ``operation="rendezvous"`` rendezvous rounds;
* ``otel_ml_elastic_operation_duration_seconds{operation}``: the last duration of each;
* ``otel_ml_elastic_remaining_restarts{role}`` and ``otel_ml_elastic_worker_state{role, state}``
  (1 for the state last seen: healthy, unhealthy, failed, succeeded).

The handler exports through the otel_ml of the process it runs in. To run it in torchrun's
agent, launch with ``python -m otel_ml.integrations.torchelastic`` and torchrun's arguments: it
starts otel_ml in the agent (service ``<service>-agent``, rank = node rank, ``/metrics`` on the
port after the workers' block, files under ``<run dir>/elastic-agent-<node rank>``), sets
``OTEL_ML_RUN_ID`` for the workers when unset so that agent and workers share one run id (give
``--rdzv-id`` or ``OTEL_ML_RUN_ID`` on several nodes), installs the handler and runs torchrun.
Its series have the worker-of-that-rank's ``rank`` label; select them by name
(``otel_ml_elastic_*``) or by ``service_name``.

Example::

    python -m otel_ml.integrations.torchelastic --nproc-per-node 8 --max-restarts 3 train.py
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation

import otel_ml
from otel_ml import names, ranks, semconv
from otel_ml.integrations._common import missing
from otel_ml.runtime import Telemetry

try:
    from torch.distributed.elastic import metrics as elastic_metrics
except ImportError as exc:  # pragma: no cover - exercised without torch
    raise missing("torch", "torch") from exc

#: Distinct operations exported at most (the agent has about ten).
MAX_OPERATIONS = 64
_OUTCOMES = ("success", "failure")
_STATES = frozenset({"init", "healthy", "unhealthy", "stopped", "succeeded", "failed", "unknown"})


def parse(name: str, value: float) -> tuple[str, ...] | None:
    """What one elastic metric means (pure), or None for one otel_ml does not export:

    ``("operation", op, outcome)``, ``("duration", op, seconds)``, ``("remaining", role, n)`` or
    ``("state", role, state)``.

    Example::

        parse("SimpleElasticAgent._restart_workers.success", 1)  # ('operation', 'restart_workers', 'success')
    """
    if name.startswith("workers."):
        _, _, rest = name.partition(".")
        role, _, metric = rest.rpartition(".")
        if not role:
            return None
        if metric == "remaining_restarts":
            return ("remaining", role, float(value))
        if metric in _STATES:
            return ("state", role, metric)
        return None
    if name.endswith(".duration.ms"):
        return ("duration", _operation(name[: -len(".duration.ms")]), float(value) / 1000.0)
    head, _, outcome = name.rpartition(".")
    if head and outcome in _OUTCOMES:
        return ("operation", _operation(head), outcome)
    return None


def _operation(qualified: str) -> str:
    """``SimpleElasticAgent._restart_workers`` -> ``restart_workers``."""
    return qualified.rpartition(".")[2].lstrip("_") or qualified


class ElasticSeries:
    """The agent's state as series: counts, last durations, remaining restarts, group state.

    Example::

        series = ElasticSeries(); series.update("SimpleElasticAgent._rendezvous.success", 1)
    """

    def __init__(self, max_operations: int = MAX_OPERATIONS) -> None:
        self.max_operations = max_operations
        self.operations: dict[tuple[str, str], int] = {}
        self.durations: dict[str, float] = {}
        self.remaining: dict[str, float] = {}
        self.states: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def update(self, name: str, value: float) -> None:
        meaning = parse(name, value)
        if meaning is None:
            return
        kind, key, detail = meaning
        with self._lock:
            if kind in ("operation", "duration") and not self._admit(key):
                return
            if kind == "operation":
                for outcome in _OUTCOMES:  # both series exist from the first one, so increase() works
                    self.operations.setdefault((key, outcome), 0)
                self.operations[(key, detail)] += 1
            elif kind == "duration":
                self.durations[key] = detail
            elif kind == "remaining":
                self.remaining[key] = detail
            else:
                for role_state in self.states:
                    if role_state[0] == key:
                        self.states[role_state] = 0
                self.states[(key, detail)] = 1

    def _admit(self, operation: str) -> bool:
        known = {op for op, _ in self.operations} | set(self.durations)
        return operation in known or len(known) < self.max_operations

    def register(self, telemetry: Telemetry) -> None:
        """Create the four ``otel_ml_elastic_*`` instruments on the telemetry's meter."""
        attrs = dict(telemetry.attributes)
        label = names.label_value

        def observe(items: Iterable[tuple[dict[str, str], float]]) -> list[Observation]:
            return [
                Observation(v, {**attrs, **{k: label(x) for k, x in labels.items()}}) for labels, v in items
            ]

        def operations(_: CallbackOptions) -> list[Observation]:
            with self._lock:
                items = [({"operation": op, "outcome": out}, n) for (op, out), n in self.operations.items()]
            return observe(items)

        def durations(_: CallbackOptions) -> list[Observation]:
            with self._lock:
                return observe([({"operation": op}, s) for op, s in self.durations.items()])

        def remaining(_: CallbackOptions) -> list[Observation]:
            with self._lock:
                return observe([({"role": role}, n) for role, n in self.remaining.items()])

        def states(_: CallbackOptions) -> list[Observation]:
            with self._lock:
                return observe([({"role": r, "state": s}, v) for (r, s), v in self.states.items()])

        meter = telemetry.meter
        for spec, callback in (
            (semconv.ELASTIC_OPERATIONS, operations),
            (semconv.ELASTIC_OPERATION_DURATION, durations),
            (semconv.ELASTIC_REMAINING_RESTARTS, remaining),
            (semconv.ELASTIC_WORKER_STATE, states),
        ):
            create = (
                meter.create_observable_counter if spec.kind == "counter" else meter.create_observable_gauge
            )
            create(spec.name, [callback], spec.unit, spec.description)


class OtelMLMetricHandler(elastic_metrics.MetricHandler):
    """A ``torch.distributed.elastic.metrics`` handler exporting through the running otel_ml.

    Example::

        torch.distributed.elastic.metrics.configure(OtelMLMetricHandler())
    """

    def __init__(self) -> None:
        self.series = ElasticSeries()
        self._bound: Telemetry | None = None
        self._lock = threading.Lock()

    def emit(self, metric_data: Any) -> None:
        try:
            self._bind()
            self.series.update(str(metric_data.name), float(metric_data.value))
        except Exception:  # noqa: BLE001 - telemetry must never break the agent
            return

    def _bind(self) -> None:
        telemetry = otel_ml.get_telemetry()
        if telemetry is None or telemetry is self._bound or getattr(telemetry, "meter", None) is None:
            return
        with self._lock:
            if telemetry is not self._bound:
                self.series.register(telemetry)
                self._bound = telemetry


def configure(group: str | None = None) -> OtelMLMetricHandler:
    """Install an :class:`OtelMLMetricHandler` for ``group`` (None: every group) and return it."""
    handler = OtelMLMetricHandler()
    elastic_metrics.configure(handler, group)
    return handler


def _int(text: Any, default: int) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        return default


def start_agent_telemetry(args: Any, env: dict[str, str] | None = None) -> Telemetry:
    """Start otel_ml for torchrun's agent from torchrun's parsed ``args`` (see module docstring)."""
    env = os.environ if env is None else env
    if not env.get("OTEL_ML_RUN_ID"):
        rdzv_id = str(getattr(args, "rdzv_id", "none") or "none")
        run_id = names.run_id(rdzv_id) if rdzv_id.lower() != "none" else ranks.detect_run_id({})
        env["OTEL_ML_RUN_ID"] = run_id  # inherited by the workers: one run id for agent and workers
    node_rank = _int(getattr(args, "node_rank", 0), 0)
    nnodes = _int(str(getattr(args, "nnodes", "1")).rpartition(":")[2], 1)
    nproc = _int(getattr(args, "nproc_per_node", None), 0)
    base = _int(env.get("OTEL_EXPORTER_PROMETHEUS_PORT"), 9464)
    run_dir = Path(env.get("OTEL_ML_RUN_DIR", "otel-ml-runs/{run_id}")) / f"elastic-agent-{node_rank}"
    service = env.get("OTEL_SERVICE_NAME", "otel-ml")
    return otel_ml.init(
        service_name=f"{service}-agent",
        rank=node_rank,
        local_rank=0,
        world_size=max(nnodes, node_rank + 1),
        run_dir=str(run_dir),
        prometheus_port=base + nproc if nproc and base else 0,
        progress_view="off",
        summary=False,
        handle_signals=False,
        anomaly_detection=False,
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m otel_ml.integrations.torchelastic [torchrun arguments]``."""
    from torch.distributed import run

    args = run.parse_args(sys.argv[1:] if argv is None else argv)
    start_agent_telemetry(args)
    configure()
    run.run(args)


if __name__ == "__main__":
    from otel_ml.integrations import torchelastic  # one copy of the module state, not a __main__ twin

    torchelastic.main()
