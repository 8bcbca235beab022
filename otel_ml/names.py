"""Pure helpers that turn user-supplied keys and ids into valid Prometheus/OTel names.

The OTel SDK raises a bare ``Exception`` on an invalid instrument name (it must match
``[A-Za-z][A-Za-z0-9_.\\-/]{0,254}``), and Prometheus 2.x accepts only ``[a-zA-Z_:][a-zA-Z0-9_:]*``.
The intersection is ``[A-Za-z][A-Za-z0-9_]*``, which is what :func:`metric_name` produces.

Example::

    >>> metric_name("kl")
    'otel_ml_kl'
    >>> metric_name("loss/val top-1")
    'otel_ml_loss_val_top_1'
"""

from __future__ import annotations

import re
import zlib

from otel_ml.semconv import PREFIX, RESERVED_NAMES

#: The OTel SDK caps instrument names at 255 characters; leave room for suffixes.
MAX_NAME_LENGTH = 200
MAX_LABEL_VALUE_LENGTH = 128

_INVALID = re.compile(r"[^A-Za-z0-9_]+")
_RUN_ID_INVALID = re.compile(r"[^A-Za-z0-9._-]+")


def _digest(text: str) -> str:
    return format(zlib.crc32(text.encode("utf-8", "surrogatepass")), "08x")


def metric_name(key: str) -> str:
    """Return the instrument name for a user key passed to ``log()``.

    Invalid characters (anything but ASCII letters, digits and ``_``) become ``_``; runs of
    ``_`` collapse; a key with nothing usable left (e.g. all Chinese) becomes
    ``otel_ml_key_<crc32>``, which stays stable across ranks and runs. Keys that would
    collide with otel_ml's own metric names get a ``user_`` infix.
    """
    body = _INVALID.sub("_", key).strip("_").lower()
    body = re.sub(r"_+", "_", body)
    if not body or not any(c.isalnum() for c in body):
        body = "key_" + _digest(key)
    elif body != key.lower() and not key.isascii():
        # Partly non-ASCII keys (e.g. "loss_验证") would otherwise share a name with other
        # keys that differ only in the non-ASCII part.
        body = f"{body}_{_digest(key)}"
    name = PREFIX + body
    if name in RESERVED_NAMES:
        name = PREFIX + "user_" + body
    if len(name) > MAX_NAME_LENGTH:
        name = name[: MAX_NAME_LENGTH - 9] + "_" + _digest(key)
    return name


def valid_text(text: str) -> str:
    """``text`` with lone surrogates replaced by ``?``, so that it can be encoded as UTF-8.

    Strings decoded with ``surrogateescape`` (file names that are not UTF-8, passed as a tqdm
    ``desc``, a span name or a ``log()`` key) would otherwise make every UTF-8 encoder downstream
    raise: the whole ``/metrics`` page, the OTLP request and the file line that carry them.
    """
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


def label_value(value: str) -> str:
    """Truncate a label value from user data to a bounded length (Unicode is kept)."""
    value = valid_text(value)
    if len(value) <= MAX_LABEL_VALUE_LENGTH:
        return value
    return value[: MAX_LABEL_VALUE_LENGTH - 9] + "~" + _digest(value)


def run_id(value: str) -> str:
    """Make a run id safe for a label value and a directory name (``[A-Za-z0-9._-]``, <= 64)."""
    cleaned = _RUN_ID_INVALID.sub("-", value).strip("-.")
    if not cleaned:
        cleaned = "run-" + _digest(value)
    if len(cleaned) > 64:
        cleaned = cleaned[:55] + "-" + _digest(value)
    return cleaned
