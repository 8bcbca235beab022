"""Accelerate: ``Accelerator(log_with=[OtelMLTracker()])``, or ``log_with="otel_ml"`` after ``register()``.

:class:`OtelMLTracker` is a ``GeneralTracker`` named ``otel_ml`` with ``main_process_only = False``.
``accelerator.log(values, step=step)`` becomes ``otel_ml.log(step, ...)``: nested keys flattened
with ``/``, common spellings of the built-ins renamed (``train_loss`` -> ``loss``, ``train/lr`` ->
``lr``; see :data:`otel_ml.integrations._keys.ALIASES`), other numbers exported under their own
names, strings and tables left out. With ``stop_on`` it raises ``otel_ml.AnomalyError`` from
``accelerator.log`` as ``otel_ml.log`` would (the loop is yours). Progress ``train`` follows the
logged step, with a total from ``total_steps=`` or from the ``init_trackers`` config
(``max_steps``, ``max_train_steps``, ``num_training_steps``, ``total_steps``).

``Accelerator.init_trackers`` and ``Accelerator.log`` run on the main process only in Accelerate
(whatever a tracker's ``main_process_only`` says), so creating a tracker wraps those two methods
and ``end_training`` once: on the other processes they also reach the trackers of ``log_with``
that are not main-process-only. Every rank then exports its own values. :func:`register` makes
``log_with="otel_ml"`` work where Accelerate has ``accelerate.tracking.register_tracker_class``
(1.15 and 1.16 do; elsewhere it returns False, and ``log_with=[OtelMLTracker()]`` still works).

Example::

    accelerator = Accelerator(log_with=[OtelMLTracker(total_steps=1000)])
    accelerator.init_trackers("my-run", config=vars(args))
    accelerator.log({"train_loss": loss, "lr": lr}, step=step)   # on every rank
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import otel_ml
from otel_ml.integrations._common import TrackerProgress, ensure_started, missing
from otel_ml.integrations._keys import log_values as mapped
from otel_ml.runtime import Telemetry

try:
    import accelerate
    from accelerate.tracking import GeneralTracker
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise missing("accelerate", "accelerate") from exc

#: Config keys read, in order, for the progress total.
TOTAL_KEYS = ("max_steps", "max_train_steps", "num_training_steps", "total_steps")


def total_from_config(config: Mapping[str, Any] | None) -> int | None:
    """The number of steps an ``init_trackers`` config announces, if any (pure)."""
    for key in TOTAL_KEYS:
        value = (config or {}).get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


class OtelMLTracker(GeneralTracker):
    """An Accelerate tracker that exports every rank's logged values through otel_ml.

    ``run_name`` is what Accelerate passes to trackers it creates by name; ``init_options`` go to
    ``otel_ml.init()`` when otel_ml is not running yet.

    Example::

        Accelerator(log_with=[OtelMLTracker(stop_on=["nonfinite"])])
    """

    name = "otel_ml"
    requires_logging_directory = False
    main_process_only = False

    def __init__(self, run_name: str | None = None, *, total_steps: int | None = None, **init_options: Any):
        super().__init__()
        self.run_name = run_name
        self._options = init_options
        self._progress = TrackerProgress(total_steps)
        self._started = False
        _deliver_to_every_rank()

    @property
    def tracker(self) -> Telemetry | None:
        return otel_ml.get_telemetry()

    def start(self) -> None:
        if not self._started:
            self._started = True
            ensure_started(self._options)

    def store_init_configuration(self, values: Mapping[str, Any]) -> None:
        self.start()
        self._progress.total = self._progress.total or total_from_config(values)

    def log(self, values: Mapping[str, Any], step: int | None = None, **kwargs: Any) -> None:
        self.start()
        otel_ml.log(step, **mapped(values))  # with stop_on, raises AnomalyError as log() does
        if step is not None:
            self._progress.advance(step)

    def finish(self) -> None:
        self._progress.finish()


def register() -> bool:
    """Make ``Accelerator(log_with="otel_ml")`` work; False where Accelerate cannot register trackers.

    Example::

        register(); accelerator = Accelerator(log_with="otel_ml")
    """
    tracking = accelerate.tracking
    register_class = getattr(tracking, "register_tracker_class", None)
    if register_class is None:
        return False
    if tracking.LOGGER_TYPE_TO_CLASS.get(OtelMLTracker.name) is not OtelMLTracker:
        register_class(OtelMLTracker)
    _deliver_to_every_rank()
    return True


def _every_rank_trackers(accelerator: Any) -> list[Any]:
    """The trackers of ``log_with`` that are not main-process-only, made once per accelerator."""
    made = getattr(accelerator, "_otel_ml_trackers", None)
    if made is not None:
        return made
    made = []
    classes = getattr(accelerate.tracking, "LOGGER_TYPE_TO_CLASS", {})
    for entry in getattr(accelerator, "log_with", None) or ():
        if isinstance(entry, GeneralTracker):
            tracker = entry
        else:
            cls = classes.get(str(entry))
            tracker = cls() if cls is OtelMLTracker else None
        if tracker is not None and not getattr(tracker, "main_process_only", True):
            made.append(tracker)
    accelerator._otel_ml_trackers = made
    return made


def _deliver_to_every_rank() -> None:
    """Wrap ``init_trackers``, ``log`` and ``end_training`` (once) so that on processes other than
    the main one they still reach the trackers that are not main-process-only."""
    cls = accelerate.Accelerator
    if getattr(cls, "_otel_ml_every_rank", False):
        return
    cls._otel_ml_every_rank = True
    init_trackers, log, end_training = cls.init_trackers, cls.log, cls.end_training

    @functools.wraps(init_trackers)
    def init_trackers_every_rank(self: Any, project_name: str, config: Any = None, init_kwargs: Any = None):
        result = init_trackers(self, project_name, config=config, init_kwargs=init_kwargs)
        if not self.is_main_process:
            for tracker in _every_rank_trackers(self):
                tracker.start()
                if config is not None:
                    tracker.store_init_configuration(config)
        return result

    @functools.wraps(log)
    def log_every_rank(self: Any, values: dict, step: int | None = None, log_kwargs: Any = None):
        result = log(self, values, step=step, log_kwargs=log_kwargs)
        if not self.is_main_process:
            for tracker in _every_rank_trackers(self):
                tracker.log(values, step=step, **(log_kwargs or {}).get(tracker.name, {}))
        return result

    @functools.wraps(end_training)
    def end_training_every_rank(self: Any) -> None:
        if not self.is_main_process:
            for tracker in _every_rank_trackers(self):
                tracker.finish()
        end_training(self)

    cls.init_trackers = init_trackers_every_rank
    cls.log = log_every_rank
    cls.end_training = end_training_every_rank
