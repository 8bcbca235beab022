"""Whether otel_ml may use its C extensions: ``OTEL_ML_PURE_PYTHON`` and ``OTEL_ML_REQUIRE_C``, read here.

Each C part of otel_ml (the regions' hot path and accounting, the anomaly detectors) has a Python
twin. ``OTEL_ML_PURE_PYTHON=1`` makes every part use its Python twin; ``OTEL_ML_REQUIRE_C=1`` (CI
sets it) turns a missing or stale build into an ImportError instead of the Python twin.

Example::

    module = extension("otel_ml._cdetectors")  # None: run the Python twin
    if module is not None and module.DETECTORS != DETECTORS:
        module = stale_build("otel_ml._cdetectors is a stale build (...)", "using the Python detectors")
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Any


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def pure_python() -> bool:
    """``OTEL_ML_PURE_PYTHON`` is set: every C part runs its Python twin."""
    return _flag("OTEL_ML_PURE_PYTHON")


def require_c() -> bool:
    """``OTEL_ML_REQUIRE_C`` is set: a C part that cannot be used is an error, not a fallback."""
    return _flag("OTEL_ML_REQUIRE_C")


def extension(name: str) -> Any:
    """The C extension module ``name``, or None for its Python twin: under
    ``OTEL_ML_PURE_PYTHON=1``, or when it was not built (then an ImportError under
    ``OTEL_ML_REQUIRE_C=1``)."""
    if pure_python():
        return None
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if require_c():
            raise ImportError(
                f"{name} is not built and OTEL_ML_REQUIRE_C is set: is a C compiler installed? "
                "(pip install -e . builds it)"
            ) from exc
        return None


def stale_build(message: str, fallback: str) -> None:
    """A built extension that this otel_ml cannot use: ``ImportError(message)`` under
    ``OTEL_ML_REQUIRE_C=1``, else one ``RuntimeWarning`` (``message; fallback``) at the import
    that loaded it, and None for the caller to return (its Python twin runs)."""
    if require_c():
        raise ImportError(message)
    warnings.warn(f"{message}; {fallback}", RuntimeWarning, stacklevel=3)
