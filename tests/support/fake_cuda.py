"""A strict stand-in for the part of ``torch.cuda`` otel_ml touches, for a machine without a GPU.

Stricter than the real thing wherever the two differ, never more lenient:

* every thread has its own current device (0 until it sets one) and its own current stream per
  device; ``device(i)`` is the guard that switches it for a block;
* an event binds to the device of the stream it is first recorded on; recording it on a stream
  of another device raises, as CUDA does (``Event device X does not match recording stream's
  device Y``);
* a call that needs a context (``query``, ``elapsed_time``, ``record``, the capture-mode switch),
  made from a thread whose current device is not the object's device, is *unguarded*; one whose
  current device this process never used makes a *stray context* there (about 500 MiB on a
  real GPU). Both are recorded, never silently allowed;
* ``elapsed_time`` raises unless both events were recorded, completed, on one device, with
  timing, and outside a capture (real CUDA raises for most of these too);
* work runs on the fake GPU only when the test says so (:meth:`FakeCuda.complete`): an event is
  complete once its stream has executed up to it, and reading a non-blocking device-to-host copy
  raises unless an event recorded behind it on its stream was seen complete (``query()``);
* a CUDA tensor (:meth:`FakeCuda.tensor`, one element or many) allows only the ops that are
  asynchronous on a GPU (:data:`ASYNC_OPS`, each a kernel on its device's current stream, refused
  inside a capture) and ``to("cpu", non_blocking=True)``; ``item()``, ``tolist()``, ``bool()``,
  ``float()``, a blocking copy, shape reads and every other op are recorded in
  :attr:`FakeCuda.forbidden` and raise;
* ``is_available()`` and any call that would initialise CUDA before the test did count as a
  ``cuInit``; ``synchronize()`` anywhere is a test failure;
* a capture (:meth:`FakeCuda.graph`) in the default global mode is broken by a context-needing
  call from any other thread that has not switched itself to thread-local capture mode
  (``cudaThreadExchangeStreamCaptureMode``, offered as :attr:`FakeCuda.cudart`);
* :meth:`FakeCuda.fail_next` makes the next calls of any operation raise ``CudaError``.

Example::

    cuda = FakeCuda(devices=2)
    cuda.set_device(1)
    start = cuda.Event(enable_timing=True); start.record()
    cuda.kernel(5.0)                      # 5 ms of work on the current stream
    end = cuda.Event(enable_timing=True); end.record()
    cuda.complete()                       # the GPU catches up
    start.elapsed_time(end)               # 5.0 (after a device(1) guard on other threads)
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

GLOBAL, THREAD_LOCAL, RELAXED = 0, 1, 2


class CudaError(RuntimeError):
    """What a failing CUDA call raises (``torch.AcceleratorError`` / ``RuntimeError`` on a GPU)."""


@dataclass
class Properties:
    name: str
    total_memory: int
    uuid: str
    pci_domain_id: int
    pci_bus_id: int
    pci_device_id: int


class Stream:
    """A queue of work on one device; it executes only when the test completes it."""

    def __init__(self, cuda: FakeCuda, device: int, name: str = "side") -> None:
        self.cuda = cuda
        self.device = device
        self.name = name
        self.ops: list[tuple[str, float, Any]] = []  # (kind, milliseconds, payload)
        self.executed = 0  # ops done
        self.observed = 0  # ops otel_ml knows are done: up to the last event it saw complete
        self.time_ms = 0.0  # the stream's GPU clock after the executed ops
        self.capture: _Capture | None = None

    def enqueue(self, kind: str, ms: float = 0.0, payload: Any = None) -> int:
        self.ops.append((kind, ms, payload))
        return len(self.ops)  # done once executed >= this

    def run(self, upto: int | None = None) -> None:
        upto = len(self.ops) if upto is None else min(upto, len(self.ops))
        while self.executed < upto:
            kind, ms, payload = self.ops[self.executed]
            self.time_ms += ms
            if kind == "event":
                payload.time_ms = self.time_ms
            elif kind == "copy":
                payload.landed = True
            self.executed += 1

    def synchronize(self) -> None:
        self.cuda.forbid("Stream.synchronize()")
        raise AssertionError("otel_ml called Stream.synchronize()")

    def __repr__(self) -> str:
        return f"<fake {self.name} stream of cuda:{self.device}>"


@dataclass
class _Capture:
    thread: int
    mode: int
    broken: str | None = None


class _Thread(threading.local):
    def __init__(self) -> None:
        self.device = 0
        self.streams: dict[int, Stream] = {}
        self.capture_mode = GLOBAL


class FakeCuda:
    """``torch.cuda`` as a strict CPU stand-in (see module docstring)."""

    def __init__(self, devices: int = 2, *, initialized: bool = True, total_memory: int = 80 << 30) -> None:
        self._count = devices
        self._initialized = initialized
        self._thread = _Thread()
        self._lock = threading.RLock()
        self.default_streams = {d: Stream(self, d, "default") for d in range(devices)}
        self.properties = {
            d: Properties(
                f"Fake H{d}",
                total_memory,
                f"{d:08x}-0000-4000-8000-{d:012x}",
                0,
                0x18 + d,
                0,
            )
            for d in range(devices)
        }
        #: Devices the training code (the test) has used: set_device, tensors, its own records.
        self.used: set[int] = set()
        self.allocated = dict.fromkeys(range(devices), 0)
        self.reserved = dict.fromkeys(range(devices), 0)
        self.peak = dict.fromkeys(range(devices), 0)
        #: What otel_ml must never do, as it happened: (call, thread name, detail).
        self.cuinit: list[tuple[str, str]] = []
        self.stray_contexts: list[tuple[int, str, str]] = []
        self.unguarded: list[tuple[str, str, int, int]] = []
        self.calls: Counter[str] = Counter()
        self.memory_stats_calls: Counter[int] = Counter()
        self._fail: Counter[str] = Counter()
        self.early_reads = 0
        #: Host syncs and early reads otel_ml made: (what, thread name). Each also raised.
        self.forbidden: list[tuple[str, str]] = []
        #: Kernels launched on CUDA tensors, per device.
        self.launches: Counter[int] = Counter()
        self.captures: list[_Capture] = []  # in progress
        self.ended_captures: list[_Capture] = []
        self._side_streams: list[Stream] = []
        self.Event = _event_class(self)
        self.cudart = _Cudart(self)

    # -------------------------------------------------------------- test controls
    def fail_next(self, operation: str, times: int = 1) -> None:
        """Make the next ``times`` calls of ``operation`` (``record``, ``query``, ...) raise."""
        self._fail[operation] += times

    def kernel(self, ms: float, stream: Stream | None = None) -> None:
        """Enqueue ``ms`` of GPU work on ``stream`` (default: this thread's current stream)."""
        (stream or self.current_stream()).enqueue("kernel", ms)

    def complete(self, stream: Stream | None = None) -> None:
        """Let the GPU execute everything enqueued (on ``stream`` only, when given)."""
        with self._lock:
            for s in [stream] if stream is not None else self._streams():
                s.run()

    def use(self, device: int) -> None:
        """Mark ``device`` as used by the training code (it has a context there)."""
        self.used.add(device)

    def set_memory(self, device: int, allocated: int, reserved: int, peak: int) -> None:
        self.allocated[device], self.reserved[device], self.peak[device] = allocated, reserved, peak
        self.use(device)

    def clean(self) -> bool:
        """Nothing otel_ml must never do has happened."""
        bad = self.cuinit or self.stray_contexts or self.unguarded or self.forbidden
        return not (bad or self.broken_captures())

    def forbid(self, what: str) -> None:
        """Record a host sync or an early read (the caller raises)."""
        self.forbidden.append((what, threading.current_thread().name))

    def launch(self, device: int, name: str) -> None:
        """A kernel on ``device``'s current stream of this thread; inside a capture it is forbidden."""
        stream = self._thread.streams.get(device) or self.default_streams[device]
        if stream.capture is not None:
            self.forbid(f"{name} captured into the training code's CUDA graph")
            raise AssertionError(f"otel_ml enqueued {name} into a CUDA graph capture")
        self.launches[device] += 1
        stream.enqueue("kernel", 0.0, name)

    def broken_captures(self) -> list[str]:
        return [c.broken for c in (*self.captures, *self.ended_captures) if c.broken]

    def _streams(self) -> list[Stream]:
        return [*self.default_streams.values(), *self._side_streams]

    # -------------------------------------------------------------- internals
    def _check(self, operation: str) -> None:
        self.calls[operation] += 1
        if self._fail[operation] > 0:
            self._fail[operation] -= 1
            raise CudaError(f"CUDA error: injected failure in {operation}")

    def _touch(self, call: str) -> None:
        """A call that initialises CUDA: a cuInit if nobody did it yet."""
        if not self._initialized:
            self.cuinit.append((call, threading.current_thread().name))
            self._initialized = True

    def _context(self, call: str) -> None:
        """A call that runs in the context of this thread's current device (made if missing)."""
        current = self._thread.device
        if threading.current_thread() is threading.main_thread():
            self.used.add(current)  # the training thread's own device
        elif current not in self.used:
            self.stray_contexts.append((current, threading.current_thread().name, call))

    def _needs_context(self, call: str, device: int | None) -> None:
        """A context-needing call on an object of ``device``, which global captures forbid."""
        self._context(call)
        current = self._thread.device
        name = threading.current_thread().name
        if device is not None and device != current:
            self.unguarded.append((call, name, current, device))
        for capture in self.captures:
            other = capture.thread != threading.get_ident()
            unsafe = capture.mode == GLOBAL and self._thread.capture_mode == GLOBAL
            if capture.broken is None and other and unsafe:
                capture.broken = f"{call} from {name} during a global-mode capture"
                raise CudaError("operation not permitted when stream is capturing")

    def _device_index(self, device: Any) -> int:
        if device is None:
            return self._thread.device
        index = getattr(device, "index", device)
        if isinstance(device, str):
            index = int(device.split(":")[1]) if ":" in device else self._thread.device
        if not 0 <= int(index) < self._count:
            raise CudaError(f"invalid device ordinal {index}")
        return int(index)

    # -------------------------------------------------------------- torch.cuda API
    def is_available(self) -> bool:
        self.calls["is_available"] += 1
        self.cuinit.append(("is_available", threading.current_thread().name))
        return True

    def is_initialized(self) -> bool:
        return self._initialized

    def init(self) -> None:
        self._initialized = True

    def device_count(self) -> int:
        self._touch("device_count")
        return self._count

    def current_device(self) -> int:
        self._check("current_device")
        self._touch("current_device")
        return self._thread.device

    def set_device(self, device: Any) -> None:
        self._touch("set_device")
        self._thread.device = self._device_index(device)
        self.used.add(self._thread.device)

    @contextlib.contextmanager
    def device(self, device: Any) -> Iterator[None]:
        self._check("device")
        self._touch("device")
        previous, self._thread.device = self._thread.device, self._device_index(device)
        try:
            yield
        finally:
            self._thread.device = previous

    def current_stream(self, device: Any = None) -> Stream:
        self._check("current_stream")
        self._touch("current_stream")
        index = self._device_index(device)
        return self._thread.streams.get(index) or self.default_streams[index]

    def Stream(self, device: Any = None) -> Stream:  # noqa: N802 - torch.cuda.Stream
        stream = Stream(self, self._device_index(device))
        self._side_streams.append(stream)
        return stream

    @contextlib.contextmanager
    def stream(self, stream: Stream) -> Iterator[Stream]:
        previous = self._thread.streams.get(stream.device)
        self._thread.streams[stream.device] = stream
        try:
            yield stream
        finally:
            if previous is None:
                self._thread.streams.pop(stream.device, None)
            else:
                self._thread.streams[stream.device] = previous

    def is_current_stream_capturing(self) -> bool:
        self._check("is_current_stream_capturing")
        if not self._initialized:
            return False  # as torch: False without touching CUDA
        return self.current_stream().capture is not None

    @contextlib.contextmanager
    def graph(self, capture_error_mode: str = "global") -> Iterator[Stream]:
        """``with torch.cuda.graph(g):`` on this thread's current device (a side stream)."""
        mode = {"global": GLOBAL, "thread_local": THREAD_LOCAL, "relaxed": RELAXED}[capture_error_mode]
        side = self.Stream()
        capture = _Capture(threading.get_ident(), mode)
        side.capture = capture
        self.captures.append(capture)
        with self.stream(side):
            try:
                yield side
            finally:
                side.capture = None
                self.captures.remove(capture)
                self.ended_captures.append(capture)
        if capture.broken:
            raise CudaError(f"CUDA graph capture invalidated: {capture.broken}")

    def synchronize(self, device: Any = None) -> None:
        self.forbid("torch.cuda.synchronize()")
        raise AssertionError("otel_ml called torch.cuda.synchronize()")

    def memory_stats(self, device: Any = None) -> dict[str, int]:
        self._check("memory_stats")
        if not self._initialized:
            return {}
        index = self._device_index(device)
        self.memory_stats_calls[index] += 1
        return {
            "allocated_bytes.all.current": self.allocated[index],
            "reserved_bytes.all.current": self.reserved[index],
            "allocated_bytes.all.peak": self.peak[index],
        }

    def memory_allocated(self, device: Any = None) -> int:
        return self.memory_stats(device).get("allocated_bytes.all.current", 0)

    def memory_reserved(self, device: Any = None) -> int:
        return self.memory_stats(device).get("reserved_bytes.all.current", 0)

    def max_memory_allocated(self, device: Any = None) -> int:
        return self.memory_stats(device).get("allocated_bytes.all.peak", 0)

    def get_device_properties(self, device: Any = None) -> Properties:
        self._check("get_device_properties")
        self._touch("get_device_properties")
        return self.properties[self._device_index(device)]

    def tensor(self, value: Any, device: int | None = None, dtype: Any = None) -> FakeCudaTensor:
        """A tensor on ``device`` (default: the current one): 0-dim for a number, else its elements."""
        index = self._device_index(device)
        self.used.add(index)
        payload = torch.as_tensor(value, dtype=dtype if dtype is not None else torch.float32).clone()
        return FakeCudaTensor(self, payload, index)


def _event_class(cuda: FakeCuda) -> type:
    class Event:
        """``torch.cuda.Event``: bound to a device on first record; see the module docstring."""

        def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
            self.enable_timing = enable_timing
            self.device: int | None = None
            self.stream: Stream | None = None
            self.position = 0
            self.time_ms: float | None = None
            self.captured = False

        def record(self, stream: Stream | None = None) -> None:
            cuda._check("record")
            cuda._touch("record")
            stream = stream or cuda.current_stream()
            if self.device is not None and stream.device != self.device:
                raise CudaError(
                    f"Event device {self.device} does not match recording stream's device {stream.device}."
                )
            cuda._needs_context("record", stream.device)
            self.device = stream.device
            self.stream = stream
            self.time_ms = None
            self.captured = stream.capture is not None
            self.position = stream.enqueue("event", 0.0, self)

        def query(self) -> bool:
            cuda._check("query")
            if self.stream is None:
                return True  # never recorded: complete, as in CUDA
            cuda._needs_context("query", self.device)
            if self.captured:
                raise CudaError("operation not permitted on an event last recorded in a capturing stream")
            done = self.stream.executed >= self.position
            if done:
                self.stream.observed = max(self.stream.observed, self.position)
            return done

        def elapsed_time(self, end: Event) -> float:
            cuda._check("elapsed_time")
            cuda._needs_context("elapsed_time", self.device)
            if not (self.enable_timing and end.enable_timing):
                raise CudaError("Both events must be created with argument 'enable_timing=True'.")
            if self.stream is None or end.stream is None:
                raise CudaError("Both events must be recorded before calculating elapsed time.")
            if self.device != end.device:
                raise CudaError("Both events must be recorded on the same device.")
            if self.captured or end.captured:
                raise CudaError("operation not permitted on an event last recorded in a capturing stream")
            if self.time_ms is None or end.time_ms is None:
                raise CudaError("device not ready: both events must have completed")
            return end.time_ms - self.time_ms

        def synchronize(self) -> None:
            cuda.forbid("Event.synchronize()")
            raise AssertionError("otel_ml called Event.synchronize()")

        def wait(self, stream: Stream | None = None) -> None:
            cuda.forbid("Event.wait()")
            raise AssertionError("otel_ml called Event.wait()")

    return Event


class _Cudart:
    """The ``cudaThreadExchangeStreamCaptureMode`` entry point, as ctypes would call it."""

    def __init__(self, cuda: FakeCuda) -> None:
        self._cuda = cuda

    def cudaThreadExchangeStreamCaptureMode(self, mode: Any) -> int:  # noqa: N802 - the C name
        self._cuda._check("exchange")
        self._cuda._context("exchange")
        value = mode._obj  # ctypes.byref(c_int)
        value.value, self._cuda._thread.capture_mode = self._cuda._thread.capture_mode, value.value
        return 0


class _HostTensor:
    """A pinned host copy: reading it raises (and is counted) unless an event recorded behind the
    copy on its stream was seen complete (``query()`` returned True): the only way to know."""

    def __init__(self, cuda: FakeCuda, payload: torch.Tensor, stream: Stream) -> None:
        self._cuda = cuda
        self._payload = payload.clone()
        self.landed = False
        self.stream = stream
        self.position = stream.enqueue("copy", 0.0, self)

    def _read(self, call: str) -> torch.Tensor:
        what = ""
        if not self.landed:
            what = f"{call}() of a host copy the GPU has not written yet"
        elif self.stream.observed < self.position:
            what = f"{call}() of a host copy before an event behind it was seen complete"
        if what:
            self._cuda.early_reads += 1
            self._cuda.forbid(what)
            raise AssertionError(f"otel_ml read {what}")
        return self._payload

    def item(self) -> float:
        return float(self._read("item").item())

    def tolist(self) -> list[float]:
        return self._read("tolist").tolist()

    def numpy(self) -> Any:
        return self._read("numpy").numpy()


#: Ops that run asynchronously on a real GPU (a kernel enqueued, no value read by the host) and
#: that otel_ml may call on a CUDA tensor; anything else (``item``, ``tolist``, ``bool()``,
#: ``float()``, ``cpu()``, printing, boolean indexing, ``nonzero``, ``bincount``, ``histc``, shape
#: reads, ...) is refused, even where real CUDA would only be slow.
ASYNC_OPS = frozenset(
    {
        "isfinite", "where", "sum", "amin", "amax", "clamp", "bucketize", "scatter_add_", "new_zeros",
        "new_full", "cat", "stack", "__sub__", "__mul__", "__truediv__", "__add__", "sub", "mul", "div",
        "add",
    }
)  # fmt: skip


def _unwrap(value: Any, devices: set[int]) -> Any:
    if isinstance(value, FakeCudaTensor):
        devices.add(value._fake[2])
        return value._fake[1]
    if isinstance(value, torch.Tensor):
        raise AssertionError("a CPU tensor mixed into a CUDA op (a host-to-device copy)")
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(v, devices) for v in value)
    return value


class FakeCudaTensor(torch.Tensor):
    """A CUDA tensor: ``torch.Tensor`` to ``isinstance``, its values in a CPU ``payload``.

    Only :data:`ASYNC_OPS`, ``detach``, ``reshape``, ``to(dtype)`` and ``to("cpu",
    non_blocking=True)`` work; each enqueues its kernel on the current stream of the tensor's
    device. Every other use is a sync the training thread must not make: recorded in
    :attr:`FakeCuda.forbidden` and raised.
    """

    @staticmethod
    def __new__(cls, cuda: FakeCuda, payload: torch.Tensor, device: int) -> FakeCudaTensor:
        tensor = torch.Tensor._make_subclass(cls, torch.empty(()))
        tensor._fake = (cuda, payload, device)
        return tensor

    def __init__(self, cuda: FakeCuda, payload: torch.Tensor, device: int) -> None:
        super().__init__()

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", str(func))
        fakes = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, FakeCudaTensor)]
        fakes += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, FakeCudaTensor)]
        cuda = fakes[0]._fake[0] if fakes else None
        if name not in ASYNC_OPS or cuda is None:
            if cuda is not None:
                cuda.forbid(f"{name} on a CUDA tensor")
            raise AssertionError(f"otel_ml called {name} on a fake CUDA tensor")
        devices: set[int] = set()
        try:
            plain_args = _unwrap(args, devices)
            plain_kwargs = {k: _unwrap(v, devices) for k, v in (kwargs or {}).items()}
        except AssertionError as exc:
            cuda.forbid(f"{name}: {exc}")
            raise
        if len(devices) != 1:
            cuda.forbid(f"{name} across devices {sorted(devices)}")
            raise CudaError("Expected all tensors to be on the same device")
        (device,) = devices
        result = func(*plain_args, **plain_kwargs)
        cuda.launch(device, name)
        if name.endswith("_") and isinstance(args[0], FakeCudaTensor):
            return args[0]  # in place: the payload changed under the same tensor
        return FakeCudaTensor(cuda, result, device) if isinstance(result, torch.Tensor) else result

    is_cuda = property(lambda self: True)
    is_cpu = property(lambda self: False)
    is_meta = property(lambda self: False)
    dtype = property(lambda self: self._fake[1].dtype)
    device = property(lambda self: torch.device("cuda", self._fake[2]))

    def numel(self) -> int:
        return self._fake[1].numel()

    def is_complex(self) -> bool:
        return self._fake[1].is_complex()

    def detach(self) -> FakeCudaTensor:
        return self

    def reshape(self, *shape: Any) -> FakeCudaTensor:
        cuda, payload, device = self._fake
        return FakeCudaTensor(cuda, payload.reshape(*shape), device)  # metadata: no kernel

    def item(self) -> float:
        self._fake[0].forbid("item() on a CUDA tensor")
        raise AssertionError("otel_ml called .item() on a CUDA tensor: that synchronises the training thread")

    def to(self, *args: Any, **kwargs: Any) -> Any:
        cuda, payload, device = self._fake
        target = args[0] if args else kwargs.get("device", kwargs.get("dtype"))
        if isinstance(target, torch.dtype):  # a conversion on the device: one kernel
            cuda.launch(device, "to")
            return FakeCudaTensor(cuda, payload.to(target), device)
        if str(target) != "cpu" or not kwargs.get("non_blocking"):
            cuda.forbid(f"to({args}, {kwargs}) of a CUDA tensor")
            raise AssertionError(f"otel_ml copied a CUDA tensor with to({args}, {kwargs}): not non-blocking")
        cuda._check("copy")
        # The copy runs on the *source device's* current stream, whatever the current device is.
        return _HostTensor(cuda, payload, cuda.current_stream(device))


def on_thread(function: Callable[[], Any], name: str = "otel-ml-pump") -> Any:
    """Run ``function`` on a fresh thread (current CUDA device 0, as otel_ml's threads start)."""
    out: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.append(function())
        except BaseException as exc:  # noqa: BLE001 - re-raised on the test's thread
            errors.append(exc)

    thread = threading.Thread(target=run, name=name)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return out[0]
