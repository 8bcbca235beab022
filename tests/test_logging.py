"""otel_ml's logger prints its warnings to stderr when the application configured no logging,
and stays out of the way (no second copy) when it did. Each case runs in a fresh interpreter:
pytest's own log capture is an application handler."""

from __future__ import annotations

import subprocess
import sys

import pytest

WARN = (
    "from otel_ml._logging import logger, warn_once\n"
    "logger.info('quiet info')\n"
    "warn_once('k', 'otel_ml: hello %s', 'there')\n"
)


def _run(setup: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", setup + "\n" + WARN], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    "setup", ["", "import logging\nlogging.lastResort = None"], ids=["plain", "no-last-resort"]
)
def test_without_logging_configured_a_warning_reaches_stderr_once(setup):
    # otel_ml's own handler prints it, not logging's last resort (which a library may switch off)
    out = _run(setup)
    assert out.returncode == 0, out.stderr
    assert out.stderr == "otel_ml: hello there\n" and out.stdout == ""


@pytest.mark.parametrize(
    ("setup", "stderr"),
    [
        ("import logging\nlogging.basicConfig(format='app %(message)s')", "app otel_ml: hello there\n"),
        ("import logging, sys\nh = logging.StreamHandler(sys.stderr)\nh.setFormatter(logging.Formatter("
         "'own %(message)s'))\nlogging.getLogger('otel_ml').addHandler(h)", "own otel_ml: hello there\n"),
        ("import logging\nlogging.getLogger().addHandler(logging.NullHandler())", ""),
    ],
    ids=["root-handler", "handler-on-otel_ml", "app-silences-everything"],
)  # fmt: skip
def test_an_application_handler_takes_over_and_nothing_is_printed_twice(setup, stderr):
    out = _run(setup)
    assert out.returncode == 0, out.stderr
    assert out.stderr == stderr


def test_without_propagation_the_root_handler_does_not_count():
    # the application cut otel_ml off from its root handler and gave it none: the fallback prints
    out = _run(
        "import logging\nlogging.basicConfig(format='app %(message)s')\n"
        "logging.getLogger('otel_ml').propagate = False"
    )
    assert out.stderr == "otel_ml: hello there\n"


def test_on_a_terminal_the_warning_clears_the_progress_bar_line_first():
    import os
    import pty

    primary, secondary = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-c", WARN], stderr=secondary, timeout=60)
        os.close(secondary)
        secondary = -1
        data = os.read(primary, 4096).decode()
    finally:
        os.close(primary)
        if secondary >= 0:
            os.close(secondary)
    assert proc.returncode == 0
    assert data.startswith("\r\x1b[2Kotel_ml: hello there")
