"""Summaries of a distribution logged in one call (``log(step, reward=[...])``): a pure calculator.

:func:`summarize` turns the finite elements of a list, a numpy array or a CPU tensor into a
:class:`Summary` (count, mean, min, max, population standard deviation, bucket counts) and counts
the NaN/Inf elements it left out; :func:`from_reduction` does the same for a tensor reduced on its
own device (:mod:`otel_ml.tensor_summary`). It knows nothing about OTel;
:mod:`otel_ml.distribution_metrics` exports the result.

Example::

    s = summarize([1.0, 2.0, float("nan"), 3.0], bounds=(1.5, 2.5))
    s.count, s.mean, s.nonfinite   # (3, 2.0, 1)
    s.bucket_counts                # [1, 1, 1]
"""

from __future__ import annotations

import math
import sys
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from otel_ml.values import UnusableValueError, tensor_type

#: Default bucket bounds of a distribution: symmetric, for rewards, scores and advantages
#: (roughly -100 to 100, finer near 0). A key whose values live elsewhere gets its own bounds
#: through ``distribution_buckets``.
DEFAULT_BUCKETS: tuple[float, ...] = (
    -100.0, -50.0, -20.0, -10.0, -5.0, -2.0, -1.0, -0.5, -0.2, -0.1, 0.0,
    0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0,
)  # fmt: skip


@dataclass(frozen=True)
class Summary:
    """What one logged distribution contributes: its finite elements' statistics and buckets.

    ``mean``, ``minimum``, ``maximum`` and ``std`` are None when no element was finite.

    Example::

        Summary(2, 3.0, 2.0, 4.0, 1.0, 1, 6.0, [0, 2])
    """

    count: int
    mean: float | None
    minimum: float | None
    maximum: float | None
    std: float | None
    nonfinite: int
    total: float
    bucket_counts: list[int]


def is_distribution(value: Any) -> bool:
    """True for a list/tuple, a numpy array or a tensor with other than one element.

    Example::

        is_distribution([1.0, 2.0])  # True
        is_distribution(3.0)         # False
    """
    if isinstance(value, (list, tuple)):
        return len(value) != 1
    numel = getattr(value, "numel", None)
    if callable(numel) and tensor_type() is not None and isinstance(value, tensor_type()):
        return numel() != 1  # a 0-dim tensor has one element; numel() is metadata, no sync
    size = getattr(value, "size", None)
    shape = getattr(value, "shape", None)
    return isinstance(size, int) and shape is not None and len(shape) > 0 and size != 1


def host_values(value: Any) -> list[float]:
    """The elements of a list/tuple, numpy array or CPU tensor as floats (raises on others).

    Example::

        host_values((1, 2.5))  # [1.0, 2.5]
    """
    tensor_cls = tensor_type()
    if tensor_cls is not None and isinstance(value, tensor_cls):
        if not value.is_cpu:
            raise UnusableValueError(f"{value.device} tensor: only CPU distributions are read on the host")
        if value.is_complex():
            raise UnusableValueError("complex tensor")
        return [float(v) for v in value.detach().double().reshape(-1).tolist()]
    tolist = getattr(value, "tolist", None)
    items = tolist() if callable(tolist) else value
    if not isinstance(items, (list, tuple)):
        items = [items]
    out: list[float] = []
    stack = list(items)
    while stack:  # flatten nested lists (a 2-D array) without recursion
        item = stack.pop(0)
        if isinstance(item, (list, tuple)):
            stack[:0] = item
        elif isinstance(item, (str, bytes, complex)) or item is None:
            raise UnusableValueError(f"{type(item).__name__} element is not a number")
        else:
            try:
                out.append(float(item))
            except (TypeError, ValueError, OverflowError) as exc:
                raise UnusableValueError(f"element {item!r} is not a number ({exc})") from None
    return out


def summarize(values: Sequence[float], bounds: Sequence[float] = DEFAULT_BUCKETS) -> Summary:
    """The :class:`Summary` of ``values``; NaN/Inf elements are counted and left out.

    Bucket ``i`` counts ``bounds[i-1] < v <= bounds[i]`` (the last is ``+Inf``), as in
    :class:`otel_ml.histogram.LabeledHistograms`. The standard deviation is the population one
    (two passes, so a large common offset does not cancel it).

    Example::

        summarize([2.0, 4.0], bounds=(3.0,)).std  # 1.0
    """
    finite = [v for v in values if v - v == 0.0]
    counts = [0] * (len(bounds) + 1)
    for v in finite:
        counts[bisect_left(bounds, v)] += 1
    nonfinite = len(values) - len(finite)
    if not finite:
        return Summary(0, None, None, None, None, nonfinite, 0.0, counts)
    total = math.fsum(finite)
    mean = total / len(finite)
    var = math.fsum((v - mean) ** 2 for v in finite) / len(finite)
    return Summary(len(finite), mean, min(finite), max(finite), math.sqrt(var), nonfinite, total, counts)


#: Leading fields of a reduced tensor (:mod:`otel_ml.tensor_summary`): count, sum, sum of squared
#: deviations, min, max; the bucket counts follow.
REDUCED_FIELDS = 5


def from_reduction(packed: Sequence[float], elements: int) -> Summary:
    """The :class:`Summary` of a tensor of ``elements`` elements reduced to ``packed`` numbers.

    ``packed`` is ``[count, sum, squared deviations, min, max, *bucket counts]`` of the finite
    elements (:func:`otel_ml.tensor_summary.reduce`); the others were NaN/Inf.

    Example::

        from_reduction([2, 6.0, 2.0, 2.0, 4.0, 0, 2], elements=3).std  # 1.0 (one element non-finite)
    """
    count = int(packed[0])
    buckets = [int(v) for v in packed[REDUCED_FIELDS:]]
    nonfinite = elements - count
    if count == 0:
        return Summary(0, None, None, None, None, nonfinite, 0.0, buckets)
    total = float(packed[1])
    std = math.sqrt(max(float(packed[2]), 0.0) / count)
    return Summary(count, total / count, float(packed[3]), float(packed[4]), std, nonfinite, total, buckets)


def numpy_array(value: Any) -> Any | None:
    """``value`` when it is a numpy array (numpy is never imported here), else None."""
    numpy = sys.modules.get("numpy")
    return value if numpy is not None and isinstance(value, numpy.ndarray) else None


def summarize_array(array: Any, bounds: Sequence[float] = DEFAULT_BUCKETS) -> Summary:
    """:func:`summarize` of a numpy array, vectorised (a million elements in milliseconds).

    Example::

        summarize_array(numpy.array([2.0, 4.0, numpy.nan]), bounds=(3.0,)).bucket_counts  # [1, 1]
    """
    numpy = sys.modules["numpy"]
    if numpy.iscomplexobj(array):
        raise UnusableValueError("complex array")
    try:
        x = numpy.asarray(array, dtype=numpy.float64).ravel()
    except (TypeError, ValueError) as exc:
        raise UnusableValueError(f"array elements are not numbers ({exc})") from None
    finite = x[numpy.isfinite(x)]
    nonfinite = int(x.size - finite.size)
    # side="left": bounds[i-1] < v <= bounds[i], as bisect_left
    index = numpy.searchsorted(numpy.asarray(bounds, dtype=numpy.float64), finite, side="left")
    counts = [int(c) for c in numpy.bincount(index, minlength=len(bounds) + 1)]
    if finite.size == 0:
        return Summary(0, None, None, None, None, nonfinite, 0.0, counts)
    total = float(finite.sum())
    mean = total / finite.size
    std = float(numpy.sqrt(numpy.mean((finite - mean) ** 2)))
    return Summary(
        int(finite.size), mean, float(finite.min()), float(finite.max()), std, nonfinite, total, counts
    )
