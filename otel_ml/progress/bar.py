"""``otel_ml.tqdm``: a drop-in tqdm whose progress, rate and ETA every rank exports.

The subclass adds nothing to the iteration path: tqdm already keeps ``n``, its smoothed rate and
its start time on the instance at its own refresh cadence, and the collection reads them from
there (:meth:`otel_ml.progress.board.ProgressBoard.snapshot`). Bars register on creation and
leave on close. Closed bars stop exporting, except ``otel_ml_progress_active{task}``, which
drops to 0.

On ranks other than 0 bars print nothing by default (rank 0's multi-rank view and ``otel-ml top``
show them); ``disable=True`` still means no bar and no export.

Example::

    for batch in otel_ml.tqdm(loader, desc="train", unit="batch"):
        ...
"""

from __future__ import annotations

from typing import Any

from tqdm import tqdm as _tqdm

from otel_ml.progress.board import Tracked, board


class _NullWriter:
    """Where bars of ranks other than 0 print: nowhere."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        return None


class tqdm(_tqdm):  # noqa: N801 - the drop-in keeps tqdm's name
    """tqdm that also exports its progress (see module docstring). Any tqdm argument works.

    Example::

        for f in otel_ml.tqdm(files, desc="inference", unit="file"):
            for rows in otel_ml.tqdm(read(f), desc=f.name, unit="row", leave=False, total=n): ...
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._otel_ml: Tracked | None = None
        if "file" not in kwargs and not kwargs.get("disable") and board.rank() != 0:
            kwargs["file"] = _NullWriter()
        super().__init__(*args, **kwargs)
        if not self.disable:
            self._otel_ml = board.register(self)

    def close(self) -> None:
        try:
            super().close()
        finally:
            tracked, self._otel_ml = getattr(self, "_otel_ml", None), None
            if tracked is not None:
                board.close(tracked)


def trange(*args: Any, **kwargs: Any) -> tqdm:
    """``otel_ml.tqdm(range(*args), **kwargs)``, like ``tqdm.trange``."""
    return tqdm(range(*args), **kwargs)
