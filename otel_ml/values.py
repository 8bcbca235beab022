"""Turn whatever a training loop passes to ``log()`` into a float, without waiting for a GPU.

:func:`coerce` returns a ``float`` (possibly NaN or Inf: NaN is data), a :class:`Deferred` for
device tensors whose value is read later off the training thread, or raises
:class:`UnusableValueError` with a message for the one-time warning.

CUDA tensors are copied to pinned host memory with ``non_blocking=True`` on their own device's
stream and a CUDA event is recorded behind the copy; a background collection polls
``event.query()`` (under that device's guard) and reads the host copy once the GPU got there.
The training thread never calls ``synchronize()`` or ``.item()`` on a CUDA tensor.

Example::

    value = coerce(loss)           # CPU tensor or number -> float now
    if isinstance(value, Deferred):
        ...                        # CUDA tensor -> poll value.ready() later, then value.value()
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from otel_ml.gpu import DeviceCalls


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

    def __init__(self, tensor: Any, cuda: Any) -> None:
        src = tensor.detach().reshape(())
        self._cuda = cuda
        self.device = int(src.device.index if src.device.index is not None else cuda.current_device())
        if cuda.current_device() == self.device:
            self._start(src, cuda)
        else:
            with cuda.device(self.device):
                self._start(src, cuda)

    def _start(self, src: Any, cuda: Any) -> None:
        if cuda.is_current_stream_capturing():
            raise UnusableValueError("logged inside a CUDA graph capture (no value exists yet)")
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
