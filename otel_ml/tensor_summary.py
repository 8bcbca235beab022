"""A tensor distribution reduced by torch ops on its own device: a few numbers, no host sync.

:func:`reduce` turns a tensor of N elements into one float64 vector of ``5 + len(bounds) + 1``
numbers on the tensor's device: finite count, sum, sum of squared deviations from the mean (two
passes, as :func:`otel_ml.distribution.summarize`; elementwise in float32 unless the tensor is
float64, sums in float64), min, max, then the bucket counts
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

    bounds = bounds_on(rewards, (0.0, 0.5, 1.0), working_dtype(rewards))   # cache it
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


def working_dtype(tensor: Any) -> Any:
    """The dtype the reduction works in: float64 for a float64 tensor, float32 for any other.

    Halves, bfloat16, integers and bools are widened to float32 elementwise; the sums always
    accumulate in float64. This keeps the device's temporaries at about 30 bytes per element.
    """
    torch = _torch()
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def round_down(bound: float, dtype: Any) -> float:
    """The largest ``dtype`` value not above ``bound`` (float32 or float64).

    For any ``v`` of that dtype, ``v <= bound`` exactly when ``v <= round_down(bound, dtype)``, so
    float32 buckets split where :func:`otel_ml.distribution.summarize` splits in float64.

    Example::

        round_down(0.1, torch.float32) < 0.1   # True: float32(0.1) is above 0.1
    """
    torch = _torch()
    if dtype == torch.float64:
        return float(bound)
    near = torch.tensor(float(bound), dtype=dtype)  # a CPU tensor: no device involved
    if float(near) > bound:
        near = torch.nextafter(near, torch.tensor(-math.inf, dtype=dtype))
    return float(near)


def bounds_on(like: Any, bounds: Sequence[float], dtype: Any) -> Any:
    """``bounds`` as a ``dtype`` tensor on ``like``'s device, written by fill kernels (no host copy).

    ``torch.tensor(bounds, device=...)`` would copy from pageable memory, which waits for the
    device's stream; one ``new_full`` per bound does not. Build it once per key, device and dtype.
    """
    torch = _torch()
    if not bounds:
        return like.new_zeros((0,), dtype=dtype)
    return torch.cat([like.new_full((1,), round_down(b, dtype), dtype=dtype) for b in bounds])


def reduce(tensor: Any, bounds: Any) -> Any:
    """The summary vector of ``tensor`` on its device (module docstring).

    ``bounds`` comes from :func:`bounds_on` with :func:`working_dtype`. Bucket ``i`` counts
    ``bounds[i-1] < v <= bounds[i]`` (``bucketize``'s default), as
    :func:`otel_ml.distribution.summarize` does with ``bisect_left``.
    """
    torch = _torch()
    f64 = torch.float64
    x = tensor.detach().reshape(-1).to(bounds.dtype)
    finite = torch.isfinite(x)
    count = finite.sum(dtype=f64)
    clean = torch.where(finite, x, 0.0)
    total = clean.sum(dtype=f64)
    mean = total / count.clamp(min=1.0)
    deviation = torch.where(finite, x - mean.to(x.dtype), 0.0)
    squares = (deviation * deviation).sum(dtype=f64)
    low = torch.where(finite, x, math.inf).amin().to(f64)
    high = torch.where(finite, x, -math.inf).amax().to(f64)
    index = torch.bucketize(clean, bounds)
    weight = finite.to(torch.int32)
    buckets = x.new_zeros((bounds.numel() + 1,), dtype=torch.int32).scatter_add_(0, index, weight)
    return torch.cat([torch.stack([count, total, squares, low, high]), buckets.to(f64)])


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
