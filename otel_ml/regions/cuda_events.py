"""CUDA events for region timing, recorded on the training thread and resolved off it.

``record()`` enqueues an event on the current stream and returns at once; the export thread
asks ``ready()`` (``event.query()``) and, once both ends of a region are done, reads
``elapsed_ms()``. Nothing here calls ``synchronize()``. Events are pooled and reused.

This module only runs where CUDA is initialised; :class:`otel_ml.regions.aggregator.Aggregator` drives the
same resolve path on CPU with any object offering ``record``/``ready``/``elapsed_ms``/``release``.

Example::

    events = CudaEvents()
    start = events.record(); ...; end = events.record()
    if events.ready(end):
        gpu_ms = events.elapsed_ms(start, end)
"""

from __future__ import annotations

import sys
from collections import deque
from typing import Any


class CudaEvents:
    """A pool of ``torch.cuda.Event(enable_timing=True)`` objects.

    Example::

        pool = CudaEvents()
        ev = pool.record()
    """

    def __init__(self, max_pool: int = 4096) -> None:
        import torch

        self._event = torch.cuda.Event
        self._free: deque[Any] = deque()
        self._max_pool = max_pool

    def record(self) -> Any:
        try:
            event = self._free.pop()
        except IndexError:
            event = self._event(enable_timing=True)
        event.record()
        return event

    def ready(self, event: Any) -> bool:
        return bool(event.query())

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return float(start.elapsed_time(end))

    def release(self, *events: Any) -> None:
        for event in events:
            if event is not None and len(self._free) < self._max_pool:
                self._free.append(event)


def cuda_events_if_active(mode: str) -> CudaEvents | None:
    """A pool when ``mode`` is ``on``, or ``auto`` and this process already initialised CUDA."""
    if mode == "off":
        return None
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    try:
        active = cuda is not None and cuda.is_available() and (mode == "on" or cuda.is_initialized())
    except Exception:  # noqa: BLE001 - a broken driver means host timing
        return None
    return CudaEvents() if active else None
