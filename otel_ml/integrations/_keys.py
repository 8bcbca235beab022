"""Pure key handling shared by the integrations: flattening nested dicts, picking scalars, aliases.

No framework and no telemetry here, so that the mappings are unit-tested on plain dicts.

Example::

    flatten({"actor": {"pg_loss": 0.1}})            # {'actor/pg_loss': 0.1}
    log_values({"train_loss": 0.5, "note": "x"})    # {'loss': 0.5}
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

#: Spellings of otel_ml's built-in keys that trackers and TensorBoard tags commonly use.
ALIASES: dict[str, str] = {
    **dict.fromkeys(("loss", "train_loss", "train/loss", "loss/train", "training_loss"), "loss"),
    **dict.fromkeys(
        ("lr", "learning_rate", "train/lr", "train/learning_rate", "lr/train", "train_lr", "lr-AdamW"), "lr"
    ),
    **dict.fromkeys(("grad_norm", "train/grad_norm", "grad_norm/train", "train_grad_norm"), "grad_norm"),
}


_LOWER = {k.lower(): v for k, v in ALIASES.items()}


def builtin_key(key: str, aliases: Mapping[str, str] = ALIASES) -> str | None:
    """The built-in ``log()`` key that ``key`` spells (case-insensitive), or None."""
    found = aliases.get(key)
    if found is None:
        lowered = _LOWER if aliases is ALIASES else {k.lower(): v for k, v in aliases.items()}
        found = lowered.get(key.lower())
    return found


def flatten(data: Mapping[str, Any], sep: str = "/", prefix: str = "") -> dict[str, Any]:
    """Nested mappings flattened to ``sep``-joined keys (``{"a": {"b": 1}}`` -> ``{"a/b": 1}``)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, sep, name))
        else:
            out[name] = value
    return out


def is_scalar(value: Any) -> bool:
    """True for what ``log()`` accepts: numbers, NumPy scalars and 1-element tensors/arrays."""
    if isinstance(value, bool | int | float):
        return True
    size = getattr(value, "numel", None) or getattr(value, "size", None)
    try:
        count = size() if callable(size) else size
    except Exception:  # noqa: BLE001 - an exotic object is simply not a scalar
        return False
    return count == 1 and hasattr(value, "item")


def to_float(value: Any) -> float | None:
    """``value`` as a float (a tensor is read: use where the framework has read it already), or None."""
    try:
        number = value.item() if hasattr(value, "item") else value
        return float(number)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        return None


def log_values(
    data: Mapping[str, Any],
    aliases: Mapping[str, str] = ALIASES,
    skip: Iterable[str] = (),
) -> dict[str, Any]:
    """The ``log()`` keyword arguments for a tracker's ``data``: nested keys flattened, non-scalars
    (strings, lists, tables) left out, aliases renamed to built-in keys. A built-in key given
    under its own name wins over an alias of it."""
    skipped = set(skip)
    out: dict[str, Any] = {}
    for key, value in flatten(data).items():
        if key in skipped or not is_scalar(value):
            continue
        target = builtin_key(key, aliases) or key
        if target != key and target in out:
            continue
        out[target] = value
    return out
