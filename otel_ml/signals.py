"""How the process ends: SIGTERM flushes (bounded), then dies the way the signal would have; an
uncaught exception is reported before the previous ``sys.excepthook`` runs.

Python's default SIGTERM handling skips ``atexit``, so without this a job stopped by torchrun,
SLURM or Kubernetes would lose its last export interval. The handler runs ``shutdown`` (bounded
by ``shutdown_timeout``), then calls the handler that was installed before ``init()`` (chaining
the user's own), or, if there was none, restores the default action and re-sends the signal so
the exit status stays "killed by SIGTERM". SIGINT needs nothing: it raises KeyboardInterrupt, and
the ``atexit`` flush runs as the interpreter exits. ``on_signal(signum)`` runs first (the status
file records the rank as terminated); it never changes how the signal is delivered.

Signal handlers can only be installed from the main thread; elsewhere this does nothing.

:func:`watch_uncaught` chains ``sys.excepthook`` once per process: an uncaught exception (also
the one escaping a torchrun worker's main, which ``@record`` re-raises) goes to the callback
(the status file's ``failed``), then to the previous hook, which prints the traceback as before.

Example::

    install_sigterm_flush(telemetry.shutdown, on_signal=status.terminated)
    watch_uncaught(status.failed)
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

from otel_ml._logging import logger


def install_sigterm_flush(
    flush: Callable[[], Any], on_signal: Callable[[int], Any] | None = None
) -> Callable[[], None]:
    """Install the flushing SIGTERM handler; returns a function that puts the previous one back
    (if ours is still installed). Does nothing off the main thread or when SIGTERM is ignored.
    ``on_signal(signum)`` runs before the flush; its errors are logged, never raised."""
    if threading.current_thread() is not threading.main_thread():
        logger.debug("otel_ml: init() outside the main thread: SIGTERM is not handled")
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN:
        return lambda: None  # the process chose to ignore SIGTERM; keep it that way

    def handler(signum: int, frame: Any) -> None:
        try:
            if on_signal is not None:
                try:
                    on_signal(signum)
                except Exception as exc:  # noqa: BLE001 - the flush and the exit must still happen
                    logger.debug("otel_ml: on_signal failed: %r", exc)
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


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15 (``signal N`` for a number Python has no name for)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exception_name(exc_type: type[BaseException]) -> str:
    """``ValueError`` for built-ins, ``module.Qualified`` for the others."""
    module = getattr(exc_type, "__module__", "") or ""
    name = getattr(exc_type, "__qualname__", None) or exc_type.__name__
    return name if module in ("builtins", "__main__", "") else f"{module}.{name}"


OnUncaught = Callable[[type[BaseException], BaseException | None], Any]
Excepthook = Callable[[type[BaseException], BaseException, TracebackType | None], Any]


def chained_excepthook(current: Callable[[], OnUncaught | None], previous: Excepthook) -> Excepthook:
    """An excepthook handing the exception to ``current()`` (when there is one), then to
    ``previous``, whatever the first one does."""

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> Any:
        try:
            callback = current()
            if callback is not None:
                callback(exc_type, exc)
        except Exception as error:  # noqa: BLE001 - the previous hook (the traceback) must still run
            logger.debug("otel_ml: uncaught-exception callback failed: %r", error)
        return previous(exc_type, exc, tb)

    hook.otel_ml_chained = True  # type: ignore[attr-defined]
    return hook


_on_uncaught: OnUncaught | None = None


def watch_uncaught(on_uncaught: OnUncaught) -> None:
    """Make ``on_uncaught(exc_type, exc)`` hear about this process's uncaught exception (the
    hook is chained once per process; a later ``init()`` only swaps the callback)."""
    global _on_uncaught
    _on_uncaught = on_uncaught
    if not getattr(sys.excepthook, "otel_ml_chained", False):
        sys.excepthook = chained_excepthook(lambda: _on_uncaught, sys.excepthook)
