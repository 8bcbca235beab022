"""Shared pytest fixtures (keep this file to fixtures only)."""

from __future__ import annotations

import pytest

from otel_ml._logging import reset_warnings
from tests.support.fixtures import otlp_receiver, otlp_receiver_factory, refused_port  # noqa: F401


@pytest.fixture(autouse=True)
def _fresh_warn_once():
    """warn_once() is process-wide; each test starts from a clean slate."""
    reset_warnings()
    yield
    reset_warnings()


@pytest.fixture(scope="session")
def readme_text() -> str:
    from pathlib import Path

    return (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
