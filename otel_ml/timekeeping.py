"""Wires region timing into a running :class:`otel_ml.Telemetry`: recorder, aggregator, live
table, CUDA event timing, and the end-of-run summary files.

Example::

    timekeeper = Timekeeper(cfg, pipeline, labels={"rank": "0", "run_id": "r"}, rank=0, ...)
    ...
    timekeeper.finish(rank_dir)       # at shutdown: last aggregation, summary files, printout
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from otel_ml import modules, timing
from otel_ml._logging import warn_once
from otel_ml.config import Config
from otel_ml.console import Console
from otel_ml.cuda import cuda_events_if_active
from otel_ml.health import TelemetryHealth
from otel_ml.paths import PathTree
from otel_ml.pipeline import Pipeline
from otel_ml.regions import Aggregator, TimingTable
from otel_ml.sampling import TraceSampler
from otel_ml.summary import render_text, summary_document

SUMMARY_JSON = "timing-summary.json"
SUMMARY_TEXT = "timing-summary.txt"


class Timekeeper:
    """Owns the process's region recorder and its export-thread aggregator.

    Example::

        tk = Timekeeper(Config.resolve(), pipeline, {"rank": "0", "run_id": "r"}, {}, 0, "r", health)
    """

    def __init__(
        self,
        cfg: Config,
        pipeline: Pipeline,
        labels: Mapping[str, str],
        span_attributes: Mapping[str, Any],
        rank: int,
        run_id: str,
        health: TelemetryHealth,
        console: Console | None = None,
    ) -> None:
        self._cfg = cfg
        self._rank = rank
        self._run_id = run_id
        self.recorder = timing.Recorder(
            PathTree(cfg.max_span_paths),
            events=cuda_events_if_active("off" if cfg.cuda_timing == "auto" else cfg.cuda_timing),
            on_drop=lambda n: health.dropped("spans", n),
            on_error=lambda: health.error("timing"),
        )
        self.recorder.sample_every = cfg.trace_every or 100
        self.recorder.on_boundary.append(modules.step_boundary)
        self.aggregator = Aggregator(
            self.recorder,
            pipeline.tracer,
            labels,
            span_attributes=span_attributes,
            sampler=TraceSampler(every=cfg.trace_every, factor=cfg.tail_factor),
        )
        self.aggregator.register(pipeline.meter)
        pipeline.sources.add(self.aggregator.metrics)
        pipeline.add_job(self.tick)
        self.console = console or Console()
        if cfg.timing_table and rank == 0:
            self.aggregator.on_window.append(
                TimingTable(self.aggregator, self.console, cfg.timing_table_every, cfg.timing_table_top)
            )
        self._dynamo_allowed = False
        timing.install(self.recorder)

    def tick(self) -> None:
        """Pump job: turn on CUDA timing once CUDA is up (auto mode), then aggregate."""
        if self.recorder.events is None and self._cfg.cuda_timing == "auto":
            self.recorder.events = cuda_events_if_active("auto")
        if not self._dynamo_allowed:  # torch.compile may import TorchDynamo at any time
            self._dynamo_allowed = timing.allow_under_dynamo()
        modules.release_nodes()
        self.aggregator.process()

    def finish(self, rank_dir: Path) -> None:
        """Last aggregation; write and print the summary (if enabled and anything was timed)."""
        timing.install(None)
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
        text = render_text(rows, title)
        header = {
            "run_id": self._run_id,
            "rank": self._rank,
            "steps": agg.steps,
            "step_time_s": agg.step_time,
        }
        try:
            rank_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            _write_private(rank_dir / SUMMARY_JSON, json.dumps(summary_document(rows, header), indent=2))
            _write_private(rank_dir / SUMMARY_TEXT, text + "\n")
        except OSError as exc:
            warn_once("summary-file", "otel_ml: could not write the timing summary: %s", exc.strerror or exc)
        if self._rank == 0:
            self.console.write(text)

    def after_fork_in_child(self) -> None:
        timing.install(None)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
