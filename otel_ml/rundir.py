"""The run directory: where each rank's files live, how to find them, how they are written.

One folder per rank under the run dir; every file otel_ml writes there is user-only::

    <run_dir>/rank-<rank>/
        endpoint.json          port, URL, host, pid of the rank's /metrics (atomic rewrite)
        metrics.otlp.jsonl     OTLP/JSON metrics (rotated: .1, .2)
        spans.otlp.jsonl       OTLP/JSON spans (rotated: .1, .2)
        timing-summary.json    end-of-run region statistics
        timing-summary.txt     the same, as the table printed at exit
        status.json            state, step, ETA, anomaly episodes (otel_ml.status; atomic rewrite)
        scores.jsonl           every scored sample of otel_ml.scores (rotated like the OTLP files)

Writers (:mod:`otel_ml.runtime`, :mod:`otel_ml.exporters.files`, the timing summary) and readers
(rank 0's progress poller, ``otel-ml targets``, ``inspect`` and ``demo``; :mod:`otel_ml.status`
and :mod:`otel_ml.scores` write theirs) all take their paths
from here.

Example::

    directory = rank_dir(resolve(Path("otel-ml-runs/{run_id}"), "r1"), 0)
    write_private(directory / ENDPOINT_FILE, json.dumps({"port": 9464}))
    [record["port"] for record in read_endpoints(directory.parent)]   # [9464]
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: What ``run_dir`` templates may contain; replaced by the run id.
RUN_ID_PLACEHOLDER = "{run_id}"
RANK_DIR_PREFIX = "rank-"
ENDPOINT_FILE = "endpoint.json"
METRICS_FILE = "metrics.otlp.jsonl"
SPANS_FILE = "spans.otlp.jsonl"
SUMMARY_JSON = "timing-summary.json"
SUMMARY_TEXT = "timing-summary.txt"
STATUS_FILE = "status.json"
SCORES_FILE = "scores.jsonl"
#: Folders and files otel_ml creates: user-only.
DIR_MODE = 0o700
FILE_MODE = 0o600


def resolve(template: str | os.PathLike[str], run_id: str) -> Path:
    """The run dir of ``run_id`` from a template such as ``otel-ml-runs/{run_id}``."""
    return Path(os.fspath(template).replace(RUN_ID_PLACEHOLDER, run_id))


def rank_dir(run_dir: str | os.PathLike[str], rank: int) -> Path:
    """The folder holding one rank's files."""
    return Path(run_dir) / f"{RANK_DIR_PREFIX}{rank}"


def rank_of(directory: Path) -> int | None:
    """The rank a ``rank-<N>`` folder belongs to (None for any other name)."""
    name = directory.name
    if not name.startswith(RANK_DIR_PREFIX):
        return None
    try:
        return int(name[len(RANK_DIR_PREFIX) :])
    except ValueError:
        return None


def rank_dirs(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Every rank folder under ``run_dir``, sorted by rank."""
    found = [(rank_of(p), p) for p in Path(run_dir).glob(f"{RANK_DIR_PREFIX}*") if p.is_dir()]
    return [p for rank, p in sorted((r, p) for r, p in found if r is not None)]


def make_dirs(directory: Path) -> None:
    """Create ``directory`` and its missing parents, user-only."""
    directory.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file, then a rename), user-only.

    Readers polling the file (rank 0's view, ``otel-ml targets``) never see half a file. The
    directory is created when missing (status files are rewritten every few seconds: the usual
    case costs an open, a write and a rename). Raises ``OSError``; callers decide how to report it.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    try:
        fd = os.open(tmp, flags, FILE_MODE)
    except FileNotFoundError:
        make_dirs(path.parent)
        fd = os.open(tmp, flags, FILE_MODE)
    try:
        try:
            view = memoryview(text.encode("utf-8"))
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_endpoints(
    run_dir: str | os.PathLike[str], on_error: Callable[[Path, Exception], None] | None = None
) -> list[dict[str, Any]]:
    """The endpoint records of every rank under ``run_dir``, sorted by rank.

    An unreadable or half-written record is skipped (``on_error`` hears about it).
    """
    records = []
    for directory in rank_dirs(run_dir):
        path = directory / ENDPOINT_FILE
        if not path.exists():
            continue
        try:
            record = json.loads(path.read_text())
            int(record["rank"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if on_error is not None:
                on_error(path, exc)
            continue
        records.append(record)
    return sorted(records, key=lambda r: int(r["rank"]))
