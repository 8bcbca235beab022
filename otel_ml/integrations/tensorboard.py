"""TensorBoard: a ``SummaryWriter`` that also exports its scalars, and ``patch()`` for every writer.

``add_scalar(tag, value, global_step)`` and ``add_scalars(main_tag, {tag: value}, global_step)``
(exported as ``main_tag/tag``) still write the event files as before, and also set:

* ``otel_ml_scalar{tag="<tag>"}``: the last finite value of every tag (one gauge family with a
  ``tag`` label, so arbitrary tags make no new metric names; at most :data:`MAX_TAGS` tags, later
  ones dropped with one warning and counted in ``otel_ml_export_dropped_total{signal="values"}``);
  NaN/Inf count in ``otel_ml_scalar_nonfinite_total{tag}`` and leave the gauge as it was;
* for a tag that spells a built-in (``loss``, ``train/loss``, ``Loss/train``, ``lr``,
  ``train/learning_rate``, ``grad_norm``, ...; see :data:`otel_ml.integrations._keys.ALIASES`)
  written with a ``global_step``: also ``otel_ml.log(global_step, loss=value)``, so that step,
  step duration, ``otel_ml_loss``, ``otel_ml_nonfinite_total{metric="loss"}``, the anomaly
  detectors and ``stop_on`` (``AnomalyError`` from ``add_scalar``) work from TensorBoard code.

``patch()`` wraps ``add_scalar``/``add_scalars`` of ``torch.utils.tensorboard.SummaryWriter`` and
of ``tensorboardX.SummaryWriter`` when installed, at class level, so writers made before or after,
subclasses and library code (Megatron, BasicSR, verl's tensorboard backend) all export.
``python -m otel_ml.integrations.tensorboard script.py args...`` patches and runs an unmodified
script (under ``torchrun`` too: ``torchrun ... -m otel_ml.integrations.tensorboard script.py``).

Example::

    otel_ml.integrations.tensorboard.patch()        # then existing SummaryWriter code exports
"""

from __future__ import annotations

import functools
import math
import runpy
import sys
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation

import otel_ml
from otel_ml import names, semconv
from otel_ml._logging import warn_once
from otel_ml.integrations._common import ensure_started, missing
from otel_ml.integrations._keys import builtin_key, to_float
from otel_ml.runtime import Telemetry

try:
    from torch.utils.tensorboard import SummaryWriter as _TorchWriter
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise missing("tensorboard", "tensorboard") from exc

#: Distinct tags exported per process at most.
MAX_TAGS = 256


class Scalars:
    """Last finite value and non-finite count per tag, read by two observable instruments.

    Example::

        scalars = Scalars(max_tags=4); scalars.set("val/acc", 0.9)
    """

    def __init__(self, max_tags: int = MAX_TAGS) -> None:
        self.max_tags = max_tags
        self.latest: dict[str, float] = {}
        self.nonfinite: dict[str, int] = {}
        self.dropped = 0
        self._lock = threading.Lock()

    def set(self, tag: str, value: float) -> bool:
        """Store one value; False when the tag is over the cap (dropped)."""
        with self._lock:
            if tag not in self.nonfinite:
                if len(self.nonfinite) >= self.max_tags:
                    self.dropped += 1
                    return False
                self.nonfinite[tag] = 0
            if math.isfinite(value):
                self.latest[tag] = value
            else:
                self.nonfinite[tag] += 1
        return True

    def register(self, telemetry: Telemetry) -> None:
        """Create ``otel_ml_scalar`` and ``otel_ml_scalar_nonfinite_total`` on its meter."""
        attrs = dict(telemetry.attributes)

        def series(values: dict[str, Any]) -> Iterable[Observation]:
            with self._lock:
                items = list(values.items())
            return [Observation(v, {**attrs, semconv.LABEL_TAG: names.label_value(t)}) for t, v in items]

        def gauge(_: CallbackOptions) -> Iterable[Observation]:
            return series(self.latest)

        def counter(_: CallbackOptions) -> Iterable[Observation]:
            return series(self.nonfinite)

        meter = telemetry.meter
        spec = semconv.SCALAR
        meter.create_observable_gauge(spec.name, [gauge], spec.unit, spec.description)
        spec = semconv.SCALAR_NONFINITE
        meter.create_observable_counter(spec.name, [counter], spec.unit, spec.description)


_bound: tuple[Telemetry, Scalars] | None = None
_bind_lock = threading.Lock()


def _scalars() -> Scalars | None:
    """The store of the running telemetry (made and registered on first use), or None."""
    global _bound
    telemetry = otel_ml.get_telemetry()
    if telemetry is None or telemetry.closed or getattr(telemetry, "meter", None) is None:
        return None
    bound = _bound
    if bound is not None and bound[0] is telemetry:
        return bound[1]
    with _bind_lock:
        if _bound is None or _bound[0] is not telemetry:
            scalars = Scalars()
            scalars.register(telemetry)
            _bound = (telemetry, scalars)
        return _bound[1]


def export_scalar(tag: str, value: Any, step: Any = None) -> None:
    """Export one TensorBoard scalar (see module docstring); never raises but ``AnomalyError``."""
    scalars = _scalars()
    number = to_float(value)
    if scalars is None or number is None:
        return
    tag = str(tag)
    if not scalars.set(tag, number):
        warn_once(
            "tb-tags", "otel_ml: more than %d TensorBoard tags; %r and later ones not exported", MAX_TAGS, tag
        )
        telemetry = otel_ml.get_telemetry()
        if telemetry is not None:
            telemetry.health.dropped("values")
        return
    key = builtin_key(tag)
    if key is not None and step is not None:
        otel_ml.log(step, **{key: number})


def export_scalars(main_tag: str, values: Mapping[str, Any], step: Any = None) -> None:
    """Export ``add_scalars``: each ``tag`` of ``values`` as ``main_tag/tag``."""
    for tag, value in values.items():
        export_scalar(f"{main_tag}/{tag}", value, step)


def _wrap(cls: type) -> bool:
    """Make ``cls.add_scalar``/``add_scalars`` export too (once); False if it has none."""
    if getattr(cls, "_otel_ml_patched", False) or not hasattr(cls, "add_scalar"):
        return False
    add_scalar, add_scalars = cls.add_scalar, cls.add_scalars

    @functools.wraps(add_scalar)
    def exporting_add_scalar(
        self: Any, tag: str, scalar_value: Any, global_step: Any = None, *a: Any, **kw: Any
    ):
        result = add_scalar(self, tag, scalar_value, global_step, *a, **kw)
        export_scalar(tag, scalar_value, global_step)
        return result

    @functools.wraps(add_scalars)
    def exporting_add_scalars(
        self: Any, main_tag: str, tag_scalar_dict: Any, global_step: Any = None, *a: Any, **kw: Any
    ):
        result = add_scalars(self, main_tag, tag_scalar_dict, global_step, *a, **kw)
        export_scalars(main_tag, tag_scalar_dict, global_step)
        return result

    cls._otel_ml_originals = (add_scalar, add_scalars)
    cls.add_scalar = exporting_add_scalar
    cls.add_scalars = exporting_add_scalars
    cls._otel_ml_patched = True
    return True


def _writer_classes() -> list[type]:
    classes: list[type] = [_TorchWriter]
    try:
        from tensorboardX import SummaryWriter as XWriter
    except ImportError:
        pass
    else:
        classes.append(XWriter)
    return classes


def patch(**init_options: Any) -> list[type]:
    """Make every ``SummaryWriter`` (torch's, and tensorboardX's if installed) export its scalars.

    Starts otel_ml with ``init_options`` when it is not running. Returns the classes patched now.

    Example::

        otel_ml.integrations.tensorboard.patch(service_name="megatron")
    """
    ensure_started(init_options)
    return [cls for cls in _writer_classes() if _wrap(cls)]


def unpatch() -> None:
    """Undo :func:`patch` (the writers write event files only again)."""
    for cls in _writer_classes():
        originals = cls.__dict__.get("_otel_ml_originals")
        if originals is not None:
            cls.add_scalar, cls.add_scalars = originals
            del cls._otel_ml_originals
            cls._otel_ml_patched = False


class SummaryWriter(_TorchWriter):
    """``torch.utils.tensorboard.SummaryWriter`` that also exports ``add_scalar``/``add_scalars``.

    Example::

        writer = SummaryWriter("runs/exp1"); writer.add_scalar("train/loss", loss, step)
    """

    def __init__(self, *args: Any, otel_ml_options: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        ensure_started(otel_ml_options)
        super().__init__(*args, **kwargs)

    def add_scalar(
        self, tag: str, scalar_value: Any, global_step: Any = None, *args: Any, **kwargs: Any
    ) -> Any:
        result = super().add_scalar(tag, scalar_value, global_step, *args, **kwargs)
        if not getattr(_TorchWriter, "_otel_ml_patched", False):  # patched: the base exported it
            export_scalar(tag, scalar_value, global_step)
        return result

    def add_scalars(
        self, main_tag: str, tag_scalar_dict: Any, global_step: Any = None, *args: Any, **kwargs: Any
    ) -> Any:
        result = super().add_scalars(main_tag, tag_scalar_dict, global_step, *args, **kwargs)
        if not getattr(_TorchWriter, "_otel_ml_patched", False):
            export_scalars(main_tag, tag_scalar_dict, global_step)
        return result


def main(argv: list[str] | None = None) -> None:
    """``python -m otel_ml.integrations.tensorboard script.py args...``: patch, then run the script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        raise SystemExit("usage: python -m otel_ml.integrations.tensorboard SCRIPT [ARGS...]")
    patch()
    sys.argv = args
    runpy.run_path(args[0], run_name="__main__")


if __name__ == "__main__":
    from otel_ml.integrations import tensorboard  # one copy of the module state, not a __main__ twin

    tensorboard.main()
