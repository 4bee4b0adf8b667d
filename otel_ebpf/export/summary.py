"""The periodic human-readable summary: top workloads x histogram series (a syscall, a
kind of wait: whatever the probes measure) by count, with p99 and max, over the last
window. Works without any collector, so `make run` shows something."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TextIO

from otel_ebpf.histogram import merge_into, quantile
from otel_ebpf.model import ExpHistogramDelta, Record, Workload
from otel_ebpf.periodic import Periodic


@dataclass(slots=True)
class _Window:
    workload: Workload
    label: str
    scale: int
    offset: int = 0
    counts: list[int] = field(default_factory=list)
    count: int = 0
    min: float = float("inf")
    max: float = 0.0


def format_seconds(value: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value / 1e-9:.3g}ns"


class HistogramSummary:
    def __init__(self, top: int) -> None:
        self.top = top
        self._windows: dict[tuple[tuple[int, int], str, str], _Window] = {}

    def add(self, records: Iterable[Record]) -> None:
        for r in records:
            if not isinstance(r, ExpHistogramDelta) or not r.count:
                continue
            label = ",".join(str(v) for v in r.attributes.values())
            key = (r.workload.identity_key, r.descriptor.name, label)
            w = self._windows.get(key)
            if w is None:
                w = self._windows[key] = _Window(r.workload, label, r.scale)
            w.offset, w.counts = merge_into(w.offset, w.counts, r.offset, r.bucket_counts)
            w.count += r.count
            w.min, w.max = min(w.min, r.min), max(w.max, r.max)

    def render(self, window_s: float, name_of: Callable[[Workload], str]) -> str:
        """The table for the window so far, then start a new window."""
        rows = sorted(self._windows.values(), key=lambda w: w.count, reverse=True)[: self.top]
        total = len(self._windows)
        self._windows = {}
        if not rows:
            return f"otel-ebpf: nothing measured in the last {window_s:.0f}s"
        lines = [f"otel-ebpf: top {len(rows)} of {total} (process, series) by count, "
                 f"last {window_s:.0f}s",
                 f"{'PID':>8} {'PROCESS':<16} {'SERIES':<20} {'COUNT':>10} {'P99':>9} "
                 f"{'MAX':>9}"]
        for w in rows:
            p99 = quantile(0.99, w.scale, w.offset, w.counts, w.min, w.max)
            lines.append(f"{w.workload.pid:>8} {name_of(w.workload)[:16]:<16} "
                         f"{w.label[:20]:<20} {w.count:>10} {format_seconds(p99):>9} "
                         f"{format_seconds(w.max):>9}")
        return "\n".join(lines)


class SummaryReport:
    """The table on `out` every `interval` seconds, and once more at shutdown. Records are
    added on the event loop; the table is rendered on the periodic runner's thread (the
    process names come from /proc)."""

    def __init__(self, top: int, interval: float, name_of: Callable[[Workload], str],
                 out: TextIO) -> None:
        self.table = HistogramSummary(top)
        self._name_of = name_of
        self._out = out
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self.periodic: Periodic[None] = Periodic("summary", interval, self.print_now)

    def add(self, records: Iterable[Record]) -> None:
        with self._lock:
            self.table.add(records)

    def print_now(self) -> None:
        with self._lock:  # a new window; the old one is rendered without the lock
            table, self.table = self.table, HistogramSummary(self.table.top)
            elapsed, self._started = time.monotonic() - self._started, time.monotonic()
        print(table.render(elapsed, self._name_of), file=self._out, flush=True)

    async def run(self) -> None:
        await self.periodic.run()

    async def last(self, deadline: float) -> None:
        await self.periodic.last(deadline)

    def close(self) -> None:
        self.periodic.close()
