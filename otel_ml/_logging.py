"""The ``otel_ml`` logger, its fallback handler and a warn-once helper.

Telemetry problems and anomalies are logged on the ``otel_ml`` logger. So that a person sees
them when the application configured no logging, the logger carries :class:`FallbackHandler`,
which writes WARNING and above to stderr (``otel_ml: anomaly nonfinite on rank 2: ...``), and
stays silent as soon as the application has a handler of its own for these records: one on the
root logger while ``otel_ml`` propagates, or one on the ``otel_ml`` logger itself. So nothing is
printed twice, and ``logging.basicConfig()`` or ``caplog`` take over without further setup. On a
terminal the line first clears the current one (a progress bar), so it does not stick to a bar.

Example::

    from otel_ml._logging import warn_once
    warn_once("exporter-down", "otel_ml: the exporter failed: %s", err)
"""

from __future__ import annotations

import logging
import sys
import threading

logger = logging.getLogger("otel_ml")

_CLEAR_LINE = "\r\x1b[2K"


def application_handles(target: logging.Logger) -> bool:
    """True when a handler other than the fallback receives ``target``'s records: one on the
    logger or, while records propagate, on an ancestor."""
    current: logging.Logger | None = target
    while current is not None:
        if any(not isinstance(h, FallbackHandler) for h in current.handlers):
            return True
        if not current.propagate:
            return False
        current = current.parent
    return False


class FallbackHandler(logging.Handler):
    """Writes ``otel_ml`` warnings to stderr unless the application handles them (see module docstring).

    The stream is looked up at each record (``sys.stderr`` may be replaced, as pytest does).

    Example::

        logging.getLogger("otel_ml").addHandler(FallbackHandler())
    """

    def __init__(self, level: int = logging.WARNING) -> None:
        super().__init__(level)
        self.setFormatter(logging.Formatter("%(message)s"))

    def handle(self, record: logging.LogRecord) -> bool:
        if application_handles(logging.getLogger(record.name)):
            return False
        return bool(super().handle(record))

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr
        if stream is None:
            return
        try:
            isatty = getattr(stream, "isatty", None)
            prefix = _CLEAR_LINE if isatty is not None and isatty() else ""
            stream.write(prefix + self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never raise into training
            self.handleError(record)


if not any(isinstance(h, FallbackHandler) for h in logger.handlers):
    logger.addHandler(FallbackHandler())

_seen: set[str] = set()
_seen_lock = threading.RLock()  # warn_once may run inside a signal handler


def warn_once(key: str, message: str, *args: object) -> bool:
    """Log ``message`` at WARNING the first time ``key`` is seen in this process.

    Returns True when the message was logged. Keys are process-wide on purpose: a problem
    with a metric name or an exporter is worth one line, not one per step.
    """
    with _seen_lock:
        if key in _seen:
            return False
        _seen.add(key)
    logger.warning(message, *args)
    return True


def reset_warnings() -> None:
    """Forget which warnings were logged (for tests and for a new ``init()`` after shutdown)."""
    with _seen_lock:
        _seen.clear()
