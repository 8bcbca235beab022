"""Regenerate the generated tables in README.md (metrics and configuration).

Run ``make docs`` after changing :mod:`otel_ml.semconv` or :class:`otel_ml.Config`; the tests
fail while README.md and the code disagree.
"""

from __future__ import annotations

import re
from pathlib import Path

from otel_ml import config, semconv

README = Path(__file__).resolve().parents[1] / "README.md"
SECTIONS = {"metrics": semconv.markdown_table, "config": config.markdown_table}


def main() -> None:
    text = README.read_text(encoding="utf-8")
    for name, render in SECTIONS.items():
        pattern = re.compile(rf"(<!-- {name}-table:start -->\n).*?(\n<!-- {name}-table:end -->)", re.S)
        text, count = pattern.subn(lambda m, r=render: m.group(1) + r() + m.group(2), text)
        if count != 1:
            raise SystemExit(f"README.md: markers for {name} table not found")
    README.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
