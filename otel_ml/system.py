"""Memory readings and GPU identity, taken at collection time, off the training thread.

:class:`GpuMemorySampler` reads the CUDA caching allocator's counters (host-side bookkeeping: no
device sync, no CUDA context) with one ``memory_stats(device)`` per device per collection, for
the devices this rank uses: those its allocator holds memory on, else its own device
(``LOCAL_RANK``, as torchrun assigns them). It never asks for the *current* device: on a
background thread that is always 0, which would make every rank report GPU 0. It never
initialises CUDA either (:func:`otel_ml.gpu.initialized_cuda`).

``otel_ml_gpu_info{device, gpu_uuid, pci_bus_id, gpu_name, host} 1`` names each of those GPUs
the way the DCGM exporter does (``UUID="GPU-..."``), so DCGM metrics join to ranks in PromQL.

:class:`SystemGauges` takes one reading per collection in :meth:`SystemGauges.prepare` (the
runtime's pre-collection hook), which all its gauges then read.

Example::

    sampler = GpuMemorySampler(own_device=local_rank)   # torch.cuda once CUDA is initialised
    for row in sampler.read():
        row.device, row.allocated, row.reserved, row.peak, row.total
"""

from __future__ import annotations

import os
import resource
import socket
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from otel_ml import semconv
from otel_ml._logging import warn_once
from otel_ml.gpu import initialized_cuda

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


#: (pid, fd) of this process's open /proc/self/statm: re-read with pread, reopened after a fork
#: (an inherited descriptor would still read the parent's numbers).
_statm: tuple[int, int] | None = None


def _statm_fd() -> int:
    global _statm
    pid = os.getpid()
    if _statm is None or _statm[0] != pid:
        _statm = (pid, os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC))
    return _statm[1]


def resident_memory_bytes() -> int:
    """Current resident set size of this process (peak RSS where /proc is unavailable).

    One ``pread`` of a kept-open ``/proc/self/statm`` (no open/close per scrape: ~10x cheaper).
    """
    try:
        return int(os.pread(_statm_fd(), 256, 0).split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


@dataclass(frozen=True)
class GpuReading:
    """One device of this rank at one collection."""

    device: str
    allocated: int
    reserved: int
    peak: int
    total: int
    uuid: str
    pci_bus_id: str
    name: str


def _uuid(properties: Any) -> str:
    raw = str(getattr(properties, "uuid", "") or "")
    return raw if not raw or raw.startswith(("GPU-", "MIG-")) else f"GPU-{raw}"


def _pci_bus_id(properties: Any) -> str:
    """``00000000:18:00.0``, the form of ``nvidia-smi`` and the DCGM exporter's ``pci_bus_id``."""
    try:
        domain, bus, device = (
            int(properties.pci_domain_id),
            int(properties.pci_bus_id),
            int(properties.pci_device_id),
        )
    except (AttributeError, TypeError, ValueError):
        return ""
    return f"{domain:08X}:{bus:02X}:{device:02X}.0"


class GpuMemorySampler:
    """Per-device allocator counters and identity from a ``torch.cuda``-like backend.

    With no backend it uses ``torch.cuda`` once this process initialised CUDA; until then
    :meth:`read` yields nothing (series absent, as documented). ``own_device`` is this rank's
    device (its local rank), reported even before the allocator holds memory there.

    Example::

        list(GpuMemorySampler(backend=torch.cuda, own_device=0).read())
    """

    def __init__(
        self,
        backend: Any | None = None,
        *,
        own_device: int | None = None,
        on_error: Callable[[], None] = lambda: None,
    ) -> None:
        self._backend = backend
        self._own = own_device
        self._on_error = on_error
        self._identity: dict[int, tuple[int, str, str, str]] = {}  # total, uuid, pci, name

    def _resolve(self) -> Any | None:
        if self._backend is not None:
            return self._backend if self._backend.is_initialized() else None
        return initialized_cuda()

    def _describe(self, backend: Any, index: int) -> tuple[int, str, str, str]:
        known = self._identity.get(index)
        if known is None:
            props = backend.get_device_properties(index)
            known = (int(props.total_memory), _uuid(props), _pci_bus_id(props), str(props.name))
            self._identity[index] = known
        return known

    def read(self) -> Iterator[GpuReading]:
        """One reading per device this process uses; a device that fails is skipped (counted)."""
        try:
            backend = self._resolve()
            count = backend.device_count() if backend is not None else 0
        except Exception as exc:  # noqa: BLE001 - a broken driver must not break collection
            self._failed(exc)
            return
        own = self._own if self._own is not None and 0 <= self._own < count else None
        if own is None and count == 1:
            own = 0  # one visible device per rank (CUDA_VISIBLE_DEVICES set per rank)
        for index in range(count):
            try:
                stats = backend.memory_stats(index)
                reserved = int(stats.get("reserved_bytes.all.current", 0))
                if reserved == 0 and index != own:
                    continue  # a device this process never allocated on
                total, uuid, pci, name = self._describe(backend, index)
                yield GpuReading(
                    f"cuda:{index}",
                    int(stats.get("allocated_bytes.all.current", 0)),
                    reserved,
                    int(stats.get("allocated_bytes.all.peak", 0)),
                    total,
                    uuid,
                    pci,
                    name,
                )
            except Exception as exc:  # noqa: BLE001
                self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        self._on_error()
        warn_once("gpu-memory", "otel_ml: reading GPU memory failed (%r); counted, retried next time", exc)


class SystemGauges:
    """Process memory, GPU memory and GPU identity gauges on ``meter`` (see module docstring).

    Example::

        gauges = SystemGauges(meter, {"rank": "0", "run_id": "r"}, GpuMemorySampler())
        gauges.prepare()   # before each collection: one GPU reading for all the gauges
    """

    def __init__(self, meter: Meter, attributes: Mapping[str, str], sampler: GpuMemorySampler) -> None:
        self._attrs = dict(attributes)
        self._sampler = sampler
        self._rows: list[GpuReading] = []
        self._host = socket.gethostname()
        spec = semconv.PROCESS_RESIDENT_MEMORY
        meter.create_observable_gauge(spec.name, [self._rss], spec.unit, spec.description)
        for spec, field in (
            (semconv.GPU_MEMORY_ALLOCATED, "allocated"),
            (semconv.GPU_MEMORY_RESERVED, "reserved"),
            (semconv.GPU_MEMORY_PEAK, "peak"),
            (semconv.GPU_MEMORY_TOTAL, "total"),
        ):
            meter.create_observable_gauge(spec.name, [self._column(field)], spec.unit, spec.description)
        spec = semconv.GPU_INFO
        meter.create_observable_gauge(spec.name, [self._info], spec.unit, spec.description)

    def prepare(self) -> None:
        """Read the GPUs once for the coming collection."""
        self._rows = list(self._sampler.read())

    def _rss(self, _: CallbackOptions) -> Iterable[Observation]:
        return (Observation(resident_memory_bytes(), self._attrs),)

    def _column(self, field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(_: CallbackOptions) -> Iterable[Observation]:
            return [
                Observation(getattr(row, field), {**self._attrs, semconv.LABEL_DEVICE: row.device})
                for row in self._rows
            ]

        return callback

    def _info(self, _: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(
                1,
                {
                    **self._attrs,
                    semconv.LABEL_DEVICE: row.device,
                    semconv.LABEL_GPU_UUID: row.uuid,
                    semconv.LABEL_PCI_BUS_ID: row.pci_bus_id,
                    semconv.LABEL_GPU_NAME: row.name,
                    semconv.LABEL_HOST: self._host,
                },
            )
            for row in self._rows
        ]
