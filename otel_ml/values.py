"""Turn whatever a training loop passes to ``log()`` into a float, without waiting for a GPU.

:func:`coerce` returns a ``float`` (possibly NaN or Inf: NaN is data), a :class:`Deferred` for
device tensors whose value is read later off the training thread, or raises
:class:`UnusableValueError` with a message for the one-time warning.

CUDA tensors are copied to pinned host memory with ``non_blocking=True`` on their own device's
stream and a CUDA event is recorded behind the copy; a background collection polls
``event.query()`` (under that device's guard) and reads the host copy once the GPU got there.
The training thread never calls ``synchronize()`` or ``.item()`` on a CUDA tensor.
:class:`DeferredReads` is the bounded queue those values wait in until the export thread reads
them (scalars here, reduced distributions in :mod:`otel_ml.distribution_metrics`).

Example::

    value = coerce(loss)           # CPU tensor or number -> float now
    if isinstance(value, Deferred):
        ...                        # CUDA tensor -> poll value.ready() later, then value.value()
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from otel_ml._logging import warn_once
from otel_ml.gpu import DeviceCalls

if TYPE_CHECKING:
    from otel_ml.health import TelemetryHealth


class UnusableValueError(ValueError):
    """A value ``log()`` cannot export (string, None, multi-element tensor, ...)."""


class Deferred:
    """A scalar whose value becomes available later (see :class:`CudaDeferred`)."""

    __slots__ = ()

    def ready(self, calls: DeviceCalls | None = None) -> bool:
        """True once :meth:`value` can be read (``calls``: how to reach a CUDA device safely)."""
        raise NotImplementedError

    def value(self) -> float:
        raise NotImplementedError


class CudaDeferred(Deferred):
    """Asynchronous device-to-host copy of a 1-element CUDA tensor, resolved by event polling.

    With ``reduce``, the copied tensor is ``reduce(tensor)``, device-side work enqueued first on
    the same stream (a distribution reduced to a few numbers, :mod:`otel_ml.tensor_summary`);
    :meth:`values` reads all of them.

    The copy and its event go on the current stream of the *tensor's* device (where the copy
    runs), whatever the training thread's current device is; the event is queried later under
    that device's guard (:class:`otel_ml.gpu.DeviceCalls`). Inside a CUDA graph capture there is
    no value to read yet: the value is refused (one warning), not captured into the graph.

    Example::

        d = CudaDeferred(loss, torch.cuda)  # enqueues copy + event, returns at once
        ...
        if d.ready(DeviceCalls(torch.cuda)):   # event.query(): True once the copy landed
            d.value()
    """

    __slots__ = ("_cuda", "_event", "_host", "device")

    def __init__(self, tensor: Any, cuda: Any, reduce: Callable[[Any], Any] | None = None) -> None:
        self._cuda = cuda
        index = tensor.device.index
        self.device = int(index if index is not None else cuda.current_device())
        if cuda.current_device() == self.device:
            self._start(tensor, cuda, reduce)
        else:
            with cuda.device(self.device):
                self._start(tensor, cuda, reduce)

    def _start(self, tensor: Any, cuda: Any, reduce: Callable[[Any], Any] | None) -> None:
        if cuda.is_current_stream_capturing():
            raise UnusableValueError("logged inside a CUDA graph capture (no value exists yet)")
        # ``reduce`` enqueues device-side work (a distribution's few summary numbers) on the same
        # stream before the copy; the scalar itself needs none.
        src = tensor.detach().reshape(()) if reduce is None else reduce(tensor)
        # Pinned host memory, filled on the source device's current stream (non_blocking=True
        # makes torch allocate the destination pinned); the event follows it on that stream.
        self._host = src.to("cpu", non_blocking=True)
        self._event = cuda.Event()
        self._event.record(cuda.current_stream(self.device))

    @property
    def cuda(self) -> Any:
        return self._cuda

    def ready(self, calls: DeviceCalls | None = None) -> bool:
        if calls is None:
            raise ValueError("a CUDA value is read under its device guard: pass DeviceCalls")
        with calls.on(self.device):
            return bool(self._event.query())

    def value(self) -> float:
        return float(self._host.item())

    def values(self) -> list[float]:
        """Every element of the host copy (a reduced distribution), once :meth:`ready`."""
        return [float(v) for v in self._host.tolist()]


class LazyItem(Deferred):
    """A tensor on another accelerator (MPS, XLA, ...): ``.item()`` is called off-thread.

    ``ready()`` is always true: the background reader pays whatever wait the device needs.
    """

    __slots__ = ("_tensor",)

    def __init__(self, tensor: Any) -> None:
        self._tensor = tensor.detach()

    def ready(self, calls: DeviceCalls | None = None) -> bool:
        return True

    def value(self) -> float:
        return float(self._tensor.item())


class DeferredReads:
    """Deferred values waiting for their device, read oldest first on the export thread.

    :meth:`push` (training thread) keeps at most ``limit`` of them, dropping the oldest and
    counting it in ``health``; :meth:`drain` hands each ready one to ``deliver(step, key, deferred,
    extra)`` and stops at the first whose device is not there yet (a stream runs in order). A read
    that fails is warned once per key, counted as an error and a drop, and the next ones still flow.

    Example::

        reads = DeferredReads(4096, health)
        reads.push(3, "loss", CudaDeferred(loss, torch.cuda))
        reads.drain(lambda step, key, d, extra: print(step, key, d.value()))
    """

    def __init__(self, limit: int, health: TelemetryHealth, cudart: Any | None = None) -> None:
        self._limit = limit
        self._health = health
        self._cudart = cudart
        self._queue: deque[tuple[int, str, Deferred, Any]] = deque()
        self._calls: DeviceCalls | None = None  # made on the export thread, on first need

    def __len__(self) -> int:
        return len(self._queue)

    def push(self, step: int, key: str, deferred: Deferred, extra: Any = None) -> None:
        queue = self._queue
        if len(queue) >= self._limit:
            queue.popleft()
            self._health.dropped("values")
        queue.append((step, key, deferred, extra))

    def drain(self, deliver: Callable[[int, str, Deferred, Any], None]) -> None:
        queue = self._queue
        while queue:
            step, key, deferred, extra = queue[0]
            try:
                if not deferred.ready(self._device_calls(deferred)):
                    return
                queue.popleft()
                deliver(step, key, deferred, extra)
            except Exception as exc:  # noqa: BLE001 - counted; the values behind it still flow
                warn_once(f"deferred:{key}", "otel_ml: reading %r from the device failed: %s", key, exc)
                self._health.error("values")
                self._health.dropped("values")
                if queue and queue[0][2] is deferred:  # ready() itself failed: skip this one
                    queue.popleft()

    def _device_calls(self, deferred: Deferred) -> DeviceCalls | None:
        cuda = getattr(deferred, "cuda", None)
        if cuda is None:
            return None
        if self._calls is None:
            self._calls = DeviceCalls(cuda, self._cudart)
        return self._calls


def tensor_type() -> type | None:
    """``torch.Tensor`` when torch is already imported (never imports it), else None."""
    torch = sys.modules.get("torch")
    return getattr(torch, "Tensor", None)


def coerce(value: Any, cuda: Any | None = None) -> float | Deferred:
    """Convert a logged value; raise :class:`UnusableValueError` when it cannot be a scalar.

    ``cuda`` is the ``torch.cuda`` to read CUDA tensors with (default: torch's own).
    """
    tensor_cls = tensor_type()
    if tensor_cls is not None and isinstance(value, tensor_cls):
        return _coerce_tensor(value, cuda)
    if value is None or isinstance(value, (str, bytes, complex)):
        raise UnusableValueError(f"{type(value).__name__} is not a number")
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            raise UnusableValueError("integer too large for a float") from None
    to_float = getattr(value, "__float__", None)
    if to_float is None:
        raise UnusableValueError(f"{type(value).__name__} is not a number")
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise UnusableValueError(f"{type(value).__name__} cannot be a float ({exc})") from None


def _coerce_tensor(tensor: Any, cuda: Any | None) -> float | Deferred:
    if tensor.is_cpu:
        # The common case, kept short: item() works with requires_grad and raises for
        # multi-element tensors; complex values fail in float().
        try:
            return float(tensor.item())
        except (RuntimeError, TypeError, ValueError):
            pass
    numel = tensor.numel()
    if numel != 1:
        raise UnusableValueError(f"tensor has {numel} elements; log a scalar such as .mean()")
    if tensor.is_complex():
        raise UnusableValueError("complex tensor")
    if tensor.is_cuda:
        return CudaDeferred(tensor, cuda if cuda is not None else sys.modules["torch"].cuda)
    if tensor.is_meta:
        raise UnusableValueError("meta tensor has no value")
    if tensor.is_cpu:
        raise UnusableValueError(f"{tensor.dtype} tensor cannot be a float")
    return LazyItem(tensor)
