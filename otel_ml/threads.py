"""Native names for otel_ml's threads, so ``top -H`` and ``/proc/<pid>/task/*/comm`` show them.

Python names its threads only for Python; the kernel keeps calling them ``python``. Every
otel_ml thread calls :func:`name_native` first thing, with the same name it has in Python
(at most 15 bytes are kept, the kernel's limit): ``otel-ml-pump``, ``otel-ml-export-*``,
``otel-ml-http`` (the ``/metrics`` accept loop), ``otel-ml-scrape`` (one per scrape
connection), ``otel-ml-rankview``.

Example::

    def run():
        name_native("otel-ml-pump")
        ...
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_PR_SET_NAME = 15


def _prctl() -> object | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_set = _prctl()


def name_native(name: str) -> None:
    """Name the calling OS thread ``name`` (truncated to 15 bytes); a no-op off Linux."""
    if _set is not None:
        _set(_PR_SET_NAME, ctypes.c_char_p(name.encode("ascii", "replace")[:15]), 0, 0, 0)
