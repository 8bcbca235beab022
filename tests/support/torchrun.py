"""A real 2-process torchrun job (gloo, CPU) whose ranks the test scrapes while they run.

The job's script pauses at a step until the test releases it (``PAUSE_FILE``), so the test reads
both ranks' ``/metrics`` while training is under way (progress bars open, regions aggregated),
then lets it finish and checks the exit status.

Example::

    job = TorchrunJob.start(processes, tmp_path, SCRIPT)
    samples = job.wait_paused()          # {rank: parsed /metrics} once both ranks reached the pause
    job.release(); job.finish()
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

from otel_ml.cli.main import endpoint_files
from tests.support.child import clean_env
from tests.support.metrics import parse_exposition
from tests.support.net import free_port

#: Prepended to every job script: rank, where to pause, at which step rank 1 injects a NaN.
PRELUDE = textwrap.dedent(
    """
    import os, time
    RANK = int(os.environ["RANK"])
    PAUSE_AT = int(os.environ["PAUSE_AT"])
    NAN_AT = int(os.environ["NAN_AT"])
    TOTAL = int(os.environ["TOTAL_STEPS"])

    def pause(step):
        if step == PAUSE_AT:
            print(f"rank {RANK} paused at {step}", flush=True)
            deadline = time.monotonic() + 120
            while not os.path.exists(os.environ["PAUSE_FILE"]) and time.monotonic() < deadline:
                time.sleep(0.05)
    """
)


class TorchrunJob:
    """A running ``torchrun --nproc-per-node 2`` job (see module docstring)."""

    def __init__(self, proc: subprocess.Popen, run_dir: Path, pause_file: Path, log: Path) -> None:
        self.proc = proc
        self.run_dir = run_dir
        self.pause_file = pause_file
        self.log = log

    @classmethod
    def start(
        cls,
        processes: Any,
        tmp_path: Path,
        script: str,
        *,
        runner: tuple[str, ...] = (),
        launcher: tuple[str, ...] = ("-m", "torch.distributed.run"),
        launcher_args: tuple[str, ...] = (),
        total: int = 8,
        pause_at: int = 6,
        nan_at: int = 4,
        **env: str,
    ) -> TorchrunJob:
        """Write ``script`` (after :data:`PRELUDE`) and launch it on 2 ranks.

        ``runner`` runs the script through a module (``("-m", "otel_ml.integrations.tensorboard")``).
        """
        path = tmp_path / "job.py"
        path.write_text(PRELUDE + textwrap.dedent(script), encoding="utf-8")
        run_dir = tmp_path / "run"
        pause_file = tmp_path / "release"
        environment = clean_env(
            tmp_path,
            OTEL_ML_RUN_ID=f"torchrun-{tmp_path.name}"[:60],
            OTEL_ML_RUN_DIR=str(run_dir),
            OTEL_ML_PROGRESS_VIEW="off",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            PAUSE_FILE=str(pause_file),
            PAUSE_AT=str(pause_at),
            NAN_AT=str(nan_at),
            TOTAL_STEPS=str(total),
            **env,
        )
        args = [
            sys.executable,
            *launcher,
            "--nnodes",
            "1",
            "--nproc-per-node",
            "2",
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{free_port()}",
            *launcher_args,
            *(runner if runner else ()),
            str(path),
        ]
        log = tmp_path / "job.log"
        with log.open("w", encoding="utf-8") as out:  # a file, not a pipe: a full pipe would block the job
            proc = processes.start(args, env=environment, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
        return cls(proc, run_dir, pause_file, log)

    def urls(self, timeout: float = 90) -> dict[int, str]:
        """``{rank: /metrics URL}`` of both ranks, from their endpoint files."""

        def probe() -> dict[int, str] | None:
            records = [r for r in endpoint_files(self.run_dir) if r.get("url")]
            return {r["rank"]: r["url"] for r in records} if len(records) == 2 else None

        return wait_for(probe, timeout, "both ranks' endpoint files", self)

    def scrape(self, url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
        with urllib.request.urlopen(url, timeout=5) as response:
            return parse_exposition(response.read().decode())

    def wait_paused(self, step: int, timeout: float = 120) -> dict[int, dict]:
        """Both ranks' ``/metrics`` once each has logged ``step`` (the pause step)."""
        urls = self.urls()

        def probe() -> dict[int, dict] | None:
            scraped = {rank: self.scrape(url) for rank, url in urls.items()}
            steps = {rank: [v for _, v in s.get("otel_ml_step", [])] for rank, s in scraped.items()}
            return scraped if all(values == [step] for values in steps.values()) else None

        return wait_for(probe, timeout, f"both ranks at step {step}", self)

    def release(self) -> None:
        self.pause_file.write_text("go", encoding="utf-8")

    def finish(self, timeout: float = 120) -> str:
        """Wait for the job to end; its output. Fails unless it exited 0."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"job still running after {timeout}s\n{self.output()}") from None
        assert self.proc.returncode == 0, self.output()
        return self.log.read_text(encoding="utf-8", errors="replace")

    def output(self) -> str:
        """The tail of the job's output (both ranks and the agent), for failure messages."""
        return self.log.read_text(encoding="utf-8", errors="replace")[-8000:]


def wait_for(probe: Any, timeout: float, what: str, job: TorchrunJob) -> Any:
    """Poll ``probe`` until truthy; fail at once when the job ended, with its output at the deadline."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if job.proc.poll() is not None:
            raise AssertionError(f"job ended ({job.proc.returncode}) waiting for {what}:\n{job.output()}")
        try:
            result = probe()
            if result:
                return result
        except (OSError, ValueError) as exc:  # a rank not serving yet, a scrape cut short
            last = exc
        time.sleep(0.2)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what} (last error {last!r}):\n{job.output()}"
    )


def value(samples: dict, name: str, **labels: str) -> float | None:
    """The one sample ``name`` with ``labels`` (None when absent)."""
    found = [v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items())]
    assert len(found) <= 1, f"{name}{labels}: {found}"
    return found[0] if found else None
