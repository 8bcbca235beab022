"""Shared pytest fixtures (keep this file to fixtures only)."""

from __future__ import annotations

import pytest

from otel_ml._testing import reset
from tests.support.fixtures import otlp_receiver, otlp_receiver_factory, refused_port  # noqa: F401


@pytest.fixture(autouse=True)
def _fresh_process_state():
    """otel_ml's state is process-wide (running instance, recorder, module tracers, progress
    board, anomaly callbacks, warn_once): each test starts from, and leaves, a fresh import's."""
    reset()
    yield
    reset()


@pytest.fixture(scope="session")
def readme_text() -> str:
    from pathlib import Path

    return (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


_MEASUREMENTS: list[tuple[str, str]] = []


@pytest.fixture
def measure():
    """Record a measured number for the end-of-run table (the README's reliability table):
    ``measure("collector back: exports resume after", f"{seconds:.2f} s")``."""

    def record(name: str, value: str) -> None:
        _MEASUREMENTS.append((name, value))

    return record


def pytest_terminal_summary(terminalreporter):
    if not _MEASUREMENTS:
        return
    terminalreporter.section("otel_ml measurements")
    terminalreporter.write_line("| measured | value |")
    terminalreporter.write_line("|---|---|")
    for name, value in _MEASUREMENTS:
        terminalreporter.write_line(f"| {name} | {value} |")
