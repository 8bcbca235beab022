"""Memory readings taken at collection time, off the training thread.

:class:`GpuMemorySampler` reads the CUDA caching allocator's counters (host-side bookkeeping, no
device sync, no new CUDA context) for each device this process has used. The backend is injected
so the same code runs against ``torch.cuda`` on a GPU machine and against a stand-in on CPU.

Example::

    sampler = GpuMemorySampler()          # torch.cuda when torch is already imported
    for device, allocated, reserved, peak, total in sampler.read():
        ...
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from otel_ml import semconv

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_memory_bytes() -> int:
    """Current resident set size of this process (peak RSS where /proc is unavailable)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class GpuMemorySampler:
    """Per-device allocated, reserved and peak bytes from a ``torch.cuda``-like backend.

    With no backend given it uses ``torch.cuda`` if torch is already imported and CUDA is
    initialised in this process; otherwise :meth:`read` yields nothing (series absent, as
    documented). It never initialises CUDA itself: doing so from a background thread would
    create a context the training code did not ask for.

    Example::

        list(GpuMemorySampler(backend=torch.cuda).read())  # [("cuda:0", 1024, 2097152, 4096, 8e10)]
    """

    def __init__(self, backend: Any | None = None) -> None:
        self._backend = backend
        self._totals: dict[int, int] = {}

    def _resolve(self) -> Any | None:
        if self._backend is not None:
            return self._backend
        torch = sys.modules.get("torch")
        cuda = getattr(torch, "cuda", None)
        if cuda is None:
            return None
        try:
            if cuda.is_available() and cuda.is_initialized():
                return cuda
        except Exception:  # noqa: BLE001 - a broken driver must not break collection
            return None
        return None

    def read(self) -> Iterator[tuple[str, int, int, int, int]]:
        """(device, allocated, reserved, peak, total capacity) per device this process uses."""
        backend = self._resolve()
        if backend is None:
            return
        for index in range(backend.device_count()):
            reserved = backend.memory_reserved(index)
            if reserved == 0 and index != backend.current_device():
                continue  # a device this process never touched
            total = self._totals.get(index)
            if total is None:
                total = self._totals[index] = int(backend.get_device_properties(index).total_memory)
            yield (
                f"cuda:{index}",
                backend.memory_allocated(index),
                reserved,
                backend.max_memory_allocated(index),
                total,
            )


def register_system_metrics(
    meter: Meter, attributes: Mapping[str, str], sampler: GpuMemorySampler | None = None
) -> None:
    """Create the process memory and GPU memory gauges on ``meter``."""
    sampler = sampler or GpuMemorySampler()
    attrs = dict(attributes)
    cache: dict[str, list[tuple[str, int, int, int, int]]] = {}

    def rss(_: CallbackOptions) -> Iterable[Observation]:
        return (Observation(resident_memory_bytes(), attrs),)

    def gpu(column: int) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(_: CallbackOptions) -> Iterable[Observation]:
            if column == 1:  # the first GPU gauge reads the allocator once per collection
                cache["rows"] = list(sampler.read())
            return [
                Observation(row[column], {**attrs, semconv.LABEL_DEVICE: row[0]})
                for row in cache.get("rows", ())
            ]

        return callback

    spec = semconv.PROCESS_RESIDENT_MEMORY
    meter.create_observable_gauge(spec.name, [rss], spec.unit, spec.description)
    for spec, column in (
        (semconv.GPU_MEMORY_ALLOCATED, 1),
        (semconv.GPU_MEMORY_RESERVED, 2),
        (semconv.GPU_MEMORY_PEAK, 3),
        (semconv.GPU_MEMORY_TOTAL, 4),
    ):
        meter.create_observable_gauge(spec.name, [gpu(column)], spec.unit, spec.description)
