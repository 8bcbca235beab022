"""``otel_ml.scores(...)``: the per-sample scores of a scoring or evaluation job, in three places.

A job that scores samples batch by batch (a reward model, an evaluator, a judge) hands each
batch's scores, with optional sample ids and a short text, to a :class:`Scores`. The same
numbers then appear

- on the rank's terminal, inline (printing is the point): a line per sample
  (``[Sample 3] id=q-3 Score: 6.800 | Response: ...``, the text on one line, truncated), a line
  per batch (``[Batch 1] samples 0-3 done, avg_score=7.900``) and a final summary
  (``[Summary] score: count=8 nonfinite=1 mean=7.125 min=5.000 max=9.100 std=1.234``). What is
  printed is ``show`` (``off``, ``batch``: batch lines and the summary, ``sample``: also every
  sample); its default is the ``score_print`` option (``OTEL_ML_SCORE_PRINT``, default ``batch``);
- as series, through the distribution ingest of ``log()``: ``otel_ml_distribution{metric=name}``
  (histogram of every finite score: ``_count`` and ``_sum`` are the summary's count and total) and
  ``otel_ml_distribution_last_{size,mean,min,max,stddev}{metric=name}`` (the last batch, as in its
  batch line); NaN/Inf scores go to ``otel_ml_nonfinite_total{metric=name}``. The job's bar is an
  :class:`otel_ml.tqdm` (``otel_ml_progress_*{task=desc}`` and rank 0's view of every rank);
- in ``<run_dir>/rank-<rank>/scores.jsonl``: one JSON line per sample (``name``, ``batch``,
  ``index``, ``id``, ``score``, ``text``; a NaN/Inf score is written as ``"NaN"``, ``"Infinity"``
  or ``"-Infinity"``, as in the protobuf JSON mapping, so the file stays strict JSON). The file is
  written by a background thread and rotated like the other run-dir files (``file_max_bytes``,
  ``file_backups``); a write error turns it off with one warning.

NaN/Inf scores are counted as ``nonfinite``, left out of every statistic, and still printed and
written. Scores may be a number, a list, a numpy array or a tensor; a CUDA tensor is copied to
the host (a sync: the scores are printed at once). Bad input (not numbers, ids or texts of
another length) raises ``ValueError``; a telemetry failure never does.

Before ``init()`` (or with telemetry disabled) a :class:`Scores` runs locally: it prints and
shows its bar, and exports and writes nothing (one log line says so).

Example::

    otel_ml.init()
    with otel_ml.scores("score", total=len(dataset), show="sample") as scorer:
        for batch in loader:
            scorer.add(judge(batch), ids=batch["id"], texts=batch["response"])
    scorer.summary.mean
"""

from __future__ import annotations

import atexit
import json
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from otel_ml._logging import logger, warn_once
from otel_ml.config import Config
from otel_ml.distribution import Summary, host_values, summarize
from otel_ml.exporters._worker import THREAD_PREFIX
from otel_ml.exporters.files import _RotatingFile
from otel_ml.health import TelemetryHealth
from otel_ml.progress.bar import tqdm
from otel_ml.rundir import SCORES_FILE, rank_dir
from otel_ml.runtime import Telemetry, get_telemetry
from otel_ml.score_lines import ScoreSummary, batch_line, json_score, sample_line, summary_line
from otel_ml.threads import name_native
from otel_ml.values import UnusableValueError, tensor_type

SHOW_MODES = ("off", "batch", "sample")
#: Characters of a sample's text kept in the file (the terminal line keeps ``width``).
MAX_FILE_TEXT = 4096
#: Records waiting for the writer at most; more are dropped and counted (signal ``scores``).
MAX_QUEUED_RECORDS = 65536


def _host_scores(scores: Any) -> list[float]:
    tensor_cls = tensor_type()
    if tensor_cls is not None and isinstance(scores, tensor_cls) and not scores.is_cpu:
        scores = scores.detach().cpu()  # a sync, and the point: these scores are printed now
    if isinstance(scores, (int, float)) or (getattr(scores, "shape", None) == ()):
        scores = [scores]
    try:
        return host_values(scores)
    except UnusableValueError as exc:
        raise ValueError(f"otel_ml.scores: scores must be numbers ({exc})") from None


def _column(values: Any, size: int, what: str) -> list[Any] | None:
    if values is None:
        return None
    tolist = getattr(values, "tolist", None)
    items = list(tolist() if callable(tolist) else values)
    if len(items) != size:
        raise ValueError(f"otel_ml.scores: {len(items)} {what} for {size} scores")
    return items


def _json_id(sample_id: Any) -> Any:
    return sample_id if sample_id is None or isinstance(sample_id, (int, str)) else str(sample_id)


# ---------------------------------------------------------------------- the background writer
class _RecordWriter:
    """Writes score records as JSON lines from a daemon thread (the pattern of exporters._worker).

    Records are encoded and written off the caller's thread; the queue is bounded (overflow is
    dropped and counted); a write error turns the file off with one warning.
    """

    def __init__(self, path: Path, max_bytes: int, backups: int, health: TelemetryHealth) -> None:
        self.path = path
        self._file = _RotatingFile(path, max_bytes, backups)
        self._health = health
        self._queue: deque[dict[str, Any]] = deque()
        self._cond = threading.Condition()
        self._stopping = self._disabled = False
        self._thread = threading.Thread(target=self._run, name=f"{THREAD_PREFIX}-scores", daemon=True)
        self._thread.start()

    def put(self, records: list[dict[str, Any]]) -> None:
        with self._cond:
            room = 0 if self._disabled else max(0, MAX_QUEUED_RECORDS - len(self._queue))
            if len(records) > room:
                self._health.dropped("scores", len(records) - room)
                records = records[:room]
            self._queue.extend(records)
            self._cond.notify()

    def _run(self) -> None:
        name_native(self._thread.name)
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                batch, stopping = list(self._queue), self._stopping
                self._queue.clear()
            self._write(batch)
            if stopping and not self._queue:
                self._file.close()
                return

    def _write(self, batch: list[dict[str, Any]]) -> None:
        if not batch:
            return
        if self._disabled:
            self._health.dropped("scores", len(batch))
            return
        try:
            for record in batch:  # one write per line: rotation happens between lines, never inside one
                text = json.dumps(record, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
                self._file.write(text.encode("utf-8", "replace") + b"\n")
        except OSError as exc:
            self._disabled = True
            self._health.error("files")
            self._health.dropped("scores", len(batch))
            warn_once(
                "scores-file",
                "otel_ml: writing %s failed (%s); the scores file is off",
                self.path,
                exc.strerror or exc,
            )

    def close(self, timeout: float) -> bool:
        """Write what is queued and end the thread within ``timeout`` seconds (False if it did not)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(max(0.0, timeout))
        return not self._thread.is_alive()


_writers_lock = threading.Lock()
_writers: dict[Path, list[Any]] = {}  # path -> [writer, users]: scorers of a process share a file


def _open_writer(path: Path, max_bytes: int, backups: int, health: TelemetryHealth) -> _RecordWriter:
    with _writers_lock:
        entry = _writers.get(path)
        if entry is None:
            entry = _writers[path] = [_RecordWriter(path, max_bytes, backups, health), 0]
        entry[1] += 1
        return entry[0]


def _release_writer(writer: _RecordWriter, timeout: float) -> bool:
    with _writers_lock:
        entry = _writers.get(writer.path)
        if entry is None or entry[0] is not writer:
            return True
        entry[1] -= 1
        if entry[1] > 0:
            return True
        del _writers[writer.path]
    return writer.close(timeout)


# ---------------------------------------------------------------------- the API
class Scores:
    """One scoring job's scores: terminal lines, series and a per-rank file (see module docstring).

    ``name`` is the ``metric`` label of its series and the ``avg_<name>`` of its batch lines;
    ``total`` (samples expected), ``desc``, ``unit`` and ``leave`` go to its bar (``bar=False``:
    none), ``desc`` also to the summary line when it differs from ``name``;
    ``show`` overrides ``score_print``; ``width`` cuts texts on the terminal; ``digits`` is the
    precision of printed numbers; ``file=False`` writes no file. ``telemetry`` and ``stream``
    (default: the running instance, ``sys.stdout``) are injectable. One thread adds to a scorer;
    scorers of one process may run side by side (they share the rank's file).

    Example::

        scorer = otel_ml.Scores("reward", total=64)
        scorer.add([0.4, 0.9], ids=["a", "b"], texts=["first answer", "second answer"])
        scorer.close().mean   # 0.65
    """

    def __init__(
        self,
        name: str = "score",
        *,
        total: int | None = None,
        desc: str | None = None,
        unit: str = "sample",
        leave: bool = True,
        show: str | None = None,
        width: int = 60,
        digits: int = 3,
        label: str = "Response",
        file: bool = True,
        bar: bool = True,
        telemetry: Telemetry | None = None,
        stream: TextIO | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError("otel_ml.scores: name must be a non-empty string")
        telemetry = telemetry if telemetry is not None else get_telemetry()
        if telemetry is not None and (telemetry.closed or telemetry.training is None):
            telemetry = None
        config = telemetry.config if telemetry is not None else Config.resolve()
        show = config.score_print if show is None else show
        if show not in SHOW_MODES:
            raise ValueError(f"otel_ml.scores: show must be one of {', '.join(SHOW_MODES)}, not {show!r}")
        if not (isinstance(width, int) and width >= 4 and isinstance(digits, int) and 0 <= digits <= 12):
            raise ValueError(
                f"otel_ml.scores: width must be >= 4 and digits 0..12, not {width!r}, {digits!r}"
            )
        self.name, self.show = name, show
        self._width, self._digits, self._label = width, digits, label
        self._stream = stream if stream is not None else sys.stdout
        # The running instance's console also draws rank 0's view and the timing table in place
        # on stdout: writing through it keeps those blocks intact.
        self._console = telemetry.console if telemetry is not None and stream is None else None
        self._telemetry = telemetry
        self._shutdown_timeout = config.shutdown_timeout
        self._batches = 0
        self._closed = False
        self.summary = ScoreSummary(name)
        self._writer: _RecordWriter | None = None
        if telemetry is None:
            warn_once(
                "scores-local",
                "otel_ml.scores(%r): init() was not called (or telemetry is off): "
                "printing only; no series, no scores file",
                name,
            )
        elif file:
            path = rank_dir(telemetry.run_dir, telemetry.rank) / SCORES_FILE
            self._writer = _open_writer(path, config.file_max_bytes, config.file_backups, telemetry.health)
        self.path = self._writer.path if self._writer is not None else None
        self._title = desc if desc and desc != name else None
        self._bar = tqdm(total=total, desc=desc or name, unit=unit, leave=leave) if bar else None
        atexit.register(self.close)

    def __enter__(self) -> Scores:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def add(
        self, scores: Any, ids: Sequence[Any] | None = None, texts: Sequence[Any] | None = None
    ) -> Summary:
        """Score one batch: print, export, queue for the file; returns the batch's summary.

        ``scores``: a number, list, numpy array or tensor; ``ids`` and ``texts``, when given, one
        per score. Raises ``ValueError`` on bad input; never on a telemetry failure.
        """
        if self._closed:
            raise ValueError(f"otel_ml.scores({self.name!r}) is closed")
        values = _host_scores(scores)
        ids, texts = _column(ids, len(values), "ids"), _column(texts, len(values), "texts")
        if not values:
            return summarize(values)
        batch = summarize(values)
        first = self.summary.samples
        self._batches += 1
        self.summary = self.summary.merged(batch, len(values))
        lines = []
        if self.show == "sample":
            lines = [
                sample_line(
                    first + i,
                    v,
                    ids[i] if ids is not None else None,
                    texts[i] if texts is not None else None,
                    width=self._width,
                    digits=self._digits,
                    label=self._label,
                )
                for i, v in enumerate(values)
            ]
        if self.show != "off":
            lines.append(batch_line(self._batches, first, batch, len(values), self.name, self._digits))
            self._print(lines)
        self._export(values)
        if self._writer is not None:
            self._writer.put(
                [
                    {
                        "name": self.name,
                        "batch": self._batches,
                        "index": first + i,
                        "id": None if ids is None else _json_id(ids[i]),
                        "score": json_score(v),
                        "text": None if texts is None else str(texts[i])[:MAX_FILE_TEXT],
                    }
                    for i, v in enumerate(values)
                ]
            )
        if self._bar is not None:
            self._bar.update(len(values))
        return batch

    def _print(self, lines: list[str]) -> None:
        if self._console is not None:
            self._console.write("\n".join(lines))
            return
        try:
            tqdm.write("\n".join(lines), file=self._stream)
            self._stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: the lines are also in the file
            pass

    def _export(self, values: list[float]) -> None:
        telemetry = self._telemetry
        training = telemetry.training if telemetry is not None else None
        if training is None:
            return
        try:
            training.ingest_distribution(self._batches, self.name, values)
        except Exception as exc:  # noqa: BLE001 - telemetry never breaks the job
            warn_once(f"scores-export:{self.name}", "otel_ml.scores(%r): export failed: %s", self.name, exc)
            telemetry.health.dropped("values")

    def close(self, timeout: float | None = None) -> ScoreSummary:
        """Print the summary, close the bar, write what is queued (bounded); returns the summary.

        Safe to call twice; also runs at exit for a job that never closed.
        """
        if self._closed:
            return self.summary
        self._closed = True
        atexit.unregister(self.close)
        if self.show != "off":
            self._print([summary_line(self.summary, self._digits, self._title)])
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            limit = self._shutdown_timeout if timeout is None else timeout
            started = time.monotonic()
            if not _release_writer(self._writer, limit):
                logger.warning(
                    "otel_ml.scores(%r): %s not fully written within %.1f s",
                    self.name,
                    self.path,
                    time.monotonic() - started,
                )
        return self.summary


def scores(name: str = "score", **options: Any) -> Scores:
    """Start scoring: ``Scores(name, **options)`` (see :class:`Scores` for the options).

    Example::

        with otel_ml.scores("score", total=len(dataset), show="sample") as scorer:
            for batch in loader:
                scorer.add(judge(batch), ids=batch["id"], texts=batch["response"])
    """
    return Scores(name, **options)
