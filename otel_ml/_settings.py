"""Shared machinery of otel_ml's settings dataclasses: kwargs, then environment, then default.

Each field carries, in its metadata, the variables it reads, a parser (raising ``ValueError``
on bad text), its documentation and how to show its default. A bad environment value logs one
warning naming the variable (never the value, which may be a secret) and the default is used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from otel_ml._logging import warn_once


def option(env: tuple[str, ...], parse: Callable[[str], Any], doc: str, default_doc: str = "") -> dict:
    """Field metadata: environment variables, parser, documentation, default as documented."""
    return {"env": env, "parse": parse, "doc": doc, "default_doc": default_doc}


def default_text(f: dataclasses.Field) -> str:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(f.default_factory())  # type: ignore[misc]
    return repr(f.default)


def resolve_values(cls: type, env: Mapping[str, str], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Values for ``cls(**values)``: a non-None kwarg wins, then the first parseable variable."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if "env" not in f.metadata:
            continue
        if kwargs.get(f.name) is not None:
            values[f.name] = kwargs[f.name]
            continue
        for var in f.metadata["env"]:
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            try:
                values[f.name] = f.metadata["parse"](raw)
            except ValueError as exc:
                warn_once(
                    f"env:{var}",
                    "otel_ml: ignoring %s (%s); using the default %s",
                    var,
                    exc,
                    f.metadata["default_doc"] or default_text(f),
                )
                continue
            break
    return values


def table_rows(cls: type) -> list[str]:
    """Markdown rows ``| option | environment | default | meaning |`` for each documented field."""
    rows = []
    for f in dataclasses.fields(cls):
        if "env" not in f.metadata:
            continue
        env = ", ".join(f"`{v}`" for v in f.metadata["env"]) or "-"
        default = f.metadata["default_doc"] or f"`{default_text(f)}`"
        rows.append(f"| `{f.name}` | {env} | {default} | {f.metadata['doc']} |")
    return rows
