"""Hugging Face ``Trainer`` (and TRL trainers): ``Trainer(..., callbacks=[OtelMLCallback()])``.

Per rank, with no change to the training loop:

* ``otel_ml.init()`` on train begin when the script has not called it;
* regions ``step`` (``on_step_begin`` to ``on_step_end``) with ``step/forward_backward`` (all
  micro-batches, up to ``on_pre_optimizer_step``: gradient clipping included) and
  ``step/optimizer`` (``optimizer.step()``); ``data`` (the wait for the next batches, from the
  previous hook to ``on_step_begin``), ``evaluate`` (the ``<prefix>_runtime`` the Trainer
  measured) and ``save`` (from the previous hook to ``on_save``), recorded with their durations;
* the **raw per-step loss of this rank**: a forward hook on the model keeps the ``loss`` of each
  training micro-batch's output (a tensor, never read on the training thread: ``log()`` reads
  CUDA values later), and ``on_step_end`` logs their mean as ``loss``. It is the loss before the
  Trainer's ``logging_nan_inf_filter`` and before its cross-rank averaging, so a NaN on one rank
  reaches that rank's ``otel_ml_nonfinite_total{metric="loss"}`` at that step. Not visible that
  way: a loss computed outside the model (a custom ``compute_loss``, ``compute_loss_func``, a
  label smoother, most TRL losses), where ``on_log``'s ``loss`` is used instead (averaged over
  ranks and logging steps, NaN filtered);
* ``on_log`` values: ``learning_rate``, ``grad_norm`` (global: the gradients are all-reduced),
  eval metrics and anything else numeric, under their own names (``eval_loss`` ->
  ``otel_ml_eval_loss``);
* progress ``train`` (``state.global_step`` of ``state.max_steps``) and per-rank ``samples`` and
  ``tokens`` (non-padding tokens from ``attention_mask``, else ``input_ids`` elements) counted from
  the model's inputs, hence ``otel_ml_samples_per_second`` / ``otel_ml_tokens_per_second``;
* with ``stop_on``, an anomaly sets ``control.should_training_stop`` instead of raising. In a
  multi-rank job every rank stops at the same step: every ``stop_every`` steps (default 10) the
  callback calls :func:`otel_ml.agree_stop`, one tiny all-reduce, and all ranks set the flag
  together (``otel_ml.stop_reason()`` says which rank and anomaly); ``stop_every=0`` turns the
  agreement off (then only the rank that saw the anomaly stops, and the others wait in their next
  collective).

Example::

    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[OtelMLCallback()])
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
from otel_ml.regions import record

try:
    import torch
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise missing("transformers", "transformers") from exc

#: ``on_log`` keys not re-logged: the loss comes from the model (when it has one), the step is ours.
_OWN_KEYS = frozenset({"step"})


class _LossTap:
    """A forward hook keeping each training micro-batch's loss tensor and its sample/token counts.

    Example::

        tap = _LossTap(); handle = model.register_forward_hook(tap, with_kwargs=True)
    """

    def __init__(self) -> None:
        self.losses: list[Any] = []
        self.samples = 0
        self.tokens: Any = 0
        self.seen = False

    def __call__(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        if not module.training:
            return
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self.losses.append(loss.detach().reshape(()))
            self.seen = True
        inputs = kwargs.get("input_ids")
        if inputs is None and args:
            inputs = args[0]
        mask = kwargs.get("attention_mask")
        if isinstance(inputs, torch.Tensor) and inputs.dim() > 0:
            self.samples += int(inputs.shape[0])
            if isinstance(mask, torch.Tensor) and mask.shape == inputs.shape:
                self.tokens = self.tokens + mask.detach().sum()
            else:
                self.tokens += inputs.numel()

    def take(self) -> dict[str, Any]:
        """The step's values for ``log()`` (mean loss of its micro-batches), and a reset."""
        values: dict[str, Any] = {}
        losses = self.losses
        if losses:
            values["loss"] = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
        if self.samples:
            values["samples"] = self.samples
            values["tokens"] = self.tokens
        self.losses, self.samples, self.tokens = [], 0, 0
        return values


class OtelMLCallback(TrainerCallback):
    """Per-rank regions, raw loss, metrics and progress from a ``Trainer`` (see module docstring).

    ``init_options`` go to ``otel_ml.init()`` when the callback starts otel_ml itself.

    Example::

        Trainer(model=model, args=args, train_dataset=ds, callbacks=[OtelMLCallback(stop_on=["nonfinite"])])
    """

    def __init__(self, *, stop_every: int = 10, **init_options: Any) -> None:
        self._options = init_options
        self._stop_every = stop_every
        self._tap = _LossTap()
        self._hook: Any = None
        self._progress: StepProgress | None = None
        self._mark = Mark()
        self._open: list[Any] = []

    # ------------------------------------------------------------------ helpers
    def _enter(self, name: str) -> None:
        region = otel_ml.span(name)
        region.__enter__()
        self._open.append(region)

    def _exit(self, name: str) -> None:
        """Close the innermost open region called ``name`` and the ones opened inside it."""
        names = [getattr(r, "name", "") for r in self._open]
        if name not in names:
            return
        while self._open:
            region = self._open.pop()
            region.__exit__(None, None, None)
            if region.name == name:
                return

    def _log(self, step: int, values: Mapping[str, Any], control: TrainerControl) -> None:
        if values and log_values(step, values) is not None:
            control.should_training_stop = True

    # ------------------------------------------------------------------ training
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        ensure_started(self._options)
        model = kwargs.get("model")
        if self._hook is None and isinstance(model, torch.nn.Module):
            self._hook = model.register_forward_hook(self._tap, with_kwargs=True)
        if self._progress is None:
            self._progress = StepProgress(state.max_steps, initial=state.global_step)
        self._mark.set()

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._mark.set()

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        waited = self._mark.take()
        if waited is not None:
            record("data", waited)
        self._enter("step")
        self._enter("forward_backward")

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._exit("forward_backward")
        self._enter("optimizer")

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._exit("optimizer")

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._exit("step")
        self._log(state.global_step, self._tap.take(), control)
        if stop_together(self._stop_every):
            control.should_training_stop = True
        if self._progress is not None:
            self._progress.update(state.global_step, state.max_steps)
        self._mark.set()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._exit("step")
        if self._progress is not None:
            self._progress.update(state.global_step)
            self._progress.close()
            self._progress = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        otel_ml.flush()

    # ------------------------------------------------------------------ logs, evaluation, saves
    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        values = {
            k: v
            for k, v in (logs or {}).items()
            if k not in _OWN_KEYS and isinstance(v, int | float) and not isinstance(v, bool)
        }
        if self._tap.seen:
            values.pop("loss", None)  # the raw per-step loss is logged already
        self._log(state.global_step, values, control)
        self._mark.set()

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        runtime = next((v for k, v in (metrics or {}).items() if k.endswith("_runtime")), None)
        since = self._mark.take()
        seconds = runtime if isinstance(runtime, int | float) else since
        if seconds is not None:
            record("evaluate", float(seconds))

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        since = self._mark.take()
        if since is not None:
            record("save", since)
