"""Every rank's progress, end to end: rank 0's terminal (through a pty) and ``otel-ml top``
against a real 2-rank run and a real Prometheus."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from otel_ml.cli.main import endpoint_files, file_sd_targets
from tests.support.demo import demo_command, demo_env
from tests.support.net import free_port, free_port_block, wait_until
from tests.support.prometheus import PrometheusServer

pytestmark = pytest.mark.integration

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _demo_env(run_dir: Path, base_port: int) -> dict[str, str]:
    return demo_env(run_dir, base_port, COLUMNS="160")


def test_rank_zero_terminal_shows_both_ranks_and_a_global_eta(tmp_path, processes):
    run_dir = tmp_path / "pty-run"
    primary, secondary = pty.openpty()
    demo = processes.start(
        [sys.executable, "-m", "otel_ml.cli", "demo", "--ranks", "2", "--steps", "500", "--files", "4"],
        env=_demo_env(run_dir, free_port_block(2)),
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
    )
    os.close(secondary)
    chunks = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([primary], [], [], 1.0)
        if ready:
            try:
                data = os.read(primary, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif demo.poll() is not None:
            break
    os.close(primary)
    assert demo.wait(30) == 0
    screen = ANSI.sub("", b"".join(chunks).decode("utf-8", "replace"))
    assert "\x1b[" in b"".join(chunks).decode("utf-8", "replace"), "a terminal gets in-place redraws"
    rank0 = re.findall(r"\[rank 0\] train +\d+% .* \d+/500 step \[[\d.]+ step/s, ETA \d\d:\d\d\]", screen)
    rank1 = re.findall(r"\[rank 1\] train +\d+% .* \d+/500 step \[[\d.]+ step/s, ETA \d\d:\d\d\]", screen)
    total = re.findall(
        r"\[all 2/2\] train +\d+% .* [\d.]+k?/1\.00k step \[.*ETA \d\d:\d\d \(slowest: rank [01]\)\]", screen
    )
    assert rank0 and rank1 and total, screen[-3000:]


def _start_training(processes, run_dir: Path) -> list[dict]:
    """A long 2-rank demo (training only); returns both ranks' endpoint records once they exist."""
    processes.start(
        demo_command("--ranks", "2", "--steps", "3000", "--files", "0"),
        env=_demo_env(run_dir, free_port_block(2)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def ready():
        records = endpoint_files(run_dir)
        return records if len(records) == 2 else None

    return wait_until(ready, 60, what="two endpoint files")


def _top_once(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "otel_ml.cli", "top", "--once", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_top_once_against_a_running_two_rank_job_and_a_down_target(tmp_path, processes):
    run_dir = tmp_path / "top-run"
    records = _start_training(processes, run_dir)
    dead = f"127.0.0.1:{free_port()}"
    targets = ",".join(f"127.0.0.1:{r['port']}" for r in records) + "," + dead

    def frame():
        out = _top_once("--targets", targets)
        assert out.returncode == 0, out.stderr
        text = out.stdout
        ok = all(re.search(rf"\[rank {r}\] train +\d+% .* [\d.]+k?/3\.00k step", text) for r in (0, 1))
        return text if ok and "loss " in text else None

    text = wait_until(frame, 60, interval=0.5, what="top frame with both ranks")
    assert "2/3 ranks up" in text
    assert f"[{dead}] down" in text
    assert re.search(r"\[all 2/3\] train .* [\d.]+k?/6\.00k step", text)


def test_top_once_against_a_real_prometheus(tmp_path, processes, prometheus_binary):
    run_dir = tmp_path / "top-prom"
    records = _start_training(processes, run_dir)
    with PrometheusServer(prometheus_binary, tmp_path / "prom", file_sd=file_sd_targets(records)) as prom:
        prom.wait_for('otel_ml_progress_completed{run_id="top-prom"}', lambda r: len(r) == 2)

        def frame():
            out = _top_once("--prometheus", prom.url)
            text = out.stdout
            both = all(re.search(rf"\[rank {r}\] train +\d+% .* [\d.]+k?/3\.00k step", text) for r in (0, 1))
            return text if both and "run top-prom" in text and "loss " in text else None

        text = wait_until(frame, 60, interval=0.5, what="top frame from Prometheus")
        assert "2/2 ranks up" in text
        assert re.search(r"\[all 2/2\] train .* [\d.]+k?/6\.00k step .*slowest: rank [01]", text)
