"""Return every piece of otel_ml's process state to what a fresh import has (for test suites).

The process-wide state lives in six places: the running :class:`~otel_ml.runtime.Telemetry`,
the installed region recorder, the module tracers, the progress board, the anomaly callbacks and
the warn-once registry. :func:`reset` clears all of them, so a test never resets one by hand and
forgets another.

Example::

    @pytest.fixture(autouse=True)
    def fresh_otel_ml():
        otel_ml._testing.reset()
        yield
        otel_ml._testing.reset()
"""

from __future__ import annotations

from otel_ml import anomaly, runtime
from otel_ml._logging import reset_warnings
from otel_ml.progress.board import board
from otel_ml.regions import module_tracing, recorder


def reset(timeout: float = 2.0) -> None:
    """Shut down the running instance (bounded by ``timeout``) and clear all process state."""
    telemetry = runtime._current
    if telemetry is not None and not telemetry.closed:
        telemetry.shutdown(timeout=timeout)
    runtime._current = None
    recorder.install(None)
    for tracer in tuple(module_tracing._tracers):
        tracer.remove()
    module_tracing._tracers.clear()
    module_tracing.release_nodes()
    board.reset()
    anomaly._callbacks.clear()
    reset_warnings()
