"""``init()``, ``log()``, ``shutdown()``: the process-wide handle and its lifecycle.

``init()`` builds one :class:`Telemetry` per process: resource, providers, ``/metrics`` server,
OTLP and file destinations, training metrics. Module-level functions called before ``init()``
(or after ``shutdown()``, or in a forked DataLoader worker) do nothing. ``shutdown()`` also
runs at exit and is bounded by ``shutdown_timeout``.

Over 400 lines: it is the one wiring object; every link between the components is made here,
in build order, and nowhere else.

Example::

    import otel_ml
    otel_ml.init(service_name="my-run")
    for step, batch in enumerate(loader):
        ...
        otel_ml.log(step, loss=loss, lr=lr, samples=len(batch))
    otel_ml.shutdown()
"""

from __future__ import annotations

import atexit
import json
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource

from otel_ml import ranks, semconv
from otel_ml._logging import logger, warn_once
from otel_ml.anomaly import WATCHED, Anomaly, AnomalyError, AnomalyMonitor
from otel_ml.collection import Collection
from otel_ml.config import Config
from otel_ml.console import Console
from otel_ml.exporters.exposition import ExpositionReader
from otel_ml.exporters.files import FileSink
from otel_ml.exporters.otlp import build_otlp_sink
from otel_ml.exporters.prometheus import MetricsServer, make_reader, server_security
from otel_ml.exporters.sink import Sink
from otel_ml.health import TelemetryHealth
from otel_ml.observables import ObservableMeter
from otel_ml.pipeline import Pipeline, Pump
from otel_ml.progress.board import board as progress_board
from otel_ml.progress.metrics import ProgressGauges
from otel_ml.progress.payload import PROGRESS_PATH, ProgressPayload
from otel_ml.progress.poller import RankView
from otel_ml.regions.sampling import StepFlags
from otel_ml.regions.timekeeper import Timekeeper
from otel_ml.rundir import ENDPOINT_FILE, rank_dir, resolve, write_private
from otel_ml.signals import install_sigterm_flush, watch_uncaught
from otel_ml.status import StatusBuilder, StatusWriter
from otel_ml.stopping import StopAgreement, StopReason
from otel_ml.system import GpuMemorySampler, SystemGauges
from otel_ml.training import TrainingMetrics


class Telemetry:
    """The handle ``init()`` returns: one telemetry pipeline for this process.

    Example::

        t = otel_ml.init(prometheus_port=0)
        t.log(0, loss=1.5)
        print(t.metrics_url, t.run_dir)
        t.shutdown()
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        env: Mapping[str, str] | None = None,
        metric_readers: Sequence[MetricReader] = (),
        sinks: Sequence[Sink] = (),
        cuda: Any | None = None,
        cudart: Any | None = None,
    ) -> None:
        self.config = cfg = config or Config.resolve(env=env)
        detected = ranks.detect(env)
        self.rank = cfg.rank if cfg.rank is not None else detected.rank
        self.local_rank = cfg.local_rank if cfg.local_rank is not None else detected.local_rank
        self.world_size = cfg.world_size if cfg.world_size is not None else detected.world_size
        self.run_id = cfg.run_id if cfg.run_id is not None else detected.run_id
        self.run_dir = resolve(cfg.run_dir, self.run_id)
        self.instance_id = uuid.uuid4().hex
        self.attributes = {semconv.LABEL_RANK: str(self.rank), semconv.LABEL_RUN_ID: self.run_id}
        in_use = (("otlp", cfg.otlp_enabled), ("files", cfg.files_enabled), ("prometheus", cfg.prometheus))
        self.health = TelemetryHealth(exporters=[name for name, on in in_use if on])
        self._pid = os.getpid()
        self._lock = threading.RLock()  # shutdown() may run from a signal handler on this thread
        self.closed = False
        self.enabled = cfg.enabled
        self.training: TrainingMetrics | None = None
        self.server: MetricsServer | None = None
        self.prometheus_reader: ExpositionReader | None = None
        #: otel_ml.should_stop() / agree_stop() / stop_reason() (otel_ml.stopping).
        self.stopping = StopAgreement(self._stop_seen, self.rank)
        self.pipeline: Pipeline | None = None
        self.pump: Pump | None = None
        self.payload: ProgressPayload | None = None
        self.progress_gauges: ProgressGauges | None = None
        self.system_gauges: SystemGauges | None = None
        self.file_sink: FileSink | None = None
        self.timekeeper: Timekeeper | None = None
        self.rank_view: RankView | None = None
        self.anomalies: AnomalyMonitor | None = None
        #: Writes ``status.json`` (otel_ml.status), or None when ``status_interval`` is 0.
        self.status: StatusWriter | None = None
        self._restore_signals: Callable[[], None] = lambda: None
        self.console = Console()
        #: The training metrics for the background side; ``training`` is cleared at shutdown so
        #: that ``log()`` stops, while the final collection still reads these.
        self._training_state: TrainingMetrics | None = None
        #: When the last collection started draining (monotonic); the pump skips its drain then.
        self._prepared_at = -math.inf
        if not cfg.enabled:
            return

        # Build order: everything a part needs exists before it, and is handed to its constructor.
        collection = Collection()
        collection.register(prepare=self._before_collect)
        readers: list[MetricReader] = list(metric_readers)
        prom_reader = make_reader(collection) if cfg.prometheus else None
        #: The reader behind ``/metrics`` (``render()`` gives one scrape's body), or None.
        self.prometheus_reader = prom_reader
        if prom_reader is not None:
            readers.append(prom_reader)
        all_sinks: list[Sink] = list(sinks)
        otlp = build_otlp_sink(cfg) if cfg.otlp_enabled else None
        if otlp is not None:
            all_sinks.append(otlp)
        if cfg.files_enabled:
            self.file_sink = FileSink(self.run_dir, self.rank, cfg.file_max_bytes, cfg.file_backups)
            all_sinks.append(self.file_sink)
        self.pipeline = pipeline = Pipeline(
            self._resource(),
            collection,
            sinks=all_sinks,
            readers=readers,
            span_queue_size=cfg.span_queue_size,
            span_delay=cfg.span_export_delay,
            health=self.health,
        )
        self.meter_provider = pipeline.meter_provider
        self.tracer_provider = pipeline.tracer_provider
        # otel_ml's readers collect its observables directly (otel_ml.observables); a plain SDK
        # reader among metric_readers would not, so then they stay SDK instruments.
        self.meter = meter = pipeline.meter if metric_readers else ObservableMeter(pipeline.meter, collection)
        self.tracer = pipeline.tracer
        flags = StepFlags()
        self.anomalies = anomalies = AnomalyMonitor(
            cfg.anomalies,
            self.rank,
            self.run_id,
            flag_step=flags.flag,
            last_step_time=self._last_log_time,
        )
        anomalies.register(meter, self.attributes)
        self.timekeeper = timekeeper = Timekeeper(
            cfg,
            meter,
            pipeline.tracer,
            collection,
            self.attributes,
            {semconv.ATTR_RANK: self.rank, semconv.ATTR_RUN_ID: self.run_id},
            rank=self.rank,
            run_id=self.run_id,
            health=self.health,
            console=self.console,
            flags=flags,
            before=(anomalies.process,),
            cuda=cuda,
            cudart=cudart,
        )
        self.training = training = TrainingMetrics(
            meter,
            self.attributes,
            collection=collection,
            watch=(WATCHED, anomalies.observations),
            watch_distributions=anomalies.distributions,
            window=cfg.throughput_window,
            max_keys=cfg.max_metric_keys,
            distribution_buckets=cfg.distribution_buckets,
            on_step=timekeeper.recorder.implied_step_end,
            health=self.health,
            cuda=cuda,
            cudart=cudart,
        )
        self._training_state = training
        sampler = GpuMemorySampler(
            cuda, own_device=self.local_rank, on_error=lambda: self.health.error("system")
        )
        self.system_gauges = SystemGauges(meter, self.attributes, sampler)
        self.health.register(meter, self.attributes)
        progress_board.configure(rank=self.rank, max_tasks=cfg.max_progress_tasks)
        self.progress_gauges = ProgressGauges(meter, self.attributes, progress_board)
        regions = timekeeper.aggregator
        self.payload = ProgressPayload(
            progress_board, self.rank, self.run_id, training, anomalies=anomalies, regions=regions
        )
        if cfg.status_interval > 0:
            self.status = StatusWriter(
                rank_dir(self.run_dir, self.rank),
                StatusBuilder(self.rank, self.run_id),
                board=progress_board,
                training=training,
                anomalies=anomalies,
                regions=timekeeper.aggregator,
                interval=cfg.status_interval,
                health=self.health,
            )
            watch_uncaught(self.status.failed)
        security = server_security(cfg) if prom_reader is not None else None
        if prom_reader is not None and security is not None:
            self.server = MetricsServer(
                prom_reader.render,
                cfg.prometheus_host,
                cfg.prometheus_port,
                self.local_rank,
                cfg.prometheus_port_attempts,
                self.health,
                tls=security.tls,
                credentials=security.credentials,
                max_connections=cfg.prometheus_max_connections,
                routes={PROGRESS_PATH: self.payload.route},
            )
            if self.server.start() is not None:
                logger.info("otel_ml: rank %d serves %s", self.rank, self.server.url)
        drains = (training.refresh, timekeeper.aggregator.process)  # what a collection does too
        self.pump = Pump(
            pipeline,
            jobs=(drains[0], timekeeper.housekeep, drains[1], *((self.status.tick,) if self.status else ())),
            once=(self._write_endpoint_file,),
            interval=cfg.metric_export_interval,
            drains=drains,
            drained=lambda since: self._prepared_at >= since,
        )
        self.pump.start()
        wants_view = cfg.progress_view == "on" or (cfg.progress_view == "auto" and self.world_size > 1)
        if wants_view and self.rank == 0:
            self.rank_view = RankView(
                self.run_dir,
                self.world_size,
                self.payload.document,
                self.console,
                interval=cfg.progress_view_interval,
                log_interval=cfg.progress_log_interval,
            )
            self.rank_view.start()
        if cfg.set_global_providers:
            _install_globals(self)
        if cfg.handle_signals:
            on_signal = self.status.terminated if self.status is not None else None
            self._restore_signals = install_sigterm_flush(self.shutdown, on_signal)

    def _before_collect(self) -> None:
        """The one prepare hook of every collection, in this order: resolve deferred ``log()``
        values (which feeds the anomaly queue), aggregate regions (anomaly detection runs first
        inside, so it can flag the steps it closes), then snapshot the progress board and read
        the GPUs once for all their gauges."""
        self._prepared_at = time.monotonic()
        training, timekeeper = self._training_state, self.timekeeper
        if training is not None:
            training.refresh()
        if timekeeper is not None:
            timekeeper.aggregator.process()
        for gauges in (self.progress_gauges, self.system_gauges):
            if gauges is not None:
                gauges.prepare()

    def _last_log_time(self) -> float | None:
        training = self._training_state
        return training.last_log_time if training is not None else None

    def _resource(self) -> Resource:
        attributes: dict[str, Any] = {
            **self.config.resource_attributes,
            "service.name": self.config.service_name,
            "service.instance.id": self.instance_id,
            "host.name": socket.gethostname(),
            "process.pid": os.getpid(),
            semconv.RESOURCE_RUN_ID: self.run_id,
            semconv.RESOURCE_RANK: self.rank,
            semconv.RESOURCE_LOCAL_RANK: self.local_rank,
            semconv.RESOURCE_WORLD_SIZE: self.world_size,
        }
        return Resource.create(attributes)

    @property
    def port(self) -> int | None:
        """The port ``/metrics`` is served on (None when Prometheus is off or no port was free)."""
        return self.server.port if self.server else None

    @property
    def metrics_url(self) -> str | None:
        return self.server.url if self.server else None

    @property
    def endpoint_file(self) -> Path:
        """Where this rank's port and URL are written (JSON), for operators and ``otel-ml targets``."""
        return rank_dir(self.run_dir, self.rank) / ENDPOINT_FILE

    def endpoint_info(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "rank": self.rank,
            "local_rank": self.local_rank,
            "world_size": self.world_size,
            "host": socket.gethostname(),
            "bind": self.config.prometheus_host,
            "port": self.port,
            "url": self.metrics_url,
            "pid": self._pid,
            "service_name": self.config.service_name,
            "started_unix": time.time(),
        }

    def _write_endpoint_file(self) -> None:
        path = self.endpoint_file
        try:
            write_private(path, json.dumps(self.endpoint_info(), indent=2))
        except OSError as exc:
            warn_once("endpoint-file", "otel_ml: could not write %s: %s", path, exc.strerror or exc)

    def _stop_seen(self) -> Anomaly | None:
        """This rank's first ``stop_on`` anomaly, with the values queued so far checked first."""
        anomalies = self.anomalies
        if anomalies is None:
            return None
        anomalies.process()  # on the caller's thread: agree_stop() sees the step's NaN at once
        return anomalies.stop_seen

    def progress_payload(self) -> dict[str, Any]:
        """What ``/progress`` serves: this rank's open bars, step and loss (for rank 0's view)."""
        if self.payload is None:
            return ProgressPayload(progress_board, self.rank, self.run_id).document()
        return self.payload.document()

    # ------------------------------------------------------------------ API
    def log(self, step: Any, /, **values: Any) -> None:
        """Record one step's scalars; see :func:`otel_ml.log`."""
        self._log(step, values)

    def _log(self, step: Any, values: dict[str, Any]) -> None:
        training = self.training
        if training is None:
            return
        anomalies = self.anomalies
        if anomalies is not None and anomalies.stop_requested is not None and not self.stopping.engaged:
            stop = anomalies.take_stop()
            if stop is not None:
                raise AnomalyError(stop)  # asked for with stop_on=: the one error log() raises
        try:
            training.log(step, values)
        except Exception as exc:  # noqa: BLE001 - telemetry must never break the loop
            warn_once("log-internal", "otel_ml: log() failed internally (%r); telemetry continues", exc)
            self.health.dropped("values")

    def flush(self, timeout: float | None = None) -> bool:
        """Push metrics and spans to OTLP and files now, waiting at most ``timeout`` seconds."""
        if self.pump is None or self.closed:
            return True
        return self.pump.flush(self.config.shutdown_timeout if timeout is None else timeout)

    def shutdown(self, timeout: float | None = None) -> bool:
        """Flush and stop everything within ``timeout`` (default ``shutdown_timeout``) seconds.

        Safe to call twice and from any thread; returns False when a destination had to be
        abandoned at the deadline.
        """
        with self._lock:
            if self.closed:
                return True
            self.closed = True
        if os.getpid() != self._pid:
            return True
        self._restore_signals()
        self.training = None
        ok = True
        limit = self.config.shutdown_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        if self.rank_view is not None:
            self.rank_view.stop()
        if self.timekeeper is not None:
            try:
                self.timekeeper.finish(rank_dir(self.run_dir, self.rank))
            except Exception as exc:  # noqa: BLE001 - the summary is a courtesy, the flush is not
                warn_once("summary", "otel_ml: timing summary failed: %s", exc)
        if self.pump is not None:
            ok = self.pump.shutdown(max(0.0, deadline - time.monotonic() - 0.5))
        if self.status is not None:
            self.status.finish()  # after the pump's last tick: the final state is the last write
        if self.server is not None:
            self.server.close()
        return ok

    def _after_fork_in_child(self) -> None:
        """In a forked child (e.g. a DataLoader worker): no exports, no server socket."""
        self.training = None
        self.closed = True
        if self.timekeeper is not None:
            self.timekeeper.after_fork_in_child()
        if self.server is not None:
            self.server.close_in_child()


_state_lock = threading.Lock()
_current: Telemetry | None = None


def _install_globals(telemetry: Telemetry) -> None:
    from opentelemetry import metrics, trace

    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        trace.set_tracer_provider(telemetry.tracer_provider)
    if type(metrics.get_meter_provider()).__name__ == "_ProxyMeterProvider":
        metrics.set_meter_provider(telemetry.meter_provider)


def init(service_name: str | None = None, **options: Any) -> Telemetry:
    """Start telemetry for this process and return its handle.

    Every option of :class:`otel_ml.Config` can be passed as a keyword; unset options come from
    the environment, then defaults. Calling ``init()`` again while running returns the same
    handle with a warning.

    Example::

        t = otel_ml.init(service_name="llama-ft", prometheus_port=9500)
    """
    global _current
    with _state_lock:
        if _current is not None and not _current.closed:
            warn_once("init-twice", "otel_ml: init() called again; returning the running instance")
            return _current
        if _current is not None and os.getpid() != _current._pid:
            warn_once("init-in-fork", "otel_ml: init() in a forked child of a traced process is a no-op")
            return _current
        config = Config.resolve(service_name=service_name, **options)
        _current = Telemetry(config)
        return _current


def log(step: Any, /, **values: Any) -> None:
    """Record the scalars of one training step (no-op before ``init()``).

    ``loss``, ``lr``, ``grad_norm`` are gauges; ``samples`` and ``tokens`` are counted and turned
    into per-second rates; any other scalar becomes ``otel_ml_<key>``. Values may be Python
    numbers, NumPy scalars or 1-element tensors (CUDA tensors are read later, off this thread).
    NaN/Inf are counted in ``otel_ml_nonfinite_total``; unusable values get one warning.

    Example::

        otel_ml.log(step, loss=loss, lr=sched.get_last_lr()[0], samples=bs, kl=kl)
    """
    telemetry = _current
    if telemetry is not None:
        telemetry._log(step, values)


def should_stop() -> bool:
    """True once this rank has seen an anomaly named in ``stop_on`` (local, no collective; False
    before ``init()``). Calling it switches ``log()`` from raising to flagging (otel_ml.stopping)."""
    telemetry = _current
    return False if telemetry is None else telemetry.stopping.should_stop()


def agree_stop(every: int = 50, group: Any = None) -> bool:
    """True on every rank at the same call once any rank has seen a ``stop_on`` anomaly.

    Every ``every``-th call all-reduces one integer on ``group`` (default: the default process
    group): the one collective otel_ml runs, only here. Without a process group, or on one
    process, the local flag decides. False before ``init()``. See :mod:`otel_ml.stopping`.

    Example::

        if otel_ml.agree_stop(every=50):
            save_checkpoint()   # all ranks, same step
            break
    """
    telemetry = _current
    return False if telemetry is None else telemetry.stopping.agree(every, group)


def stop_reason() -> StopReason | None:
    """Why :func:`agree_stop` returned True: rank, type and step of the earliest anomaly."""
    telemetry = _current
    return None if telemetry is None else telemetry.stopping.reason


def shutdown(timeout: float | None = None) -> bool:
    """Flush and stop the running instance (bounded by ``shutdown_timeout``); no-op if none."""
    telemetry = _current
    return True if telemetry is None else telemetry.shutdown(timeout)


def flush(timeout: float | None = None) -> bool:
    """Push pending metrics and spans now (bounded); no-op before ``init()``."""
    telemetry = _current
    return True if telemetry is None else telemetry.flush(timeout)


def get_telemetry() -> Telemetry | None:
    """The running :class:`Telemetry`, or None before ``init()``."""
    return _current


def _at_exit() -> None:
    telemetry = _current
    if telemetry is not None and not telemetry.closed and os.getpid() == telemetry._pid:
        telemetry.shutdown()


def _after_fork_in_child() -> None:
    telemetry = _current
    if telemetry is not None:
        telemetry._after_fork_in_child()


atexit.register(_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
