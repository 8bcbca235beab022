"""A tensor distribution reduced by torch ops on its own device: a few numbers, no host sync.

:func:`reduce` turns a tensor of N elements into one float64 vector of ``5 + len(bounds) + 1``
numbers on the tensor's device: finite count, sum, sum of squared deviations from the mean (two
passes, as :func:`otel_ml.distribution.summarize`), min, max, then the bucket counts
(``torch.bucketize`` + ``scatter_add_``, weighted by the finite mask so NaN/Inf elements are in
no bucket). On CUDA every op is asynchronous: no ``.item()``, no boolean indexing, nothing with a
data-dependent output size (``bincount`` and ``histc`` read the input's range on the host), no
copy from pageable host memory (:func:`bounds_on` builds the bucket bounds on the device with fill
kernels). :func:`otel_ml.distribution.from_reduction` turns the vector, once on the host, into a
:class:`~otel_ml.distribution.Summary`.

A CUDA tensor is reduced on its device's current stream and the vector copied behind it into
pinned host memory (:class:`otel_ml.values.CudaDeferred` with ``reduce=``): the training thread
enqueues about fifteen kernels and returns; the export thread reads the numbers once the event
says the GPU got there. A CPU tensor takes the same ops, read at once (vectorised, unlike a
Python loop over ``tolist()``).

Example::

    bounds = bounds_on(rewards, (0.0, 0.5, 1.0))       # cache it per key and device
    packed = reduce(rewards, bounds)                   # on rewards.device, nothing waited for
    from_reduction(packed.tolist(), rewards.numel())   # on the host, later: a Summary
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

from otel_ml.distribution import from_reduction
from otel_ml.values import CudaDeferred, UnusableValueError


def _torch() -> Any:
    return sys.modules["torch"]  # a tensor exists, so torch is imported; never import it here


def bounds_on(like: Any, bounds: Sequence[float]) -> Any:
    """``bounds`` as a float64 tensor on ``like``'s device, written by fill kernels (no host copy).

    ``torch.tensor(bounds, device=...)`` would copy from pageable memory, which waits for the
    device's stream; one ``new_full`` per bound does not. Build it once per key and device.
    """
    torch = _torch()
    if not bounds:
        return like.new_zeros((0,), dtype=torch.float64)
    return torch.cat([like.new_full((1,), float(b), dtype=torch.float64) for b in bounds])


def reduce(tensor: Any, bounds: Any) -> Any:
    """The summary vector of ``tensor`` on its device (module docstring); ``bounds`` from :func:`bounds_on`.

    Bucket ``i`` counts ``bounds[i-1] < v <= bounds[i]`` (``bucketize``'s default), as
    :func:`otel_ml.distribution.summarize` does with ``bisect_left``.
    """
    torch = _torch()
    x = tensor.detach().reshape(-1).to(torch.float64)
    finite = torch.isfinite(x)
    weight = finite.to(torch.float64)
    count = weight.sum()
    clean = torch.where(finite, x, 0.0)
    total = clean.sum()
    mean = total / count.clamp(min=1.0)
    deviation = torch.where(finite, x - mean, 0.0)
    squares = (deviation * deviation).sum()
    low = torch.where(finite, x, math.inf).amin()
    high = torch.where(finite, x, -math.inf).amax()
    index = torch.bucketize(clean, bounds)
    buckets = x.new_zeros((bounds.numel() + 1,), dtype=torch.float64).scatter_add_(0, index, weight)
    return torch.cat([torch.stack([count, total, squares, low, high]), buckets])


def check_tensor(tensor: Any) -> None:
    """Raise :class:`UnusableValueError` for a tensor whose elements are not real numbers."""
    if tensor.is_complex():
        raise UnusableValueError("complex tensor")
    if tensor.is_meta:
        raise UnusableValueError("meta tensor has no value")


def summarize_cpu(tensor: Any, bounds: Any) -> Any:
    """The :class:`~otel_ml.distribution.Summary` of a CPU tensor, now."""
    return from_reduction(reduce(tensor, bounds).tolist(), tensor.numel())


def defer_cuda(tensor: Any, bounds_for: Callable[[Any], Any], cuda: Any) -> CudaDeferred:
    """Enqueue the reduction of a CUDA tensor and its copy to pinned memory; poll it later.

    ``bounds_for(tensor)`` gives the bucket bounds on the tensor's device; it is called under
    that device's guard and only outside a CUDA graph capture, where this raises
    :class:`UnusableValueError` and enqueues nothing.
    """
    return CudaDeferred(tensor, cuda, reduce=lambda t: reduce(t, bounds_for(t)))
