"""The ``otel-ml`` command: ``demo``, ``top``, ``targets`` and ``inspect`` (entry point :func:`main`).

Example::

    otel-ml demo --ranks 2 --steps 300
"""

from otel_ml.cli.main import main

__all__ = ["main"]
