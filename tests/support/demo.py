"""Starting the real ``otel-ml demo`` (2 ranks, gloo) from integration tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tests.support.net import free_port_block


def demo_env(run_dir: Path, base_port: int | None = None, **extra: str) -> dict[str, str]:
    """The environment for a demo whose ranks serve on 127.0.0.1 from ``base_port`` (default: a
    free block), with run id = the run dir's name; ``extra`` adds or overrides variables."""
    return {
        **os.environ,
        "OTEL_EXPORTER_PROMETHEUS_PORT": str(base_port if base_port is not None else free_port_block(2)),
        "OTEL_EXPORTER_PROMETHEUS_HOST": "127.0.0.1",
        "OTEL_ML_RUN_ID": run_dir.name,
        "OTEL_ML_RUN_DIR": str(run_dir),
        **extra,
    }


def demo_command(*args: str) -> list[str]:
    """``otel-ml demo`` with ``args``, run with this interpreter."""
    return [sys.executable, "-m", "otel_ml.cli", "demo", *args]
