"""The ``otel-ml`` command: its parser, and the small subcommand ``targets``.

Subcommands:

* ``demo``: a real multi-rank training run with telemetry on (see :mod:`otel_ml.cli.demo`);
* ``targets RUN_DIR``: Prometheus ``file_sd`` JSON for the ranks of a run, from their port files;
* ``inspect RUN_DIR [--json]``: how each rank is doing or ended: state, steps, loss, throughput,
  anomalies, the slowest rank (:mod:`otel_ml.cli.inspect`);
* ``top``: a live terminal view of every rank, from Prometheus or the ranks' ``/metrics``;
* ``backfill RUN_DIR... --out DIR``: an offline run as Prometheus blocks (:mod:`otel_ml.cli.backfill`);
* ``replay RUN_DIR --otlp URL``: an offline run sent to a collector (:mod:`otel_ml.cli.replay`).

Example::

    otel-ml demo --ranks 2 --steps 300
    otel-ml targets otel-ml-runs/demo-20261122-101500 > /etc/prometheus/targets/run.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from otel_ml._version import __version__
from otel_ml.rundir import read_endpoints


def endpoint_files(run_dir: Path) -> list[dict[str, Any]]:
    """The endpoint records of every rank under ``run_dir``, sorted by rank (bad ones reported)."""
    return read_endpoints(
        run_dir, lambda path, exc: print(f"otel-ml: skipping {path}: {exc}", file=sys.stderr)
    )


def file_sd_targets(records: list[dict[str, Any]], host: str | None = None) -> list[dict[str, Any]]:
    """Prometheus file_sd groups: one target per rank, labelled with ``run_id`` and ``rank``.

    ``host`` overrides the address (default: the rank's bind address, or its hostname when it
    listens on all interfaces).
    """
    groups = []
    for record in records:
        if not record.get("port"):
            continue
        address = host or record.get("bind") or record.get("host", "localhost")
        if address in ("0.0.0.0", "::", ""):
            address = record.get("host", "localhost")
        address = f"[{address}]" if ":" in address else address
        groups.append(
            {
                "targets": [f"{address}:{record['port']}"],
                "labels": {"run_id": str(record.get("run_id", "")), "rank": str(record.get("rank", ""))},
            }
        )
    return groups


def cmd_targets(args: argparse.Namespace) -> int:
    groups = file_sd_targets(endpoint_files(args.run_dir), args.host)
    json.dump(groups, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0 if groups else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Imported on use, not to dodge a cycle: ``top`` and ``demo`` pull in HTTP and torch, and
    # ``otel-ml targets`` should start in milliseconds without them.
    if argv[:1] == ["top"]:
        from otel_ml.cli import top

        return top.main(argv[1:])
    parser = argparse.ArgumentParser(prog="otel-ml", description="otel_ml command line")
    parser.add_argument("--version", action="version", version=f"otel-ml {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    from otel_ml.cli import demo

    demo_parser = sub.add_parser("demo", help="run the multi-rank training demo")
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(func=lambda a: demo.worker(a) if a.worker else demo.launch(a))

    targets = sub.add_parser("targets", help="Prometheus file_sd JSON from a run dir's port files")
    targets.add_argument("run_dir", type=Path)
    targets.add_argument("--host", help="address to scrape instead of the recorded one")
    targets.set_defaults(func=cmd_targets)

    sub.add_parser("top", help="every rank of a run at a glance (see otel-ml top --help)", add_help=False)

    from otel_ml.cli import inspect

    inspect_parser = sub.add_parser("inspect", help="each rank's state, steps, loss and anomalies")
    inspect.add_arguments(inspect_parser)
    inspect_parser.set_defaults(func=inspect.run)

    from otel_ml.cli import backfill

    backfill_parser = sub.add_parser("backfill", help="an offline run dir as Prometheus TSDB blocks")
    backfill.add_arguments(backfill_parser)
    backfill_parser.set_defaults(func=backfill.run)

    from otel_ml.cli import replay

    replay_parser = sub.add_parser("replay", help="send an offline run dir to an OTLP collector")
    replay.add_arguments(replay_parser)
    replay_parser.set_defaults(func=replay.run)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
