"""Lightning: ``Trainer(callbacks=[OtelMLCallback()])`` or ``Trainer(logger=OtelMLLogger())``.

:class:`OtelMLCallback`, per rank:

* ``otel_ml.init()`` at fit start when the script has not called it;
* regions ``step`` (``on_train_batch_start`` to ``on_train_batch_end``) with ``step/optimizer``
  (from ``on_before_optimizer_step``, so the optimizer step and what follows it in the batch),
  ``validation`` (``on_validation_start`` to ``on_validation_end``) and ``data`` (the wait for the
  next batch, from the previous hook to ``on_train_batch_start``, recorded with its duration);
* ``loss``: this rank's loss of each batch (``training_step``'s ``loss``, a tensor read later by
  ``log()``, so a NaN reaches ``otel_ml_nonfinite_total{metric="loss"}`` on the rank it happens
  on), logged at ``trainer.global_step``, with ``samples`` (the batch's first dimension);
* every numeric value of ``trainer.callback_metrics`` (what ``self.log(...)`` produced:
  ``val_loss`` -> ``otel_ml_val_loss``) each ``log_every_n_steps`` and after validation;
* progress ``train``: ``trainer.global_step`` of ``trainer.estimated_stepping_batches``;
* with ``stop_on``, an anomaly sets ``trainer.should_stop`` instead of raising. In a multi-rank
  job every rank sets it at the same batch: every ``stop_every`` training batches (default 10)
  the callback calls :func:`otel_ml.agree_stop`, one tiny all-reduce (``otel_ml.stop_reason()``
  says which rank and anomaly); ``stop_every=0`` turns it off (then only the rank that saw the
  anomaly stops, and the others wait in their next collective).

:class:`OtelMLLogger` exports only what ``self.log(...)`` logs, on every rank (Lightning calls
``log_metrics`` on each rank, every ``log_every_n_steps``).

Uses ``lightning.pytorch``, else ``pytorch_lightning``.

Example::

    trainer = lightning.Trainer(max_steps=1000, callbacks=[OtelMLCallback()])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import otel_ml
from otel_ml.integrations._common import (
    Mark,
    StepProgress,
    ensure_started,
    log_values,
    missing,
    stop_together,
)
from otel_ml.integrations._keys import is_scalar
from otel_ml.regions import record

try:
    from lightning.pytorch import Callback
    from lightning.pytorch.loggers import Logger
except ImportError:  # pragma: no cover - the older package name
    try:
        from pytorch_lightning import Callback
        from pytorch_lightning.loggers import Logger
    except ImportError as exc:
        raise missing("lightning", "lightning") from exc


def _scalars(metrics: Mapping[str, Any], skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k not in skip and is_scalar(v)}


def _batch_size(batch: Any) -> int | None:
    """The first dimension of the batch's first tensor (a tensor, or the first of a tuple/dict)."""
    first = batch
    if isinstance(first, Mapping):
        first = next(iter(first.values()), None)
    elif isinstance(first, list | tuple):
        first = first[0] if first else None
    shape = getattr(first, "shape", None)
    return int(shape[0]) if shape else None


class OtelMLCallback(Callback):
    """Per-rank regions, loss, logged metrics and progress from a Lightning ``Trainer``.

    ``init_options`` go to ``otel_ml.init()`` when the callback starts otel_ml itself.

    Example::

        lightning.Trainer(max_epochs=3, callbacks=[OtelMLCallback(stop_on=["nonfinite"])])
    """

    def __init__(self, *, stop_every: int = 10, **init_options: Any) -> None:
        self._options = init_options
        self._stop_every = stop_every
        self._progress: StepProgress | None = None
        self._mark = Mark()
        self._open: list[Any] = []

    def _enter(self, name: str) -> None:
        region = otel_ml.span(name)
        region.__enter__()
        self._open.append(region)

    def _exit(self, name: str) -> None:
        """Close the innermost open region called ``name`` and the ones opened inside it."""
        if name not in [r.name for r in self._open]:
            return
        while self._open:
            region = self._open.pop()
            region.__exit__(None, None, None)
            if region.name == name:
                return

    def _log(self, trainer: Any, values: Mapping[str, Any]) -> None:
        if values and log_values(trainer.global_step, values) is not None:
            trainer.should_stop = True

    # ------------------------------------------------------------------ fit
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        ensure_started(self._options)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        total = trainer.estimated_stepping_batches
        total = total if isinstance(total, int | float) and total != float("inf") else None
        self._progress = StepProgress(total, initial=trainer.global_step)
        self._mark.set()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        waited = self._mark.take()
        if waited is not None:
            record("data", waited)
        self._enter("step")

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self._enter("optimizer")

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._exit("step")
        values: dict[str, Any] = {}
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if is_scalar(loss):
            values["loss"] = loss.detach() if hasattr(loss, "detach") else loss
        size = _batch_size(batch)
        if size:
            values["samples"] = size
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            values = {**_scalars(trainer.callback_metrics, frozenset({"loss"})), **values}
        self._log(trainer, values)
        if stop_together(self._stop_every):
            trainer.should_stop = True
        if self._progress is not None:
            self._progress.update(trainer.global_step)
        self._mark.set()

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self._enter("validation")

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        self._exit("validation")
        self._log(trainer, _scalars(trainer.callback_metrics, frozenset({"loss"})))
        self._mark.set()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._exit("step")
        if self._progress is not None:
            self._progress.update(trainer.global_step)
            self._progress.close()
            self._progress = None
        otel_ml.flush()


class OtelMLLogger(Logger):
    """A Lightning logger that exports ``self.log(...)`` values through otel_ml, on every rank.

    Example::

        lightning.Trainer(logger=OtelMLLogger(), log_every_n_steps=10)
    """

    def __init__(self, **init_options: Any) -> None:
        super().__init__()
        self._options = init_options

    @property
    def name(self) -> str:
        return "otel_ml"

    @property
    def version(self) -> str:
        telemetry = otel_ml.get_telemetry()
        return telemetry.run_id if telemetry is not None else ""

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        ensure_started(self._options)
        log_values(step, _scalars(metrics))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        ensure_started(self._options)

    def finalize(self, status: str) -> None:
        otel_ml.flush()
