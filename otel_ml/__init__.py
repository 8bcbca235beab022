"""otel_ml: PyTorch training and inference telemetry through OpenTelemetry and Prometheus.

Example::

    import otel_ml
    otel_ml.init(service_name="my-run")
    for step, batch in enumerate(loader):
        ...
        otel_ml.log(step, loss=loss, lr=lr, grad_norm=gn, samples=bs, tokens=ntok, kl=kl)
    otel_ml.shutdown()
"""

from otel_ml._version import __version__
from otel_ml.anomaly import Anomaly, AnomalyError, on_anomaly
from otel_ml.config import Config
from otel_ml.progress import tqdm, trange
from otel_ml.regions import ModuleTracer, Region, span, step_end, trace_modules
from otel_ml.runtime import (
    Telemetry,
    agree_stop,
    flush,
    get_telemetry,
    init,
    log,
    should_stop,
    shutdown,
    stop_reason,
)
from otel_ml.scores import Scores, ScoreSummary, scores
from otel_ml.stopping import StopReason

__all__ = [
    "Anomaly",
    "AnomalyError",
    "Config",
    "ModuleTracer",
    "Region",
    "ScoreSummary",
    "Scores",
    "StopReason",
    "Telemetry",
    "__version__",
    "agree_stop",
    "flush",
    "get_telemetry",
    "init",
    "log",
    "on_anomaly",
    "scores",
    "should_stop",
    "shutdown",
    "span",
    "step_end",
    "stop_reason",
    "tqdm",
    "trace_modules",
    "trange",
]
