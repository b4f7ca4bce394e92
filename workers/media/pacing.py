"""Drift-free 20 ms tick on the monotonic clock.

Deadlines are ``start + n x period`` in integer nanoseconds — never "now + period" — so wakeup lateness
never accumulates: after an hour the worker has run exactly 180 000 ticks and each session's RTP
timestamp (derived from the tick index, +960 per tick at 48 kHz) matches the clock to the sample.
If the process falls far behind (stopped, overloaded) it skips whole ticks rather than bursting
(a burst of old audio is worse than a gap the receiver conceals); skipped ticks are counted.
The clock is injectable so tests run an hour of ticks in milliseconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from shm.audio import TICK_NS

PERIOD_NS = TICK_NS


class Pacer:
    """Yields tick indices at ``start + n x period``."""

    def __init__(self, period_ns: int = PERIOD_NS, clock: Callable[[], int] = time.monotonic_ns,
                 max_burst: int = 3) -> None:
        self.period = period_ns
        self.clock = clock
        self.max_burst = max_burst
        self.start = clock()
        self.tick = 0  # index of the next tick to run
        self.skipped = 0
        self.late_ns_max = 0

    def deadline(self, tick: int | None = None) -> int:
        """Absolute monotonic ns at which tick ``tick`` (default: the next) is due."""
        return self.start + (self.tick if tick is None else tick) * self.period

    def timeout(self, now: int | None = None) -> float:
        """Seconds until the next tick is due (0 if already due): the poll timeout."""
        now = self.clock() if now is None else now
        return max(0.0, (self.deadline() - now) / 1e9)

    def due(self, now: int | None = None) -> list[int]:
        """Tick indices due at ``now``, in order (usually 0 or 1). Consumes them."""
        now = self.clock() if now is None else now
        if now < self.deadline():
            return []
        behind = (now - self.start) // self.period - self.tick + 1
        if behind > self.max_burst:
            skip = behind - 1
            self.skipped += skip
            self.tick += skip
            behind = 1
        self.late_ns_max = max(self.late_ns_max, now - self.deadline())
        ticks = list(range(self.tick, self.tick + behind))
        self.tick += behind
        return ticks
