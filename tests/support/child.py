"""A child Python process the test talks to while it runs: lines in, lines out, bounded waits.

Reliability tests drive a training process through phases (train, wait for the test to change
the world, train again) and inspect it between phases. :class:`LiveChild` reads the child's
stdout and stderr on background threads, so the test can wait for a line with a deadline
instead of blocking on ``readline()`` forever when the child hangs.

Example::

    child = LiveChild.start(processes, SCRIPT, env=clean_env(tmp_path), cwd=tmp_path)
    child.wait_line(lambda line: line == "phase 0 done", timeout=30)
    child.send()                      # one newline on stdin: the next phase
    assert child.wait_exit(30) == 0
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

#: Variables that configure otel_ml, OTel or a launcher: stripped from a child's environment.
_PREFIXES = ("OTEL_", "TORCHELASTIC_", "SLURM_", "OMPI_", "MASTER_")
_LAUNCHER = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "PYTHONWARNINGS"}


def clean_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    """The test's environment without otel_ml/OTel/launcher settings, plus test defaults.

    Defaults: a run dir under ``tmp_path``, ``/metrics`` on any free 127.0.0.1 port, fast export
    intervals, rank 0 of 1, unbuffered output, one torch thread.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(_PREFIXES) and k not in _LAUNCHER}
    env.update(
        {
            "OTEL_SERVICE_NAME": "reliability-test",
            "OTEL_ML_RUN_ID": "reliability-run",
            "OTEL_ML_RUN_DIR": str(tmp_path / "run"),
            "OTEL_EXPORTER_PROMETHEUS_PORT": "0",
            "OTEL_EXPORTER_PROMETHEUS_HOST": "127.0.0.1",
            "OTEL_METRIC_EXPORT_INTERVAL": "300",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
        }
    )
    env.update(overrides)
    return env


class _Lines:
    """Lines of one pipe, collected by a daemon thread."""

    def __init__(self, stream: IO[str], cond: threading.Condition) -> None:
        self.lines: list[str] = []
        self.closed = False
        self._stream = stream
        self._cond = cond
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for line in self._stream:
                with self._cond:
                    self.lines.append(line.rstrip("\n"))
                    self._cond.notify_all()
        finally:
            with self._cond:
                self.closed = True
                self._cond.notify_all()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


class LiveChild:
    """A running child process with line-based stdin/stdout and bounded waits (see module doc)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.pid = proc.pid
        self._cond = threading.Condition()
        self._out = _Lines(proc.stdout, self._cond)
        self._err = _Lines(proc.stderr, self._cond)

    @classmethod
    def start(cls, processes: Any, code: str, *, env: dict[str, str], cwd: Path) -> LiveChild:
        """Start ``python -c code`` through the ``processes`` fixture (killed at teardown)."""
        proc = processes.start(
            [sys.executable, "-c", code],
            env=env,
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        return cls(proc)

    # ------------------------------------------------------------------ output
    @property
    def stdout_lines(self) -> list[str]:
        with self._cond:
            return list(self._out.lines)

    @property
    def stderr_lines(self) -> list[str]:
        with self._cond:
            return list(self._err.lines)

    @property
    def output(self) -> str:
        """Everything printed so far, for assertion messages."""
        out = "\n".join(self.stdout_lines[-60:])
        err = "\n".join(self.stderr_lines[-60:])
        return f"--- stdout (tail)\n{out}\n--- stderr (tail)\n{err}"

    def wait_line(self, predicate: Callable[[str], bool], timeout: float, what: str = "") -> str:
        """The first stdout line satisfying ``predicate``; fails on timeout or when the child ends."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self._out.lines:
                    if predicate(line):
                        return line
                if self._out.closed:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, 0.05))
        state = "ended" if self._out.closed else f"timed out after {timeout:g}s"
        raise AssertionError(f"child {state} waiting for {what or predicate}\n{self.output}")

    def wait_prefix(self, prefix: str, timeout: float) -> str:
        return self.wait_line(lambda line: line.startswith(prefix), timeout, repr(prefix))

    # ------------------------------------------------------------------ control
    def send(self, text: str = "\n") -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def wait_exit(self, timeout: float) -> int:
        """The exit status (negative: killed by that signal); fails when the child outlives ``timeout``."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"child still running after {timeout:g}s\n{self.output}") from None
        self._out.join(5)
        self._err.join(5)
        return code
