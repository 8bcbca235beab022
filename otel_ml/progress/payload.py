"""The ``/progress`` document: one rank's open bars, step, loss, anomalies and step timing.

Served beside ``/metrics``. Rank 0's view (:mod:`otel_ml.progress.poller`) fetches it from every
rank; ``otel-ml top`` reads the same rows from ``/metrics``. The document is JSON::

    {"rank": 1, "run_id": "r", "time": 1764700000.0, "step": 26, "loss": 0.61,
     "bars": [{"task": "train", "unit": "step", "parent": "", "completed": 26, ...}],
     "anomalies": [{"type": "nonfinite", "key": "loss", "first_step": 20, "active": true, ...}],
     "timing": {"steps": 26, "step_time_s": 1.4, "regions_s": {"forward": 0.5, "backward": 0.8}}}

``anomalies`` holds the active episodes and the last :data:`MAX_ENDED` ended ones; ``timing``
the steps, step time and time in each top-level region (at most :data:`MAX_REGIONS`, the
largest) over about the last :data:`WINDOW_S` seconds (all of it in a younger run), from which
the view tells the straggler (:func:`otel_ml.progress.render.slowest`): a window, because the
first steps of a run (compilation, warm-up) would blur a cumulative mean for minutes.

Example::

    payload = ProgressPayload(board, rank=0, run_id="r", training=telemetry.training)
    body, content_type = payload.route()
    status_from_payload(payload.document()).main_bar()
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from otel_ml.progress.board import BarSnapshot, ProgressBoard
from otel_ml.progress.render import Flag, RankStatus, region_times, top_level_totals
from otel_ml.sources import EpisodeSource, RegionTotals, TrainingState

PROGRESS_PATH = "/progress"
CONTENT_TYPE = "application/json"
#: Ended anomaly episodes a document carries (the newest); active ones are always there.
MAX_ENDED = 5
#: Top-level regions a document carries (the largest).
MAX_REGIONS = 32
#: Longest episode message carried.
MAX_MESSAGE = 200
#: Seconds of step timing a document describes (once the run is that old).
WINDOW_S = 30.0


def bounded_episodes(episodes: list[dict[str, Any]], max_ended: int = MAX_ENDED) -> list[dict[str, Any]]:
    """The active episodes and the newest ``max_ended`` ended ones, oldest first, messages cut."""
    ended = [i for i, e in enumerate(episodes) if not e.get("active")]
    keep = set(ended[-max_ended:]) if max_ended > 0 else set()
    out = []
    for index, episode in enumerate(episodes):
        if episode.get("active") or index in keep:
            row = dict(episode)
            row["message"] = str(row.get("message", ""))[:MAX_MESSAGE]
            out.append(row)
    return out


class ProgressPayload:
    """Builds this rank's ``/progress`` document (see module docstring).

    ``anomalies`` and ``regions`` are optional sources; without them the document has no
    episodes and no timing.

    Example::

        ProgressPayload(ProgressBoard(), rank=0, run_id="r").document()["bars"]   # []
    """

    def __init__(
        self,
        board: ProgressBoard,
        rank: int,
        run_id: str,
        training: TrainingState | None = None,
        *,
        anomalies: EpisodeSource | None = None,
        regions: RegionTotals | None = None,
        clock: Callable[[], float] = time.monotonic,
        window: float = WINDOW_S,
    ) -> None:
        self._board = board
        self._rank = rank
        self._run_id = run_id
        self._training = training
        self._anomalies = anomalies
        self._regions = regions
        self._clock = clock
        self._window = window
        # (time, steps, step time, seconds per region), oldest first; one sample per window/4 s.
        self._history: deque[tuple[float, int, float, dict[str, float]]] = deque()
        self._lock = threading.Lock()  # documents are built on the server's request threads

    def _timing(self) -> dict[str, Any] | None:
        regions = self._regions
        if regions is None:
            return None
        now, steps, step_time = self._clock(), regions.steps, regions.step_time
        totals = top_level_totals(regions.self_totals())
        with self._lock:
            history = self._history
            if not history or now - history[-1][0] >= self._window / 4:
                history.append((now, steps, step_time, totals))
            while len(history) > 1 and now - history[1][0] >= self._window:
                history.popleft()
            start, steps0, time0, totals0 = history[0] if steps > history[0][1] else (now, 0, 0.0, {})
        window = {k: v - totals0.get(k, 0.0) for k, v in totals.items()}
        largest = sorted(window.items(), key=lambda item: item[1], reverse=True)[:MAX_REGIONS]
        return {
            "steps": steps - steps0,
            "step_time_s": step_time - time0,
            "regions_s": dict(largest),
            "window_s": now - start,
        }

    def document(self) -> dict[str, Any]:
        training = self._training
        anomalies = self._anomalies
        return {
            "rank": self._rank,
            "run_id": self._run_id,
            "time": time.time(),
            "bars": [row.as_dict() for row in self._board.snapshot()],
            "step": None if training is None else training.step,
            "loss": None if training is None else training.latest("loss"),
            "anomalies": [] if anomalies is None else bounded_episodes(anomalies.episodes()),
            "timing": self._timing(),
        }

    def route(self) -> tuple[bytes, str]:
        """The HTTP body and content type for ``GET /progress``."""
        return json.dumps(self.document()).encode(), CONTENT_TYPE


def _timing_fields(timing: Any) -> tuple[float | None, dict[str, float]]:
    if not isinstance(timing, Mapping):
        return None, {}
    totals = timing.get("regions_s")
    try:
        steps = int(timing.get("steps") or 0)
        step_time = float(timing.get("step_time_s") or 0.0)
        paths = {str(k): float(v) for k, v in totals.items()} if isinstance(totals, Mapping) else {}
    except (TypeError, ValueError):
        return None, {}
    return region_times(paths, steps, step_time)


def status_from_payload(payload: dict[str, Any]) -> RankStatus:
    """A :class:`RankStatus` from a ``/progress`` document (older documents lack anomalies and
    timing: the status then has none)."""
    bars = [BarSnapshot(**row) for row in payload.get("bars", [])]
    episodes = payload.get("anomalies") or []
    flags = [Flag.from_dict(row) for row in episodes if isinstance(row, Mapping)]
    step_ms, region_ms = _timing_fields(payload.get("timing"))
    return RankStatus(
        rank=int(payload.get("rank", 0)),
        bars=bars,
        step=payload.get("step"),
        loss=payload.get("loss"),
        anomalies=flags,
        step_ms=step_ms,
        region_ms=region_ms,
    )


def fetch_progress(url: str, timeout: float) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


def progress_url(endpoint: dict[str, Any]) -> str | None:
    """Where a rank serves ``/progress``, from its endpoint record."""
    url = endpoint.get("url")
    if not url:
        return None
    return url.rsplit("/metrics", 1)[0] + PROGRESS_PATH
