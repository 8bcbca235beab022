"""Calls into ``torch.cuda`` that are safe from any otel_ml thread: no new context, no cuInit.

Three rules, each a bug found on real multi-GPU jobs elsewhere:

* **Never initialise CUDA.** :func:`initialized_cuda` returns ``torch.cuda`` only once this
  process initialised it (``is_initialized()``, a flag check); it never calls
  ``is_available()``, which runs ``cuInit`` and freezes ``CUDA_VISIBLE_DEVICES`` before the
  user's first CUDA call.
* **Work under the object's device.** A background thread's current device is 0. An event query
  there, for an event of device 3, makes the runtime create a context on device 0 (about 500 MiB
  on every rank but 0). :meth:`DeviceCalls.on` switches to the event's device first.
* **Thread-local capture mode.** A ``cudaEventQuery`` from another thread during a CUDA graph
  capture in the default global mode invalidates the capture (pytorch#104555). Under
  :meth:`DeviceCalls.on` this thread is switched to ``cudaStreamCaptureModeThreadLocal`` with
  ``cudaThreadExchangeStreamCaptureMode`` from the CUDA runtime the process already loaded.

The ``cuda`` module and the runtime library are injected, so the same code runs against
``torch.cuda`` and against the strict stand-in of the tests (``tests/support/fake_cuda.py``).

Example::

    cuda = initialized_cuda()           # None until the training code touched CUDA
    if cuda is not None:
        calls = DeviceCalls(cuda)
        with calls.on(event_device):
            done = event.query()
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator
from typing import Any

from otel_ml._logging import logger

#: ``cudaStreamCaptureModeThreadLocal`` (``cudaStreamCaptureModeGlobal`` is 0, ``Relaxed`` 2).
CAPTURE_THREAD_LOCAL = 1


def initialized_cuda() -> Any | None:
    """``torch.cuda`` when torch is imported and this process initialised CUDA, else None.

    Imports nothing and initialises nothing: safe on any thread, at any time.
    """
    cuda = getattr(sys.modules.get("torch"), "cuda", None)
    if cuda is None:
        return None
    try:
        return cuda if cuda.is_initialized() else None
    except Exception:  # noqa: BLE001 - a broken install means no GPU telemetry, not a crash
        return None


def loaded_cudart() -> Any | None:
    """The CUDA runtime library already loaded in this process (ctypes), or None.

    Read from ``/proc/self/maps`` and opened with ``RTLD_NOLOAD``: never loads a library, so
    never initialises anything.
    """
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {line.split()[-1] for line in maps if "libcudart" in line and "/" in line}
    except OSError:
        return None
    mode = getattr(os, "RTLD_NOLOAD", 0) | getattr(os, "RTLD_LAZY", 1)
    for path in sorted(paths):
        try:
            library = ctypes.CDLL(path, mode=mode)
        except OSError:
            continue
        if hasattr(library, "cudaThreadExchangeStreamCaptureMode"):
            return library
    return None


class DeviceCalls:
    """A background thread's way into CUDA objects of one device (see module docstring).

    ``cudart`` offers ``cudaThreadExchangeStreamCaptureMode``; by default the runtime the process
    loaded. Without it (a statically linked runtime) queries still run under the device guard,
    and a capture that another thread runs in global mode is not protected (logged once).

    Example::

        calls = DeviceCalls(torch.cuda)
        with calls.on(3):
            event.query()
    """

    def __init__(self, cuda: Any, cudart: Any | None = None) -> None:
        self._cuda = cuda
        self._cudart = cudart
        self._exchange: Any = None
        self._resolved = False  # the library is looked up on first use, on a background thread

    @property
    def capture_safe(self) -> bool:
        """True when queries run in thread-local capture mode."""
        return self._entry() is not None

    def _entry(self) -> Any:
        if not self._resolved:
            runtime = self._cudart if self._cudart is not None else loaded_cudart()
            self._exchange = getattr(runtime, "cudaThreadExchangeStreamCaptureMode", None)
            self._resolved = True
            if self._exchange is None:
                logger.info(
                    "otel_ml: no CUDA runtime symbol for thread-local capture mode; event queries "
                    "during a global-mode CUDA graph capture on another thread may break it"
                )
        return self._exchange

    @contextlib.contextmanager
    def on(self, device: int) -> Iterator[None]:
        """Run the block with ``device`` current and this thread in thread-local capture mode."""
        with self._cuda.device(device):
            exchange = self._entry()
            if exchange is None:
                yield
                return
            mode = ctypes.c_int(CAPTURE_THREAD_LOCAL)
            exchange(ctypes.byref(mode))  # mode now holds the previous one
            try:
                yield
            finally:
                exchange(ctypes.byref(mode))
