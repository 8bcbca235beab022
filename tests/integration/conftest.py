"""Integration fixtures: real binaries (fail instead of skip when OTEL_ML_REQUIRE_INTEGRATION=1)
and child processes that are always stopped."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

REQUIRED = os.environ.get("OTEL_ML_REQUIRE_INTEGRATION", "") not in ("", "0", "false")


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} not found (apt-get install prometheus prometheus-alertmanager)"
    if REQUIRED:
        pytest.fail(message + "; OTEL_ML_REQUIRE_INTEGRATION=1 makes this a failure")
    pytest.skip(message)


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    return _binary("prometheus")


@pytest.fixture(scope="session")
def promtool_binary() -> str:
    return _binary("promtool")


@pytest.fixture(scope="session")
def alertmanager_binary() -> str:
    return _binary("prometheus-alertmanager")


@pytest.fixture(scope="session")
def amtool_binary() -> str:
    return _binary("amtool")


class Processes:
    """Starts child processes in their own session and kills what is left at teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[str], **kwargs) -> subprocess.Popen:
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(args, **kwargs)
        self.procs.append(proc)
        return proc

    def python(self, code: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
        merged = {**os.environ, **(env or {})}
        return self.start([sys.executable, "-c", code], env=merged, **kwargs)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)


@pytest.fixture
def processes() -> Iterator[Processes]:
    group = Processes()
    yield group
    group.stop_all()
