"""The ``/progress`` document: one rank's open bars, step and loss, served beside ``/metrics``.

Rank 0's view (:mod:`otel_ml.progress.poller`) fetches it from every rank; ``otel-ml top`` reads
the same rows from ``/metrics``. The document is JSON::

    {"rank": 1, "run_id": "r", "time": 1764700000.0, "step": 26, "loss": 0.61,
     "bars": [{"task": "train", "unit": "step", "parent": "", "completed": 26, ...}]}

Example::

    payload = ProgressPayload(board, rank=0, run_id="r", training=telemetry.training)
    body, content_type = payload.route()
    status_from_payload(payload.document()).main_bar()
"""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any, Protocol

from otel_ml.progress.board import BarSnapshot, ProgressBoard
from otel_ml.progress.render import RankStatus

PROGRESS_PATH = "/progress"
CONTENT_TYPE = "application/json"


class TrainingState(Protocol):
    """What the payload reads of the training metrics (:class:`otel_ml.training.TrainingMetrics`)."""

    @property
    def step(self) -> int | None: ...

    def latest(self, key: str) -> float | None: ...


class ProgressPayload:
    """Builds this rank's ``/progress`` document from the board and the training state.

    Example::

        ProgressPayload(ProgressBoard(), rank=0, run_id="r").document()["bars"]   # []
    """

    def __init__(
        self, board: ProgressBoard, rank: int, run_id: str, training: TrainingState | None = None
    ) -> None:
        self._board = board
        self._rank = rank
        self._run_id = run_id
        self._training = training

    def document(self) -> dict[str, Any]:
        training = self._training
        return {
            "rank": self._rank,
            "run_id": self._run_id,
            "time": time.time(),
            "bars": [row.as_dict() for row in self._board.snapshot()],
            "step": None if training is None else training.step,
            "loss": None if training is None else training.latest("loss"),
        }

    def route(self) -> tuple[bytes, str]:
        """The HTTP body and content type for ``GET /progress``."""
        return json.dumps(self.document()).encode(), CONTENT_TYPE


def status_from_payload(payload: dict[str, Any]) -> RankStatus:
    """A :class:`RankStatus` from a ``/progress`` document."""
    bars = [BarSnapshot(**row) for row in payload.get("bars", [])]
    return RankStatus(
        rank=int(payload.get("rank", 0)), bars=bars, step=payload.get("step"), loss=payload.get("loss")
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
