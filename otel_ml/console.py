"""Terminal output that shares the screen with tqdm: in place on a terminal, plain lines elsewhere.

On a terminal, :class:`Console` redraws its block of lines in place (cursor up, clear, redraw).
When tqdm bars are on screen it draws inside ``tqdm.external_write_mode``, which clears the bars
first and redraws them below, so the two never fight. When the stream is not a terminal (CI,
log files) it writes one compact line per refresh instead. Lines drawn in place are clipped to
the terminal's width (ending in ``…``): a wrapped line would make the redraw drift.

Example::

    console = Console()
    console.show(["top paths", "forward ███ 4.1 ms 45%"], "top paths: forward 45%")
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from typing import TextIO

_CLEAR_LINE = "\x1b[2K"


def _cursor_up(lines: int) -> str:
    return f"\x1b[{lines}F" if lines else ""


def clip(line: str, width: int) -> str:
    """``line`` cut to ``width`` characters, the last one ``…`` when something was cut."""
    if width <= 0 or len(line) <= width:
        return line
    return line[: width - 1] + "…"


class Console:
    """Draws a block of lines in place, or prints a line per refresh when not on a terminal.

    Example::

        Console(sys.stderr).show(["a", "b"], "a b")
    """

    def __init__(
        self, stream: TextIO | None = None, tty: bool | None = None, width: int | None = None
    ) -> None:
        self.stream = stream or sys.stdout
        self._width = width
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty and isatty())
        self.tty = tty
        self._drawn = 0
        self._sections: dict[str, list[str]] = {}
        self._lock = threading.RLock()  # a SIGTERM flush may print while a frame is drawn

    @contextlib.contextmanager
    def _around_bars(self) -> Iterator[None]:
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm is a dependency
            yield
            return
        if getattr(tqdm, "_instances", None):
            with tqdm.external_write_mode(file=self.stream):
                yield
        else:
            yield

    def show(self, lines: list[str], line: str, section: str = "main") -> None:
        """Redraw ``lines`` as ``section`` in place (terminal) or write ``line`` (anything else).

        Sections (the timing table, the rank view) are drawn one under the other, in the order
        they first appeared; updating one redraws the block.
        """
        with self._lock:
            self._sections[section] = lines
            try:
                if not self.tty:
                    self.stream.write(line + "\n")
                else:
                    width = self._columns()
                    block = [clip(ln, width) for part in self._sections.values() for ln in part]
                    with self._around_bars():
                        text = _cursor_up(self._drawn) + "".join(f"{_CLEAR_LINE}{ln}\n" for ln in block)
                        # a shorter block leaves old lines below: clear them
                        extra = self._drawn - len(block)
                        if extra > 0:
                            text += f"{_CLEAR_LINE}\n" * extra + _cursor_up(extra)
                        self.stream.write(text)
                        self._drawn = len(block)
                self.stream.flush()
            except (OSError, ValueError):  # closed or broken stream: the display is optional
                pass

    def _columns(self) -> int:
        """The terminal's width less one (0: unknown, nothing is clipped)."""
        if self._width is not None:
            return self._width
        try:
            return os.get_terminal_size(self.stream.fileno()).columns - 1
        except (AttributeError, OSError, ValueError):
            return 0

    def write(self, text: str) -> None:
        """Print text once, below whatever was drawn (bars are redrawn after it)."""
        with self._lock:
            try:
                with self._around_bars():
                    self.stream.write(text if text.endswith("\n") else text + "\n")
                    self._drawn = 0
                    self._sections.clear()
                self.stream.flush()
            except (OSError, ValueError):
                pass
