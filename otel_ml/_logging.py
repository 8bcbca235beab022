"""The ``otel_ml`` logger and a warn-once helper, so telemetry problems never spam a training log."""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger("otel_ml")

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
