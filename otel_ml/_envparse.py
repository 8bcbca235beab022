"""Parsers for environment values: a bad value is one warning plus the default, never a crash.

Each parser takes the variable name and its raw text and returns the parsed value or raises
``ValueError`` with a message that never repeats the raw text of secrets (headers).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from urllib.parse import unquote

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(raw: str) -> bool:
    text = raw.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("expected true or false")


def parse_str(raw: str) -> str:
    text = raw.strip()
    if not text:
        raise ValueError("empty")
    return text


def int_parser(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError("expected an integer") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise ValueError(f"expected an integer {bound}")
        return value

    return parse


def seconds_parser(scale: float, minimum: float) -> Callable[[str], float]:
    """Parse a number of ``1/scale`` seconds (``scale=1000`` for OTel's millisecond variables)."""

    def parse(raw: str) -> float:
        try:
            value = float(raw.strip()) / scale
        except ValueError:
            raise ValueError("expected a number") from None
        if not value >= minimum or value == float("inf"):
            raise ValueError(f"expected a finite number >= {minimum * scale:g}")
        return value

    return parse


def choice_parser(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        text = raw.strip().lower()
        if text not in choices:
            raise ValueError("expected one of " + ", ".join(choices))
        return text

    return parse


def parse_headers(raw: str) -> dict[str, str]:
    """Parse ``k1=v1,k2=v2`` (values URL-encoded) as in the OTel spec.

    A malformed entry raises ValueError naming its position only: header values are often
    credentials and must never reach a log line.
    """
    headers: dict[str, str] = {}
    for index, item in enumerate(raw.split(","), start=1):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = unquote(key).strip().lower()
        if not sep or not key or any(c.isspace() for c in key):
            raise ValueError(f"entry {index} is not key=value")
        headers[key] = unquote(value).strip()
    return headers


def parse_attributes(raw: str) -> dict[str, str]:
    """Parse ``k1=v1,k2=v2`` resource attributes (same grammar as headers, keys keep case)."""
    attributes: dict[str, str] = {}
    for index, item in enumerate(raw.split(","), start=1):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"entry {index} is not key=value")
        attributes[unquote(key).strip()] = unquote(value).strip()
    return attributes


def parse_buckets(raw: str) -> dict[str, tuple[float, ...]]:
    """Parse ``key=b1,b2,...;key2=...`` into strictly increasing, finite bucket bounds per key.

    Example::

        parse_buckets("reward=0,0.5,1;score=1,5,10")  # {'reward': (0.0, 0.5, 1.0), 'score': (1.0, 5.0, 10.0)}
    """
    out: dict[str, tuple[float, ...]] = {}
    for index, item in enumerate(raw.split(";"), start=1):
        if not item.strip():
            continue
        key, sep, bounds = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"entry {index} is not key=b1,b2,...")
        out[key.strip()] = check_buckets(tuple(float(b) for b in bounds.split(",") if b.strip()))
    return out


def check_buckets(bounds: tuple[float, ...]) -> tuple[float, ...]:
    """``bounds`` if non-empty, finite and strictly increasing, else ``ValueError``."""
    if not bounds or any(b - b != 0.0 for b in bounds) or any(a >= b for a, b in itertools.pairwise(bounds)):
        raise ValueError(f"bucket bounds must be finite and strictly increasing, not {bounds}")
    return bounds
