"""Turn whatever a training loop passes to ``log()`` into a float, without waiting for a GPU.

:func:`coerce` returns a ``float`` (possibly NaN or Inf: NaN is data), a :class:`Deferred` for
device tensors whose value is read later off the training thread, or raises
:class:`UnusableValueError` with a message for the one-time warning.

CUDA tensors are copied to pinned host memory with ``non_blocking=True`` and a CUDA event is
recorded behind the copy; a background collection polls ``event.query()`` and reads the host copy
once the GPU got there. The training thread never calls ``synchronize()`` or ``.item()`` on a
CUDA tensor.

Example::

    value = coerce(loss)           # CPU tensor or number -> float now
    if isinstance(value, Deferred):
        ...                        # CUDA tensor -> poll value.ready() later, then value.value()
"""

from __future__ import annotations

import sys
from typing import Any


class UnusableValueError(ValueError):
    """A value ``log()`` cannot export (string, None, multi-element tensor, ...)."""


class Deferred:
    """A scalar whose value becomes available later (see :class:`CudaDeferred`)."""

    __slots__ = ()

    def ready(self) -> bool:
        raise NotImplementedError

    def value(self) -> float:
        raise NotImplementedError


class CudaDeferred(Deferred):
    """Asynchronous device-to-host copy of a 1-element CUDA tensor, resolved by event polling.

    Example::

        d = CudaDeferred(loss)      # enqueues copy + event on the current stream, returns at once
        ...
        if d.ready():               # event.query(): True once the GPU executed the copy
            d.value()
    """

    __slots__ = ("_event", "_host")

    def __init__(self, tensor: Any) -> None:
        import torch

        src = tensor.detach().reshape(())
        self._host = torch.empty((), dtype=src.dtype, device="cpu", pin_memory=True)
        self._host.copy_(src, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def ready(self) -> bool:
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

    def ready(self) -> bool:
        return True

    def value(self) -> float:
        return float(self._tensor.item())


def tensor_type() -> type | None:
    """``torch.Tensor`` when torch is already imported (never imports it), else None."""
    torch = sys.modules.get("torch")
    return getattr(torch, "Tensor", None)


def coerce(value: Any) -> float | Deferred:
    """Convert a logged value; raise :class:`UnusableValueError` when it cannot be a scalar."""
    tensor_cls = tensor_type()
    if tensor_cls is not None and isinstance(value, tensor_cls):
        return _coerce_tensor(value)
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


def _coerce_tensor(tensor: Any) -> float | Deferred:
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
        return CudaDeferred(tensor)
    if tensor.is_meta:
        raise UnusableValueError("meta tensor has no value")
    if tensor.is_cpu:
        raise UnusableValueError(f"{tensor.dtype} tensor cannot be a float")
    return LazyItem(tensor)
