"""Region timing: ``span()``, ``step_end()`` and ``trace_modules()``, from the training thread to spans.

The training thread only records (:mod:`.recorder`, with its C hot path ``_cregion.c``); the
export thread aggregates (:mod:`.aggregator`), samples traces (:mod:`.sampling`), resolves CUDA
events (:mod:`.cuda_events`) and keeps statistics (:mod:`.stats`) for the live table and the
end-of-run summary (:mod:`.render`). :mod:`.timekeeper` wires these into a running process.

Example::

    with otel_ml.regions.span("forward"):
        ...
"""

from otel_ml.regions.module_tracing import ModuleTracer, trace_modules
from otel_ml.regions.recorder import ACCELERATED, Region, record, span, step_end

__all__ = ["ACCELERATED", "ModuleTracer", "Region", "record", "span", "step_end", "trace_modules"]
