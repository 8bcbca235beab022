"""``otel-ml backfill RUN_DIR [RUN_DIR...] --out DIR``: an offline run's metrics as Prometheus blocks.

Every rank's metrics files (rotated backups first) are converted to one OpenMetrics file with the
original timestamps (:mod:`otel_ml.offline.openmetrics`), and ``promtool tsdb
create-blocks-from openmetrics`` turns it into TSDB blocks in ``--out``. A Prometheus started
with ``--storage.tsdb.path=DIR`` (and a retention longer than the run's age, or the blocks are
deleted at start) serves them at once; blocks moved into a running server's data dir are picked
up at its next compaction. ``--openmetrics FILE`` writes the intermediate file, alone or as well.

Bad input is reported on stderr and skipped; the rest is backfilled: a truncated last line (a
killed process), a corrupt line (file:line named), a rank folder without metrics files. A path
that is not a run dir, or a missing ``promtool``, is an error (exit status 2).

Example::

    otel-ml backfill otel-ml-runs/demo-20261122-101500 --out /tmp/otel-ml-tsdb
    prometheus --storage.tsdb.path=/tmp/otel-ml-tsdb --storage.tsdb.retention.time=100y
    otel-ml backfill otel-ml-runs/* --openmetrics runs.om     # for your own tooling
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from otel_ml.offline.openmetrics import OpenMetricsConverter
from otel_ml.offline.runfiles import NotARunDirError, Problem, read_run

PROMTOOL_HINT = "install Prometheus' promtool (apt-get install prometheus) or pass --promtool PATH"


class BackfillError(RuntimeError):
    """Nothing could be backfilled: the message says why (shown as ``otel-ml: <message>``)."""


@dataclass
class Converted:
    """The OpenMetrics text of some run dirs, what went in and what was skipped."""

    text: str
    ranks: int = 0
    documents: int = 0
    series: int = 0
    samples: int = 0
    time_range: tuple[float, float] | None = None
    problems: list[Problem] = field(default_factory=list)


def convert_runs(run_dirs: Sequence[Path]) -> Converted:
    """One OpenMetrics text for every rank of ``run_dirs``; raises :class:`BackfillError`.

    Example::

        converted = convert_runs([Path("otel-ml-runs/demo-1")])
        Path("demo.om").write_text(converted.text)
    """
    converter = OpenMetricsConverter()
    ranks = documents = 0
    problems: list[Problem] = []
    for run_dir in run_dirs:
        try:
            run = read_run(run_dir, "metrics")
        except NotARunDirError as exc:
            raise BackfillError(str(exc)) from None
        problems += run.problems
        for rank in run.ranks:
            ranks += 1
            for number, document in enumerate(rank.documents, start=1):
                try:
                    converter.add(document)
                except ValueError as exc:
                    problems.append(Problem(rank.directory, 0, f"document {number} skipped: {exc}"))
                    continue
                documents += 1
    if not converter.sample_count:
        raise BackfillError(f"no metrics to backfill in {', '.join(map(str, run_dirs))}")
    return Converted(
        converter.text(),
        ranks,
        documents,
        converter.series_count,
        converter.sample_count,
        converter.time_range,
        problems,
    )


def find_promtool(explicit: str | None) -> str:
    """The promtool to run: ``explicit``, else the one on PATH; raises :class:`BackfillError`."""
    if explicit:
        if Path(explicit).is_file() and os.access(explicit, os.X_OK):
            return explicit
        raise BackfillError(f"--promtool {explicit}: not an executable file")
    found = shutil.which("promtool")
    if not found:
        raise BackfillError(f"promtool not found on PATH: {PROMTOOL_HINT} (--openmetrics FILE needs none)")
    return found


def create_blocks(promtool: str, openmetrics: Path, out: Path, max_block_duration: str | None) -> str:
    """Run ``promtool tsdb create-blocks-from openmetrics``; its output, or :class:`BackfillError`."""
    out.mkdir(parents=True, exist_ok=True)
    command = [promtool, "tsdb", "create-blocks-from", "openmetrics"]
    if max_block_duration:
        command.append(f"--max-block-duration={max_block_duration}")
    command += [str(openmetrics), str(out)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=3600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BackfillError(f"{promtool} could not run: {exc}") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise BackfillError(f"promtool failed ({done.returncode}): {' '.join(detail[-3:])}")
    return done.stdout


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help="run dirs to backfill")
    parser.add_argument("--out", type=Path, help="directory for the TSDB blocks (Prometheus' data dir)")
    parser.add_argument("--openmetrics", type=Path, metavar="FILE", help="write the OpenMetrics input here")
    parser.add_argument("--promtool", help="promtool binary (default: the one on PATH)")
    parser.add_argument(
        "--max-block-duration", help="promtool's block size limit, e.g. 24h (default: promtool's, 2h)"
    )


def run(args: argparse.Namespace) -> int:
    if not (args.out or args.openmetrics):
        print("otel-ml backfill: give --out DIR (blocks), --openmetrics FILE, or both", file=sys.stderr)
        return 2
    try:
        promtool = find_promtool(args.promtool) if args.out else None
        converted = convert_runs(args.run_dirs)
    except BackfillError as exc:
        print(f"otel-ml: {exc}", file=sys.stderr)
        return 2
    for problem in converted.problems:
        print(f"otel-ml: {problem}", file=sys.stderr)
    summary = (
        f"{converted.ranks} rank(s), {converted.documents} exports: "
        f"{converted.samples} points in {converted.series} series"
    )
    if args.openmetrics:
        args.openmetrics.write_text(converted.text, encoding="utf-8")
        print(f"otel-ml: {summary} -> {args.openmetrics}")
    if promtool:
        with tempfile.TemporaryDirectory(prefix="otel-ml-backfill-") as scratch:
            source = args.openmetrics or Path(scratch) / "input.om"
            if not args.openmetrics:
                source.write_text(converted.text, encoding="utf-8")
            try:
                output = create_blocks(promtool, source, args.out, args.max_block_duration)
            except BackfillError as exc:
                print(f"otel-ml: {exc}", file=sys.stderr)
                return 1
        blocks = sum(1 for line in output.splitlines() if line[:1].isalnum() and "BLOCK" not in line)
        print(f"otel-ml: {summary} -> {blocks} block(s) in {args.out}")
        print(
            f"  serve them: deploy/local/run.sh --backfilled {args.out}  (or prometheus "
            f"--storage.tsdb.path={args.out} --storage.tsdb.retention.time=100y)"
        )
        if converted.time_range:
            first, last = converted.time_range
            print(
                f"  recording rules over the run: promtool tsdb create-blocks-from rules --url URL "
                f"--start {int(first)} --end {int(last) + 1} --output-dir DIR RULE_FILE"
            )
    if converted.problems:
        print(f"otel-ml: {len(converted.problems)} problem(s) above were skipped", file=sys.stderr)
    return 0
