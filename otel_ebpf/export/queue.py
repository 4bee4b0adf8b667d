"""What a signal's delivery holds while the collector is away: a bounded queue that drops
its oldest entries first (or, with a spool, hands them to it: otel_ebpf/export/spill.py),
a ledger of what was dropped (why, and whose), and the backoff between attempts.

Nothing here knows OTLP or asyncio: the queue is fed from the event loop or an exporter's
thread and emptied by one delivery worker (otel_ebpf/export/delivery.py), so it takes a
lock; the ledger is filled under that lock too.
"""

from __future__ import annotations

import random
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from otel_ebpf.model import AttributeValue, Workload

T = TypeVar("T")
# whom a drop is counted against: a workload of this run, or a workload's attributes as
# resolved when its items were written to the spool (a previous run's pids mean nothing)
Attrs = frozenset[tuple[str, AttributeValue]]
Whose = Workload | Attrs

# the reasons a queued item is dropped
QUEUE_FULL = "queue_full"  # the queue's bound was reached: its oldest entries make room
EXPORT_REFUSED = "export_refused"  # the collector answered with a permanent error
UNSUPPORTED = "unsupported"  # the collector has no service for this signal
SHUTDOWN = "shutdown"  # still queued when the agent's shutdown budget ran out
SPOOL_FULL = "spool_full"  # the spool's byte bound was reached: its oldest files make room
SPOOL_CORRUPT = "spool_corrupt"  # a spool file that cannot be read back (truncated, damaged)
SPOOL_ERROR = "spool_error"  # could not be written to the spool (disk full, I/O error)

# drops of more distinct workloads than the ledger holds between two reports share this one
OVERFLOW = Workload(pid=-2, comm="overflow")


@dataclass(frozen=True, slots=True)
class Outcome:
    """One export attempt: delivered; or failed and worth retrying (`retry_after`: the wait
    the collector asked for, if it did); or refused for good, dropped under `reason`."""

    ok: bool
    retryable: bool = False
    why: str = ""
    retry_after: float | None = None
    reason: str = EXPORT_REFUSED


DELIVERED = Outcome(True)


@dataclass(frozen=True, slots=True)
class Entry(Generic[T]):
    """One queued item: its size in bytes (estimated or exact) and the signal units it
    holds (`count`), all the `workload`'s; an item holding several workloads' units (a
    profile request) has each one's in `shares` (see `shared`). Small on purpose: a
    queue holds thousands, one a span."""

    item: T
    nbytes: int
    workload: Workload
    count: int = 1
    shares: Mapping[Workload, int] | None = None

    @classmethod
    def shared(cls, item: T, nbytes: int, shares: Mapping[Workload, int]) -> Entry[T]:
        return cls(item, nbytes, next(iter(shares)), sum(shares.values()), dict(shares))

    @property
    def units(self) -> Mapping[Workload, int]:
        """Units by workload: whom a drop of this entry is counted against."""
        return self.shares if self.shares is not None else {self.workload: self.count}


class DropLedger:
    """Units dropped, by (reason, workload), since the last `take`. Holds at most
    `max_keys` keys; beyond, a drop is counted against the OVERFLOW workload, so a storm
    of short-lived processes cannot grow it."""

    def __init__(self, max_keys: int = 1024) -> None:
        self.max_keys = max_keys
        self._counts: dict[tuple[str, Whose], int] = {}
        self._lock = threading.Lock()

    def drop(self, reason: str, units: Mapping[Workload, int] | Mapping[Attrs, int]) -> None:
        with self._lock:
            for workload, n in units.items():
                key = (reason, workload)
                if key not in self._counts and len(self._counts) >= self.max_keys:
                    key = (reason, OVERFLOW)
                self._counts[key] = self._counts.get(key, 0) + n

    def take(self) -> dict[tuple[str, Whose], int]:
        with self._lock:
            counts, self._counts = self._counts, {}
        return counts


class BoundedQueue(Generic[T]):
    """A FIFO bounded in signal units (`max_items`) and bytes (`max_bytes`). Past either
    bound the OLDEST entries are dropped and counted as queue_full: after an outage the
    collector gets the newest data, and the memory held never exceeds the bounds (plus the
    one batch a delivery has in flight). An entry larger than the whole bound is dropped
    at once.

    With a spool (`spills`), the bounds are where spilling starts: past them the oldest
    wait for the spool's writer (`over_bound`, `take_spill`) and are dropped only past
    twice the bounds plus one of the writer's batches, should it fall that far behind."""

    def __init__(self, max_items: int, max_bytes: int, ledger: DropLedger) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.ledger = ledger
        self.items = 0  # signal units queued
        self.nbytes = 0
        self._hard = (max_items, max_bytes)  # past these the oldest are dropped
        self._entries: deque[Entry[T]] = deque()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def spills(self, batch_items: int, batch_bytes: int) -> None:
        """A spool takes what is past the bounds, in batches of up to these: drop only
        past twice the bounds and one batch (an offer as large as a batch, a burst of
        spans, fits while the writer wakes up)."""
        self._hard = (2 * self.max_items + batch_items, 2 * self.max_bytes + batch_bytes)

    @property
    def over_bound(self) -> bool:
        return self.items > self.max_items or self.nbytes > self.max_bytes

    def take_spill(self, max_items: int, max_bytes: int) -> list[Entry[T]]:
        """The oldest entries (up to a batch's bounds) while the queue holds more than half
        its bounds: a spill that starts past the bounds takes the queue down to half, so
        the spool gets files of a useful size rather than one per offer."""
        with self._lock:
            return self._take(max_items, max_bytes, lambda: (
                self.items > self.max_items // 2 or self.nbytes > self.max_bytes // 2))

    def offer(self, entry: Entry[T]) -> None:
        with self._lock:
            self._append(entry)
            self._evict()

    def offer_many(self, entries: Iterable[Entry[T]]) -> None:
        with self._lock:
            for entry in entries:
                self._append(entry)
            self._evict()

    def put_back(self, entries: list[Entry[T]]) -> None:
        """A batch that could not be delivered goes back to the head, in its order; if the
        queue filled meanwhile, these are the oldest and the first to go."""
        with self._lock:
            for entry in reversed(entries):
                self._entries.appendleft(entry)
                self.items += entry.count
                self.nbytes += entry.nbytes
            self._evict()

    def take(self, max_items: int, max_bytes: int) -> list[Entry[T]]:
        """The oldest entries up to a batch's bounds (at least one entry when any)."""
        with self._lock:
            return self._take(max_items, max_bytes, lambda: True)

    def _take(self, max_items: int, max_bytes: int, more: Callable[[], bool]
              ) -> list[Entry[T]]:
        # under the lock: the oldest entries while `more()` and the batch's bounds allow
        batch: list[Entry[T]] = []
        items = nbytes = 0
        while self._entries and more():
            head = self._entries[0]
            if batch and (items + head.count > max_items or nbytes + head.nbytes > max_bytes):
                break
            self._entries.popleft()
            items += head.count
            nbytes += head.nbytes
            self.items -= head.count
            self.nbytes -= head.nbytes
            batch.append(head)
        return batch

    def drain(self, reason: str) -> int:
        """Drop everything queued (shutdown), counted under `reason`; the units dropped."""
        with self._lock:
            entries, self._entries = self._entries, deque()
            dropped, self.items, self.nbytes = self.items, 0, 0
        for entry in entries:
            self.ledger.drop(reason, entry.units)
        return dropped

    def _append(self, entry: Entry[T]) -> None:
        self._entries.append(entry)
        self.items += entry.count
        self.nbytes += entry.nbytes

    def _evict(self) -> None:
        max_items, max_bytes = self._hard
        while self._entries and (self.items > max_items or self.nbytes > max_bytes):
            oldest = self._entries.popleft()
            self.items -= oldest.count
            self.nbytes -= oldest.nbytes
            self.ledger.drop(QUEUE_FULL, oldest.units)


class Backoff:
    """Waits between attempts while a collector does not answer: `initial`, doubling up to
    `maximum`, each +-`jitter` so that many agents do not retry in step. Short on purpose:
    an attempt that fails costs a refused connection, and the first attempt after the
    collector's return is at most `maximum` (plus jitter) away."""

    def __init__(self, initial: float, maximum: float, jitter: float = 0.2) -> None:
        self.initial = initial
        self.maximum = max(initial, maximum)
        self.jitter = jitter
        self.failures = 0

    def next(self) -> float:
        """The wait after one more failure."""
        base = min(self.maximum, self.initial * 2.0 ** min(self.failures, 32))
        self.failures += 1
        return base * random.uniform(1 - self.jitter, 1 + self.jitter)

    def reset(self) -> None:
        self.failures = 0
