"""Progress: the drop-in ``tqdm`` every rank exports, and rank 0's view of every rank.

:mod:`.board` holds the open bars and their snapshot rows (the data model everything else reads),
:mod:`.bar` the tqdm subclass, :mod:`.metrics` the ``otel_ml_progress_*`` gauges,
:mod:`.payload` the ``/progress`` document a rank serves, :mod:`.render` the text a person sees,
and :mod:`.poller` rank 0's thread that polls the other ranks.

Example::

    for batch in otel_ml.progress.tqdm(loader, desc="train", unit="batch"):
        ...
"""

from otel_ml.progress.bar import tqdm, trange
from otel_ml.progress.board import BarSnapshot, ProgressBoard

__all__ = ["BarSnapshot", "ProgressBoard", "tqdm", "trange"]
