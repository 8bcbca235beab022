"""Pieces every benchmark shares: the machine facts line printed above each table, an OTel span
exporter that discards (to measure span creation without any export cost), and the scraper
process that stands in for Prometheus.

The benchmarks run as scripts (``python benchmarks/bench_x.py``), so this imports as ``_common``.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

#: Prometheus' stand-in, a separate process like the real one: ``python -c SCRAPER url seconds``.
#: Like Prometheus it keeps one HTTP/1.1 connection open between scrapes and asks for gzip.
SCRAPER = textwrap.dedent(
    """
    import http.client, sys, time, urllib.parse
    url, every = urllib.parse.urlsplit(sys.argv[1]), float(sys.argv[2])
    headers = {"Accept-Encoding": "gzip", "Accept": "text/plain;version=0.0.4;q=0.9,*/*;q=0.1"}
    conn = None
    while True:
        try:
            if conn is None:
                conn = http.client.HTTPConnection(url.hostname, url.port, timeout=5)
            conn.request("GET", url.path, headers=headers)
            conn.getresponse().read()
        except (OSError, http.client.HTTPException):
            if conn is not None:
                conn.close()
            conn = None
        time.sleep(every)
    """
)


def start_scraper(url: str, every: float, core: int | None = None) -> subprocess.Popen:
    """Scrape ``url`` every ``every`` seconds from another process until it is killed; pinned to
    ``core`` when given."""
    pin = (lambda: os.sched_setaffinity(0, {core})) if core is not None else None
    return subprocess.Popen([sys.executable, "-c", SCRAPER, url, str(every)], preexec_fn=pin)


class Discard(SpanExporter):
    """Accepts every batch and drops it."""

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def machine_facts(*packages: str) -> str:
    """Python, torch (and its thread count), CPUs, kernel, otel_ml, the OTel SDK and ``packages``."""
    import otel_ml
    from otel_ml.regions.recorder import ACCELERATED

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next(
        (ln.split(":")[1].strip() for ln in info.splitlines() if "model name" in ln), platform.machine()
    )
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch = sys.modules.get("torch")
    threads = f" ({torch.get_num_threads()} thread)" if torch is not None else ""
    torch_facts = f", torch {torch.__version__}{threads}" if torch is not None else ""
    extra = "".join(f", {name} {version(name)}" for name in packages)
    return (
        f"Python {platform.python_version()}{torch_facts}, {os.cpu_count()} CPUs ({usable} usable, {cpu}), "
        f"{platform.system()} {platform.release()}, otel_ml {otel_ml.__version__} "
        f"({'C' if ACCELERATED else 'Python'} regions), "
        f"opentelemetry-sdk {version('opentelemetry-sdk')}{extra}"
    )
