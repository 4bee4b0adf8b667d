"""Kernel CLOCK_MONOTONIC timestamps -> wall-clock (Unix epoch) nanoseconds.

bpf_ktime_get_ns() is CLOCK_MONOTONIC. The offset to CLOCK_REALTIME is measured by
bracketing a monotonic read between two realtime reads and keeping the tightest of several
tries; it is measured again periodically because NTP slews the realtime clock against the
monotonic one.
"""

from __future__ import annotations

import time

REMEASURE_NS = 60_000_000_000


def measure_offset(tries: int = 7) -> tuple[int, int]:
    """(realtime - monotonic) in ns, and the uncertainty of that figure."""
    best: tuple[int, int] | None = None
    for _ in range(tries):
        before = time.time_ns()
        mono = time.monotonic_ns()
        after = time.time_ns()
        width = after - before
        if best is None or width < best[1]:
            best = ((before + after) // 2 - mono, width)
    assert best is not None
    return best


class MonotonicClock:
    def __init__(self) -> None:
        self.offset_ns, self.uncertainty_ns = measure_offset()
        self._measured_at = time.monotonic_ns()

    def to_unix_ns(self, monotonic_ns: int) -> int:
        now = time.monotonic_ns()
        if now - self._measured_at > REMEASURE_NS:
            self.offset_ns, self.uncertainty_ns = measure_offset()
            self._measured_at = now
        return monotonic_ns + self.offset_ns
