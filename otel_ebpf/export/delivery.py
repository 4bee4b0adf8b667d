"""One signal's way to the collector, written once for spans and profiles: a bounded queue
(otel_ebpf/export/queue.py), one thread that sends batches through a transport making one
attempt each, and the agent's own retry.

While the collector does not answer, the batch at the head goes back to the queue and the
next attempt follows after a short backoff (`exporter.retry`: 250 ms doubling to 2 s), so
the first attempt after the collector's return is at most ~2.4 s away; new items keep
queueing behind, and past the queue's bound its oldest are dropped. A batch the collector
refuses for good is dropped at once (it would never be accepted). Every drop is counted by
reason and workload, and the queue's depth reported, through DeliveryMetrics after each
attempt.

With a spool (otel_ebpf/export/spill.py) the memory queue's oldest overflow to disk
instead of being dropped, what is left at shutdown goes there too, and the delivery sends
the spool's files first, oldest first: they are older than anything in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

from otel_ebpf.export.queue import SHUTDOWN, Backoff, BoundedQueue, Entry, Outcome
from otel_ebpf.export.spill import Spill
from otel_ebpf.export.spool import Spooled
from otel_ebpf.selfmetrics import DeliveryMetrics

log = logging.getLogger(__name__)
T = TypeVar("T")
SETTLE_S = 0.5  # at shutdown, how long an attempt cut short by closing the transport may take


class Delivery(Generic[T]):
    """Sends what is offered, in order, in batches of up to `batch_items` units and
    `batch_bytes` bytes: as soon as a batch is full, or `linger` seconds after the first
    item of a batch was queued. `send` is blocking and runs on the delivery's own thread;
    `on_delivered` (optional) hears of each delivered batch there too (not of batches
    read back from the spool); `close` ends the transport at shutdown. `spill`: the
    memory queue overflows to a spool (attach it with `spill_to`)."""

    def __init__(self, signal: str, send: Callable[[list[T]], Outcome],
                 queue: BoundedQueue[T], backoff: Backoff, metrics: DeliveryMetrics,
                 *, close: Callable[[], None], batch_items: int, batch_bytes: int,
                 linger: float, say_outage: bool = True) -> None:
        self.signal = signal
        self.queue = queue
        self.backoff = backoff
        self.metrics = metrics
        self.batch_items = batch_items
        self.batch_bytes = batch_bytes
        self.linger = linger
        self.delivered_units = 0
        self.on_delivered: Callable[[list[T]], None] | None = None
        self._send = send
        self._close = close
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=signal)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._future: asyncio.Future[Outcome | None] | None = None
        self._in_flight: list[Entry[T]] = []
        self._queued = asyncio.Event()  # the queue holds an item
        self._ready = asyncio.Event()  # ... a full batch
        self._failing = False
        self._refusals_said: set[str] = set()  # each reason is worth one warning
        self._say_outage = say_outage  # False: the transport tells of an outage itself
        self.spill: Spill[T] | None = None
        self._spilled = False  # shutdown wrote what was left to the spool

    def spill_to(self, spill: Spill[T]) -> None:
        self.spill = spill

    # ---- feeding (any thread) --------------------------------------------------------

    def offer(self, entries: list[Entry[T]]) -> None:
        self.queue.offer_many(entries)
        if self.spill is not None and self.queue.over_bound:
            self.spill.wake()
        loop = self._loop
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if loop is None or here is loop:
            self._wake()
        else:
            loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        self._queued.set()
        if self.queue.items >= self.batch_items or self.queue.nbytes >= self.batch_bytes:
            self._ready.set()

    # ---- the worker ------------------------------------------------------------------

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.spill is not None:
            self.spill.start()
            if len(self.spill.spool):  # a previous run's: deliver it now
                self._queued.set()
                self._ready.set()
        while True:
            await self._queued.wait()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), self.linger)
            self._queued.clear()
            self._ready.clear()
            await self._deliver_queued(deadline=None)

    async def _deliver_queued(self, deadline: float | None) -> bool:
        """Send batches until the queue is empty (True). A retryable failure puts the batch
        back and waits the backoff; with a `deadline` (shutdown) it ends the delivery."""
        while (outcome := await self._attempt()) is not None:
            if outcome.ok or not outcome.retryable:
                continue
            if deadline is not None:
                return False
            delay = max(self.backoff.next(), outcome.retry_after or 0.0)
            await asyncio.sleep(delay)
        return True

    async def _attempt(self) -> Outcome | None:
        """One attempt at the oldest batch, on the delivery's thread; None: none queued."""
        loop = asyncio.get_running_loop()
        future = self._future = loop.run_in_executor(self._pool, self._take_and_send)
        # shield: cancelling the worker at shutdown must not lose the batch's settling
        return await asyncio.shield(future)

    def _take_and_send(self) -> Outcome | None:
        if self.spill is None:
            batch = self.queue.take(self.batch_items, self.batch_bytes)
        else:
            with self.spill.lock:  # nothing between memory and the spool while we look
                spooled = self.spill.oldest()
                batch = [] if spooled else self.queue.take(self.batch_items, self.batch_bytes)
                self._in_flight = batch
            if spooled is not None:
                return self._send_spooled(self.spill, spooled)
        if not batch:
            return None
        self._in_flight = batch
        return self._send_and_settle(batch)

    def _send_and_settle(self, batch: list[Entry[T]]) -> Outcome:
        try:
            outcome = self._send([e.item for e in batch])
        except Exception as exc:  # a bug in building the batch must not stop delivery
            log.exception("%s: building or sending a batch failed", self.signal)
            outcome = Outcome(False, retryable=False, why=repr(exc))
        units = sum(e.count for e in batch)
        if outcome.ok:
            self._delivered(units)
            if self.on_delivered is not None:
                self.on_delivered([e.item for e in batch])
        elif outcome.retryable:
            self._put_back(batch)
            self._undelivered(outcome)
        else:
            self._refused(units, outcome)
            for entry in batch:
                self.queue.ledger.drop(outcome.reason, entry.units)
        self._in_flight = []
        self.report()
        return outcome

    def _put_back(self, batch: list[Entry[T]]) -> None:
        """A batch that failed goes back where its age puts it: the head of memory, or,
        if the spool took newer entries during the attempt, the head of the spool."""
        spill = self.spill
        if spill is None:
            self.queue.put_back(batch)
            return
        with spill.lock:
            self._in_flight = []
            if self._spilled:
                return  # a stuck attempt that settled late: shutdown spooled it
            if len(spill.spool):
                spill.write(batch, front=True)
            else:
                self.queue.put_back(batch)
        if self.queue.over_bound:
            spill.wake()

    def _send_spooled(self, spill: Spill[T], spooled: Spooled) -> Outcome:
        """One attempt at the spool's oldest file; it leaves the spool once delivered or
        refused for good."""
        try:
            outcome = spill.send(spooled.payload)
        except Exception as exc:  # a payload that does not decode
            log.exception("%s: sending a spooled batch failed", self.signal)
            outcome = Outcome(False, retryable=False, why=repr(exc))
        if outcome.ok:
            spill.spool.settle(spooled)
            self._delivered(spooled.file.items)
        elif outcome.retryable:
            spill.spool.settle(spooled, keep=True)
            self._undelivered(outcome)
        else:
            self._refused(spooled.file.items, outcome)
            spill.spool.settle(spooled, outcome.reason)
        self.report()
        return outcome

    def _delivered(self, units: int) -> None:
        self.delivered_units += units
        self.backoff.reset()
        if self._failing and self._say_outage:
            log.info("%s delivery works again; %d %s waiting", self.signal,
                     self.waiting, self.signal)
        self._failing = False

    def _undelivered(self, outcome: Outcome) -> None:
        if not self._failing and self._say_outage:
            where = (f", then in the spool {self.spill.spool.directory} (at most "
                     f"{self.spill.spool.max_bytes} bytes)" if self.spill else "")
            log.warning("%s: the collector does not answer (%s); %s wait in a queue of "
                        "at most %d (%d bytes)%s, oldest dropped first", self.signal,
                        outcome.why, self.signal, self.queue.max_items,
                        self.queue.max_bytes, where)
        self._failing = True

    def _refused(self, units: int, outcome: Outcome) -> None:
        # a collector without profiles refuses every export the same way: say it once,
        # the drop counter (otel_ebpf.<signal>.dropped) keeps counting
        first = outcome.why not in self._refusals_said and len(self._refusals_said) < 32
        if first:
            self._refusals_said.add(outcome.why)
        log.log(logging.WARNING if first else logging.DEBUG,
                "%s: the collector refused %d %s for good (%s); dropped%s", self.signal,
                units, self.signal, outcome.why,
                "; further refusals for this reason are counted in "
                f"otel_ebpf.{self.signal}.dropped, not logged" if first else "")

    @property
    def waiting(self) -> int:
        """Units queued, in memory, in flight and in the spool (blocking: with a spool, a
        consistent count waits for a spool write under way)."""
        if self.spill is None:
            return self.queue.items + sum(e.count for e in self._in_flight)
        with self.spill.lock:
            return (self.queue.items + sum(e.count for e in self._in_flight)
                    + self.spill.spool.items)

    def report(self) -> None:
        """Blocking: the drops since the last report and the depth, as self-metrics."""
        self.metrics.report(self.queue.ledger.take(), self.waiting)

    # ---- shutdown --------------------------------------------------------------------

    async def flush(self, deadline: float) -> None:
        """Deliver what is queued until `deadline` (monotonic) or the first failure, then
        close the transport; what is left goes to the spool, or without one is dropped and
        counted as shutdown."""
        if await self._settled(deadline):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._deliver_queued(deadline),
                                       max(0.1, deadline - time.monotonic()))
        self._close()  # cuts an attempt short: it settles as a retryable failure
        settled = await self._settled(time.monotonic() + SETTLE_S)
        loop = asyncio.get_running_loop()
        stuck = [] if settled else self._in_flight
        self._in_flight = []
        if self.spill is not None:  # stuck in the transport too: delivered at least once
            await loop.run_in_executor(None, self._spill_at_shutdown, self.spill, stuck)
        else:
            for entry in stuck:  # counted now, never settled
                self.queue.ledger.drop(SHUTDOWN, entry.units)
            left = self.queue.drain(SHUTDOWN)
            if left:
                log.warning("%s: %d %s undelivered at shutdown, counted as dropped",
                            self.signal, left, self.signal)
        await loop.run_in_executor(None, self.report)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _spill_at_shutdown(self, spill: Spill[T], stuck: list[Entry[T]]) -> None:
        self._spilled = True
        spill.spill_all(stuck)
        spool = spill.spool
        if len(spool):
            log.info("%s: %d %s (%d bytes) wait in the spool %s for the next run",
                     self.signal, spool.items, self.signal, spool.nbytes, spool.directory)
        spill.stop()

    async def _settled(self, deadline: float) -> bool:
        """Whether no attempt is in flight, waiting for one until `deadline`."""
        future = self._future
        if future is None or future.done():
            return True
        with contextlib.suppress(TimeoutError, Exception):
            await asyncio.wait_for(asyncio.shield(future), max(0.01, deadline - time.monotonic()))
        return future.done()
