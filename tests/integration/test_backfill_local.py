"""``deploy/local/run.sh --backfilled DIR``: the native Prometheus serves blocks made by
``otel-ml backfill`` with the shipped rules loaded."""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from otel_ml.cli.main import main
from tests.integration.conftest import Processes
from tests.integration.test_deploy_local import RUN_SH, _run_sh_env
from tests.support.net import wait_until
from tests.test_offline import GOLDEN_RUN

pytestmark = pytest.mark.integration

#: The golden run's last export of rank 1 (seconds), from tests/data/golden-run.om.
GOLDEN_END = 1796309548.9


def _api(base: str, path: str, **params: str) -> dict:
    url = f"{base}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)["data"]


def test_run_sh_serves_backfilled_blocks_with_the_rules(
    tmp_path: Path, prometheus_binary: str, alertmanager_binary: str, promtool_binary: str
) -> None:
    blocks = tmp_path / "tsdb"
    assert main(["backfill", str(GOLDEN_RUN), "--out", str(blocks)]) == 0
    env = _run_sh_env(tmp_path, prometheus_binary, alertmanager_binary)
    base = f"http://127.0.0.1:{env['PROMETHEUS_PORT']}"
    processes = Processes()
    log = tmp_path / "run.sh.log"
    try:
        with open(log, "w") as output:
            proc = processes.start(
                ["bash", str(RUN_SH), "--backfilled", str(blocks)],
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
            )

        def loss() -> list | None:
            if proc.poll() is not None:
                raise AssertionError(f"run.sh exited {proc.returncode}: {log.read_text()}")
            try:
                return _api(base, "query", query='otel_ml_loss{rank="1"}[1m]', time=str(GOLDEN_END))["result"]
            except OSError:
                return None

        (series,) = wait_until(loss, 60, 0.2, "run.sh --backfilled: the golden loss")
        assert [float(v) for _, v in series["values"]] == [2.976665496826172, 1.5883395671844482]
        groups = _api(base, "rules")["groups"]
        assert {rule["name"] for group in groups for rule in group["rules"]} >= {"TrainingLossNaN"}
        wait_until(lambda: f"TSDB          {blocks}" in log.read_text(), 30, 0.1, "run.sh's summary")
    finally:
        processes.stop_all()


def test_run_sh_refuses_a_backfilled_dir_that_does_not_exist(
    tmp_path: Path, prometheus_binary: str, alertmanager_binary: str
) -> None:
    env = _run_sh_env(tmp_path, prometheus_binary, alertmanager_binary)
    done = subprocess.run(
        ["bash", str(RUN_SH), "--backfilled", str(tmp_path / "nope")],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "not a directory (make it with: otel-ml backfill RUN_DIR --out" in done.stderr
