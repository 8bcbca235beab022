"""Wires region timing into a running process: recorder, aggregator, live table, CUDA events, summary.

:class:`Timekeeper` builds the parts of region timing and hands each what it needs through its
constructor; :func:`otel_ml.runtime.Telemetry` runs :meth:`Timekeeper.housekeep` and the
aggregator on the pump and :meth:`Timekeeper.finish` at shutdown.

Example::

    timekeeper = Timekeeper(cfg, meter, tracer, collection, labels={"rank": "0", "run_id": "r"}, ...)
    ...
    timekeeper.finish(rank_dir)       # at shutdown: last aggregation, summary files, printout
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from opentelemetry.metrics import Meter
from opentelemetry.trace import Tracer

from otel_ml._logging import warn_once
from otel_ml.collection import Collection
from otel_ml.config import Config
from otel_ml.console import Console
from otel_ml.health import TelemetryHealth
from otel_ml.regions import module_tracing, recorder
from otel_ml.regions.aggregator import Aggregator
from otel_ml.regions.cuda_events import cuda_events_if_active
from otel_ml.regions.pathtree import PathTree
from otel_ml.regions.render import FirstStep, TimingTable, render_text
from otel_ml.regions.sampling import StepFlags, TraceSampler
from otel_ml.regions.stats import outside, summary_document
from otel_ml.rundir import SUMMARY_JSON, SUMMARY_TEXT, write_private


class Timekeeper:
    """Owns the process's region recorder and its export-thread aggregator.

    ``before`` runs at the start of every aggregation (the anomaly detectors, which flag steps in
    ``flags`` so that the aggregator traces them).

    Example::

        tk = Timekeeper(Config.resolve(), meter, tracer, Collection(), {"rank": "0", "run_id": "r"},
                        {}, rank=0, run_id="r", health=TelemetryHealth())
    """

    def __init__(
        self,
        cfg: Config,
        meter: Meter,
        tracer: Tracer,
        collection: Collection,
        labels: Mapping[str, str],
        span_attributes: Mapping[str, Any],
        *,
        rank: int,
        run_id: str,
        health: TelemetryHealth,
        console: Console | None = None,
        flags: StepFlags | None = None,
        before: Sequence[Callable[[], None]] = (),
        cuda: Any | None = None,
        cudart: Any | None = None,
    ) -> None:
        self._cfg = cfg
        self._rank = rank
        self._run_id = run_id
        self.console = console or Console()
        self._timing_error = lambda: health.error("timing")
        self._cuda = (cuda, cudart)  # torch.cuda and the loaded runtime when None
        self.recorder = recorder.Recorder(
            PathTree(cfg.max_span_paths, fold_indices=cfg.fold_layer_indices),
            events=cuda_events_if_active(cfg.cuda_timing, self._timing_error, *self._cuda),
            on_drop=lambda n: health.dropped("spans", n),
            on_error=self._timing_error,
            sample_every=cfg.trace_every or 100,
            on_boundary=(module_tracing.step_boundary,),
        )
        self._first_step = FirstStep()
        table = (
            [TimingTable(self.console, cfg.timing_table_every, cfg.timing_table_top)]
            if cfg.timing_table and rank == 0
            else []
        )
        self.aggregator = Aggregator(
            self.recorder,
            tracer,
            labels,
            span_attributes=span_attributes,
            sampler=TraceSampler(every=cfg.trace_every, factor=cfg.tail_factor),
            flags=flags,
            before=before,
            on_window=[self._first_step, *table],
        )
        self.aggregator.register(meter, collection)
        self._dynamo_allowed = False
        recorder.install(self.recorder)

    def housekeep(self) -> None:
        """Pump job: turn on CUDA timing once the training code initialised CUDA, release the
        path nodes of modules that are gone, allow regions under TorchDynamo once it is imported.

        The check is ``torch.cuda.is_initialized()``, a flag: this thread never initialises CUDA.
        """
        if self.recorder.events is None and self._cfg.cuda_timing != "off":
            self.recorder.events = cuda_events_if_active(
                self._cfg.cuda_timing, self._timing_error, *self._cuda
            )
        events = self.recorder.events
        if events is not None:
            events.find_work_device()
        if not self._dynamo_allowed:  # torch.compile may import TorchDynamo at any time
            self._dynamo_allowed = recorder.allow_under_dynamo()
        module_tracing.release_nodes()

    def finish(self, rank_dir: Path) -> None:
        """Last aggregation; write and print the summary (if enabled and anything was timed)."""
        recorder.install(None)
        self.aggregator.close_last_window()
        if not self._cfg.summary:
            return
        rows = self.aggregator.summary_rows()
        if not rows:
            return
        agg = self.aggregator
        title = (
            f"otel_ml timing summary: rank {self._rank}, run {self._run_id}, {agg.steps} steps, "
            f"{agg.step_time:.3f} s of step time"
        )
        outside_time = outside(rows, agg.step_time, agg.steps, self._first_step.outside)
        text = render_text(rows, title, outside_time)
        header = {
            "run_id": self._run_id,
            "rank": self._rank,
            "steps": agg.steps,
            "step_time_s": agg.step_time,
        }
        try:
            write_private(
                rank_dir / SUMMARY_JSON, json.dumps(summary_document(rows, header, outside_time), indent=2)
            )
            write_private(rank_dir / SUMMARY_TEXT, text + "\n")
        except OSError as exc:
            warn_once("summary-file", "otel_ml: could not write the timing summary: %s", exc.strerror or exc)
        if self._rank == 0:
            self.console.write(text)

    def after_fork_in_child(self) -> None:
        recorder.install(None)
