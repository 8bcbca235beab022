"""Reading a finished run dir: every rank's files in order, each bad line reported, not fatal.

A rank's signal files are read oldest first: the rotated backups from the highest number down
(``metrics.otlp.jsonl.2``, ``.1``), then the live file. A line that does not parse is skipped
and reported as a :class:`Problem` naming the file and line: the last line of a file cut short
(a killed process leaves half a line and no newline) as ``truncated``, any other as ``corrupt``.
A folder that holds no rank directories raises :class:`NotARunDirError`. :func:`newest_document`
and :func:`last_points` give what a rank last exported (``otel-ml inspect`` for runs without a
status file).

Example::

    run = read_run(Path("otel-ml-runs/demo-1"), "metrics")
    for rank in run.ranks:
        for document in rank.documents:
            converter.add(document)
    for problem in run.problems:
        print(problem)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from otel_ml.rundir import METRICS_FILE, SPANS_FILE, rank_dirs, rank_of

#: The file of each signal in a rank folder.
SIGNAL_FILES = {"metrics": METRICS_FILE, "spans": SPANS_FILE}


class NotARunDirError(ValueError):
    """The path is not a run dir (missing, not a folder, or no ``rank-<N>`` folders in it)."""


@dataclass(frozen=True)
class Problem:
    """One thing that was skipped: a line (``line`` > 0), a file, or a whole rank folder."""

    path: Path
    line: int
    reason: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else str(self.path)
        return f"{where}: {self.reason}"


@dataclass
class RankFiles:
    """One rank's documents of one signal, oldest first, and the files they came from."""

    rank: int
    directory: Path
    files: list[Path] = field(default_factory=list)
    documents: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RunFiles:
    """What :func:`read_run` found: the ranks with documents, and everything it skipped."""

    run_dir: Path
    ranks: list[RankFiles] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def document_count(self) -> int:
        return sum(len(rank.documents) for rank in self.ranks)


def signal_files(directory: Path, name: str) -> list[Path]:
    """``name`` and its rotated backups in ``directory``, oldest first."""
    backups = []
    for path in directory.glob(f"{name}.*"):
        suffix = path.name[len(name) + 1 :]
        if suffix.isdigit() and path.is_file():
            backups.append((int(suffix), path))
    ordered = [path for _, path in sorted(backups, reverse=True)]
    live = directory / name
    return [*ordered, live] if live.is_file() else ordered


def read_lines(path: Path, problems: list[Problem]) -> Iterator[dict[str, Any]]:
    """Each JSON object of one file; a bad line is appended to ``problems`` and skipped."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        problems.append(Problem(path, 0, f"unreadable ({exc.strerror or exc})"))
        return
    lines = data.split(b"\n")
    cut_short = bool(lines) and lines[-1] != b""  # no newline after the last line
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            document = json.loads(line)
            if not isinstance(document, dict):
                raise ValueError("not a JSON object")
        except ValueError:
            last = number == len(lines) and cut_short
            reason = (
                "truncated last line (the process was probably killed while writing); skipped"
                if last
                else "corrupt line (not an OTLP/JSON document); skipped"
            )
            problems.append(Problem(path, number, reason))
            continue
        yield document


def read_run(run_dir: str | os.PathLike[str], signal: str) -> RunFiles:
    """Every rank's ``signal`` (``metrics`` or ``spans``) documents of the run dir.

    Raises :class:`NotARunDirError` when ``run_dir`` has no ``rank-<N>`` folder; a rank folder
    without files of the signal is reported as a problem, not an error.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise NotARunDirError(f"{path}: not a directory")
    directories = rank_dirs(path)
    if not directories:
        raise NotARunDirError(f"{path}: not a run dir (no rank-<N> folders in it)")
    run = RunFiles(path)
    name = SIGNAL_FILES[signal]
    for directory in directories:
        files = signal_files(directory, name)
        rank = RankFiles(rank_of(directory) or 0, directory, files)
        if not files:
            run.problems.append(Problem(directory, 0, f"no {name} files; rank skipped"))
            continue
        for file in files:
            rank.documents.extend(read_lines(file, run.problems))
        if rank.documents:
            run.ranks.append(rank)
        else:
            run.problems.append(Problem(directory, 0, f"no readable {signal} in {name}*; rank skipped"))
    return run


@dataclass(frozen=True)
class Point:
    """One gauge or sum data point of a metrics document."""

    name: str
    attributes: dict[str, str]
    value: float


def newest_document(directory: Path, signal: str, problems: list[Problem]) -> dict[str, Any] | None:
    """The last readable document of one rank's ``signal`` files (newest file first), or None."""
    for file in reversed(signal_files(directory, SIGNAL_FILES[signal])):
        last = None
        for document in read_lines(file, problems):
            last = document
        if last is not None:
            return last
    return None


def _attribute_value(value: Mapping[str, Any]) -> str:
    for key in ("stringValue", "intValue", "doubleValue", "boolValue"):
        if key in value:
            return str(value[key])
    return ""


def last_points(document: Mapping[str, Any]) -> list[Point]:
    """Every gauge and sum point of one OTLP/JSON metrics document, with its attributes."""
    points = []
    for resource_metrics in document.get("resourceMetrics", []):
        for scope in resource_metrics.get("scopeMetrics", []):
            for metric in scope.get("metrics", []):
                data = metric.get("gauge") or metric.get("sum")
                if not isinstance(data, Mapping):
                    continue
                for point in data.get("dataPoints", []):
                    value = point.get("asDouble", point.get("asInt"))
                    try:
                        number = float(value)
                    except (TypeError, ValueError):
                        continue
                    attributes = {
                        str(a.get("key")): _attribute_value(a.get("value") or {})
                        for a in point.get("attributes", [])
                    }
                    points.append(Point(str(metric.get("name")), attributes, number))
    return points
