"""CUDA events for region timing: recorded on the training thread, resolved off it, never raising.

``record()`` runs on the training thread (and on autograd's device threads for module backward
regions): it takes an event of the *current* device from that device's pool and records it on
the current stream, so an event is never recorded on a device it is not bound to. It records
nothing while the current stream is capturing a CUDA graph (an event captured into a graph can
never be queried). The export thread calls :meth:`CudaEvents.resolve` under the event's own
device guard and in thread-local capture mode (:class:`otel_ml.gpu.DeviceCalls`): it reads the
GPU time once *both* events completed. Nothing here calls ``synchronize()``.

Every CUDA error is caught, counted (``otel_ml_export_errors_total{exporter="timing"}``), logged
once, and the region falls back to its host time: telemetry never raises into training, and an
unreadable record never blocks the ones behind it.

Example::

    events = CudaEvents(torch.cuda, DeviceCalls(torch.cuda), on_error=health_timing_error)
    start = events.record(); ...; end = events.record()
    ms = events.resolve(start, end)     # PENDING until the GPU got there; None when unreadable
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from otel_ml._logging import warn_once
from otel_ml.gpu import DeviceCalls, initialized_cuda

#: What :meth:`CudaEvents.resolve` returns while the GPU has not reached both events yet.
PENDING = object()


class GpuEvent:
    """A pooled ``torch.cuda.Event(enable_timing=True)`` and the device it is bound to."""

    __slots__ = ("device", "event")

    def __init__(self, event: Any, device: int) -> None:
        self.event = event
        self.device = device


class CudaEvents:
    """Per-device pools of timing events (see module docstring).

    Example::

        events = CudaEvents(torch.cuda, DeviceCalls(torch.cuda), on_error=lambda: None)
        ev = events.record()      # a GpuEvent, or None (nothing recorded)
    """

    def __init__(
        self,
        cuda: Any,
        calls: DeviceCalls,
        *,
        on_error: Callable[[], None] = lambda: None,
        max_pool: int = 4096,
    ) -> None:
        self._cuda = cuda
        self._calls = calls
        self._on_error = on_error
        self._free: dict[int, list[GpuEvent]] = {}
        self._max_pool = max_pool
        #: Devices events were recorded on (the devices this rank works on).
        self.devices: set[int] = set()
        #: Set by the export thread (:meth:`find_work_device`); read on the training thread.
        self.work_device: int | None = None

    def _failed(self, where: str, exc: BaseException) -> None:
        self._on_error()
        warn_once(
            f"cuda-events:{where}",
            "otel_ml: CUDA event %s failed (%r); those regions use host time "
            '(counted in otel_ml_export_errors_total{exporter="timing"})',
            where,
            exc,
        )

    def record(self) -> GpuEvent | None:
        """Record an event on the current stream (training thread); None when nothing was recorded.

        The stream is the current one of the current device, unless this rank works on one
        other device (:meth:`find_work_device`): a torchrun script that moves its model to
        ``cuda:N`` without ``set_device`` runs its kernels there while the current device stays 0.
        """
        cuda = self._cuda
        try:
            device = cuda.current_device()
            work = self.work_device
            if work is None or work == device:
                return self._record(cuda, device)
            with cuda.device(work):
                return self._record(cuda, work)
        except Exception as exc:  # noqa: BLE001 - a CUDA error must never reach the training loop
            self._failed("record", exc)
            return None

    def _record(self, cuda: Any, device: int) -> GpuEvent | None:
        if cuda.is_current_stream_capturing():
            return None  # an event captured into a graph could never be read
        pool = self._free.get(device)
        if pool:
            ev = pool.pop()
        else:
            ev = GpuEvent(cuda.Event(enable_timing=True), device)
            self.devices.add(device)
        ev.event.record()  # the current stream of ``device``: the event's own device
        return ev

    def find_work_device(self) -> int | None:
        """The one device this process's allocator holds memory on, or None (export thread).

        Allocator counters are host-side bookkeeping: no context, no sync. With memory on
        several devices (or none yet), regions use the training thread's current device.
        """
        cuda = self._cuda
        try:
            used = [
                index
                for index in range(cuda.device_count())
                if cuda.memory_stats(index).get("reserved_bytes.all.current", 0) > 0
            ]
        except Exception as exc:  # noqa: BLE001
            self._failed("memory_stats", exc)
            return self.work_device
        self.work_device = used[0] if len(used) == 1 else None
        return self.work_device

    def resolve(self, start: GpuEvent | None, end: GpuEvent | None) -> Any:
        """GPU milliseconds from ``start`` to ``end``; :data:`PENDING` while the GPU is not at both;
        None when they cannot be read (a missing end, two devices, a CUDA error: counted)."""
        if start is None or end is None:
            self.release(start, end)
            return None
        if start.device != end.device:  # entered on one device, left on another
            self._failed("resolve", ValueError(f"events on cuda:{start.device} and cuda:{end.device}"))
            self.release(start, end)
            return None
        try:
            with self._calls.on(start.device):
                if not (end.event.query() and start.event.query()):
                    return PENDING
                ms = float(start.event.elapsed_time(end.event))
        except Exception as exc:  # noqa: BLE001 - drop the pair (not pooled: its state is unknown)
            self._failed("query", exc)
            return None
        self.release(start, end)
        return ms

    def release(self, *events: GpuEvent | None) -> None:
        """Give events back to their device's pool (or drop them when it is full)."""
        for ev in events:
            if ev is not None:
                pool = self._free.setdefault(ev.device, [])
                if len(pool) < self._max_pool:
                    pool.append(ev)


def cuda_events_if_active(
    mode: str,
    on_error: Callable[[], None] = lambda: None,
    cuda: Any | None = None,
    cudart: Any | None = None,
) -> CudaEvents | None:
    """Events when ``mode`` is not ``off`` and this process already initialised CUDA.

    ``on`` and ``auto`` behave alike: otel_ml never initialises CUDA itself (the pump retries
    until the training code has). ``cuda``/``cudart`` replace ``torch.cuda`` and the loaded CUDA
    runtime (the tests' stand-in). Safe to call from any thread.
    """
    if mode == "off":
        return None
    if cuda is None:
        cuda = initialized_cuda()
    elif not cuda.is_initialized():
        cuda = None
    if cuda is None:
        return None
    return CudaEvents(cuda, DeviceCalls(cuda, cudart), on_error=on_error)
