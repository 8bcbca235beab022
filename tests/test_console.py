"""The live display: plain lines off a terminal, in-place redraw on one, and peace with tqdm."""

from __future__ import annotations

import io

from tqdm import tqdm

from otel_ml.console import Console


def test_not_a_terminal_gets_one_plain_line_per_refresh():
    out = io.StringIO()
    console = Console(out, tty=False)
    console.show(["a", "b"], "a | b")
    console.show(["c", "d"], "c | d")
    assert out.getvalue() == "a | b\nc | d\n"


def test_terminal_block_is_redrawn_in_place():
    out = io.StringIO()
    console = Console(out, tty=True)
    console.show(["one", "two"], "")
    console.show(["three", "four"], "")
    text = out.getvalue()
    assert text.startswith("\x1b[2Kone\n\x1b[2Ktwo\n")
    assert text.endswith("\x1b[2F\x1b[2Kthree\n\x1b[2Kfour\n")  # cursor back up 2 lines


def test_with_a_tqdm_bar_the_bar_is_cleared_and_redrawn_around_the_table():
    out = io.StringIO()
    bar = tqdm(total=10, file=out, ascii=True, mininterval=0)
    try:
        bar.update(3)
        before = len(out.getvalue())
        Console(out, tty=True).show(["table"], "")
        after = out.getvalue()[before:]
    finally:
        bar.close()
    assert "\x1b[2Ktable\n" in after
    assert after.index("table") < after.rindex("3/10")  # the bar comes back below the table


def test_terminal_lines_are_clipped_to_the_width_so_the_redraw_does_not_drift():
    out = io.StringIO()
    console = Console(out, tty=True, width=10)
    console.show(["0123456789abcdef", "short"], "0123456789abcdef short")
    assert out.getvalue() == "\x1b[2K012345678…\n\x1b[2Kshort\n"


def test_lines_off_a_terminal_are_never_clipped():
    out = io.StringIO()
    Console(out, tty=False, width=10).show(["x"], "0123456789abcdef")
    assert out.getvalue() == "0123456789abcdef\n"


def test_a_stream_without_a_terminal_size_is_not_clipped():
    out = io.StringIO()  # no fileno(): the width is unknown
    Console(out, tty=True).show(["0123456789" * 30], "")
    assert out.getvalue() == "\x1b[2K" + "0123456789" * 30 + "\n"
