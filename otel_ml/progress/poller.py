"""Rank 0's multi-rank terminal view: every rank's progress, read from the ranks' own telemetry.

Each rank serves ``/progress`` (:mod:`otel_ml.progress.payload`: a small JSON snapshot of its
open bars, step, loss, anomaly episodes and region timing) beside ``/metrics`` on the same
server; rank 0 finds the others through the endpoint files in the run dir
(:func:`otel_ml.rundir.read_endpoints`) and polls them from a background thread, about once a
second, with short timeouts. No collective, no store, nothing on the training thread. A rank
whose endpoint is not reachable (another node with ``/metrics`` bound to localhost, a dead
process) shows as down.

On a terminal the view is redrawn in place under the timing table; otherwise one compact line
is written every ``log_interval`` seconds, plus one line when a rank's anomaly episode starts and
one when it ends (:func:`otel_ml.progress.render.episode_changes`). Each rank's line shows its
active anomalies and the global line counts the ranks that have one and names the slowest rank.

Large jobs stay cheap: at most 16 ranks are polled per second (in rotation) and the view shows
16 ranks (down ones first, then those with anomalies, then the longest ETAs) plus the global line.

Example::

    view = RankView(run_dir, world_size=4, local=payload.document, console=Console())
    view.start()
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from otel_ml.console import Console
from otel_ml.progress.payload import fetch_progress, progress_url, status_from_payload
from otel_ml.progress.render import (
    RankStatus,
    compact_line,
    episode_changes,
    render_lines,
    slowest_first,
)
from otel_ml.rundir import read_endpoints
from otel_ml.threads import name_native


class RankView:
    """Polls every rank's ``/progress`` and draws the view (see module docstring).

    Example::

        RankView(Path("otel-ml-runs/r"), 2, local=lambda: {...}, console=Console()).poll()
    """

    def __init__(
        self,
        run_dir: Path,
        world_size: int,
        local: Callable[[], dict[str, Any]],
        console: Console,
        *,
        interval: float = 1.0,
        log_interval: float = 30.0,
        timeout: float = 0.5,
        per_cycle: int = 16,
        max_rows: int = 16,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.world_size = world_size
        self._local = local
        self._console = console
        self._interval = interval
        self._log_interval = log_interval
        self._timeout = timeout
        self._per_cycle = per_cycle
        self._max_rows = max_rows
        self._cursor = 0
        self._known: dict[int, RankStatus] = {}
        self._endpoints: dict[int, dict[str, Any]] = {}
        self._scanned = 0.0
        self._episodes: dict[int, dict[tuple[str, float | None], bool]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="otel-ml-rankview", daemon=True)

    def _scan(self) -> None:
        if time.monotonic() - self._scanned < 5.0 and len(self._endpoints) >= self.world_size:
            return
        self._scanned = time.monotonic()
        for record in read_endpoints(self.run_dir):
            self._endpoints[int(record["rank"])] = record

    def poll(self) -> list[RankStatus]:
        """One status per rank of the world (the local one without any network call).

        At most ``per_cycle`` other ranks are fetched per call, in rotation; the others keep
        their last status. Fetching every rank each second would cost rank 0 about 0.3 ms of CPU
        per rank (measured with 64 ranks), which does not scale to thousands.
        """
        local = status_from_payload(self._local())
        self._scan()
        others = [rank for rank in range(self.world_size) if rank != local.rank]
        if others:
            start = self._cursor % len(others)
            chosen = (others[start:] + others[:start])[: self._per_cycle]
            self._cursor = start + len(chosen)
            for rank in chosen:
                self._known[rank] = self._fetch(rank)
        return [
            local,
            *(self._known.get(r) or RankStatus(r, up=False, error="not polled yet") for r in others),
        ]

    def _fetch(self, rank: int) -> RankStatus:
        endpoint = self._endpoints.get(rank)
        url = progress_url(endpoint) if endpoint else None
        if url is None:
            return RankStatus(rank, up=False, error="no /metrics endpoint known yet")
        try:
            return status_from_payload(fetch_progress(url, self._timeout))
        except (OSError, ValueError) as exc:
            return RankStatus(rank, up=False, error=f"{url}: {getattr(exc, 'reason', exc)}")

    def draw(self, statuses: list[RankStatus]) -> None:
        shown = slowest_first(statuses, self._max_rows)
        self._console.show(
            render_lines(shown, total=statuses), compact_line(shown, total=statuses), section="ranks"
        )

    def log_changes(self, statuses: list[RankStatus]) -> None:
        """Off a terminal, one line per anomaly episode that started or ended since the last poll
        (on a terminal the redrawn view shows them)."""
        changes = episode_changes(self._episodes, statuses)
        if not self._console.tty:
            for line in changes:
                self._console.write(line)

    def _run(self) -> None:
        name_native("otel-ml-rankview")
        last_line = 0.0
        while not self._stop.wait(self._interval):
            try:
                statuses = self.poll()
                self.log_changes(statuses)
                if not any(s.bars for s in statuses):
                    continue
                if self._console.tty or time.monotonic() - last_line >= self._log_interval:
                    self.draw(statuses)
                    last_line = time.monotonic()
            except Exception:  # noqa: BLE001 - the view is a courtesy; it must not die loudly
                continue

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)
