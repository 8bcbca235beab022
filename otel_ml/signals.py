"""SIGTERM: flush what was recorded (bounded), then die the way the signal would have.

Python's default SIGTERM handling skips ``atexit``, so without this a job stopped by torchrun,
SLURM or Kubernetes would lose its last export interval. The handler runs ``shutdown`` (bounded
by ``shutdown_timeout``), then calls the handler that was installed before ``init()`` (chaining
the user's own), or, if there was none, restores the default action and re-sends the signal so
the exit status stays "killed by SIGTERM". SIGINT needs nothing: it raises KeyboardInterrupt, and
the ``atexit`` flush runs as the interpreter exits.

Signal handlers can only be installed from the main thread; elsewhere this does nothing.

Example::

    install_sigterm_flush(telemetry.shutdown)
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from otel_ml._logging import logger


def install_sigterm_flush(flush: Callable[[], Any]) -> Callable[[], None]:
    """Install the flushing SIGTERM handler; returns a function that puts the previous one back
    (if ours is still installed). Does nothing off the main thread or when SIGTERM is ignored."""
    if threading.current_thread() is not threading.main_thread():
        logger.debug("otel_ml: init() outside the main thread: SIGTERM is not handled")
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN:
        return lambda: None  # the process chose to ignore SIGTERM; keep it that way

    def handler(signum: int, frame: Any) -> None:
        try:
            flush()
        finally:
            if callable(previous):
                previous(signum, frame)
            else:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, handler)

    def restore() -> None:
        on_main = threading.current_thread() is threading.main_thread()
        if on_main and signal.getsignal(signal.SIGTERM) is handler:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

    return restore
