"""A memory queue that overflows into its signal's spool (otel_ebpf/export/spool.py).

While the collector is away and the memory queue is past its bounds, a writer thread of
its own takes the oldest entries in batches, serializes each batch as one OTLP request
(`encode`, the signal's) and writes it to the spool; at shutdown whatever is still in
memory follows, so that the next run delivers it. Order is kept: the spool only ever
holds entries older than those in memory, and the delivery reads the spool first.

The writer is a thread rather than the delivery's: the delivery's thread may sit in an
attempt for a whole exporter timeout while spans keep coming. Should the writer fall
behind (a slow disk), the memory queue drops its oldest past twice its bounds and one
batch, so memory stays bounded whatever the disk does.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

from otel_ebpf.export.queue import SPOOL_ERROR, BoundedQueue, Entry, Outcome
from otel_ebpf.export.spool import Spool, Spooled
from otel_ebpf.model import Workload
from otel_ebpf.selfmetrics import DeliveryMetrics

log = logging.getLogger(__name__)
T = TypeVar("T")


class Spill(Generic[T]):
    """Moves a memory queue's oldest entries to `spool` when past its bounds, in batches
    of up to `batch_items` units and `batch_bytes` bytes, each one file. `encode` turns a
    batch's items into the request its file holds; `send` delivers such a request (one
    attempt, like the delivery's own send). `lock` orders the writer against the delivery
    taking from memory: held, no entry is between memory and the spool."""

    def __init__(self, queue: BoundedQueue[T], spool: Spool, metrics: DeliveryMetrics,
                 encode: Callable[[list[T]], bytes], send: Callable[[bytes], Outcome],
                 *, batch_items: int, batch_bytes: int) -> None:
        self.queue = queue
        self.spool = spool
        self.metrics = metrics
        self.encode = encode
        self.send = send
        self.batch_items = batch_items
        self.batch_bytes = batch_bytes
        self.lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._warned = False
        self._thread: threading.Thread | None = None
        queue.spills(batch_items, batch_bytes)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"spill-{self.spool.signal}",
                                            daemon=True)
            self._thread.start()

    def wake(self) -> None:
        """Any thread: the memory queue may be past its bounds."""
        self._wake.set()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        self.spool.close()

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait()
            self._wake.clear()
            if self._stop:
                return
            try:
                self.spill()
            except Exception:  # the writer must outlive a bug in one batch
                log.exception("%s: spilling to the spool failed", self.spool.signal)

    def spill(self) -> None:
        """Blocking: the oldest in memory to the spool while memory is past its bounds."""
        if not self.queue.over_bound:
            return
        with self.lock:
            while batch := self.queue.take_spill(self.batch_items, self.batch_bytes):
                self.write(batch)

    def spill_all(self, entries: list[Entry[T]]) -> None:
        """Blocking, at shutdown: `entries` (a batch that was in flight, older than the
        queue) and everything in memory to the spool, for the next run to deliver."""
        with self.lock:
            if entries:
                self.write(entries, front=True)
            while batch := self.queue.take(self.batch_items, self.batch_bytes):
                self.write(batch)

    def write(self, batch: list[Entry[T]], front: bool = False) -> None:
        """One batch as one spool file (caller holds `lock`); a batch that cannot be
        written is counted as dropped (spool_error), as is one past the spool's bound
        (spool_full, by the spool)."""
        units: dict[Workload, int] = {}
        for entry in batch:
            for workload, n in entry.units.items():
                units[workload] = units.get(workload, 0) + n
        try:
            payload = self.encode([e.item for e in batch])
            self.spool.append(payload, sum(e.count for e in batch),
                              self.metrics.resolve(units), front=front)
        except Exception as exc:
            self._failed(units, exc)
            return
        self._warned = False

    def _failed(self, units: Mapping[Workload, int], exc: Exception) -> None:
        if not self._warned:
            log.warning("%s spool %s: cannot write (%s); what does not fit in memory is "
                        "dropped and counted (spool_error) until it can", self.spool.signal,
                        self.spool.directory, exc)
            self._warned = True
        self.queue.ledger.drop(SPOOL_ERROR, units)

    def oldest(self) -> Spooled | None:
        return self.spool.oldest()
