"""The one fake clock of the test suite: time moves only when the test moves it."""

from __future__ import annotations


class FakeClock:
    """A callable clock standing in for ``time.monotonic``/``time.time``/``perf_counter_ns``.

    ``now`` is the current reading (set it, or :meth:`advance` it by ``n`` ticks of ``tick``).
    An integer start keeps integer readings, as ``perf_counter_ns`` does.

    Example::

        clock = FakeClock(0, tick=1_000_000)   # nanoseconds, advanced in milliseconds
        clock.advance(5)                       # clock() == 5_000_000
    """

    def __init__(self, now: float = 0.0, *, tick: float = 1.0) -> None:
        self.now = now
        self.tick = tick

    def __call__(self) -> float:
        return self.now

    def advance(self, n: float = 1.0) -> None:
        step = n * self.tick
        self.now += int(step) if isinstance(self.now, int) else step
