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
from otel_ebpf.selfmetrics import DeliveryMetrics

log = logging.getLogger(__name__)
T = TypeVar("T")
SETTLE_S = 0.5  # at shutdown, how long an attempt cut short by closing the transport may take


class Delivery(Generic[T]):
    """Sends what is offered, in order, in batches of up to `batch_items` units and
    `batch_bytes` bytes: as soon as a batch is full, or `linger` seconds after the first
    item of a batch was queued. `send` is blocking and runs on the delivery's own thread;
    `on_delivered` (optional) hears of each delivered batch there too; `close` ends the
    transport at shutdown."""

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
        self._future: asyncio.Future[Outcome] | None = None
        self._in_flight: list[Entry[T]] = []
        self._queued = asyncio.Event()  # the queue holds an item
        self._ready = asyncio.Event()  # ... a full batch
        self._failing = False
        self._say_outage = say_outage  # False: the transport tells of an outage itself

    # ---- feeding (any thread) --------------------------------------------------------

    def offer(self, entries: list[Entry[T]]) -> None:
        self.queue.offer_many(entries)
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
        while batch := self.queue.take(self.batch_items, self.batch_bytes):
            outcome = await self._attempt(batch)
            if outcome.ok or not outcome.retryable:
                continue
            if deadline is not None:
                return False
            delay = max(self.backoff.next(), outcome.retry_after or 0.0)
            await asyncio.sleep(delay)
        return True

    async def _attempt(self, batch: list[Entry[T]]) -> Outcome:
        loop = asyncio.get_running_loop()
        self._in_flight = batch
        self._future = loop.run_in_executor(self._pool, self._send_and_settle, batch)
        # shield: cancelling the worker at shutdown must not lose the batch's settling
        return await asyncio.shield(self._future)

    def _send_and_settle(self, batch: list[Entry[T]]) -> Outcome:
        try:
            outcome = self._send([e.item for e in batch])
        except Exception as exc:  # a bug in building the batch must not stop delivery
            log.exception("%s: building or sending a batch failed", self.signal)
            outcome = Outcome(False, retryable=False, why=repr(exc))
        units = sum(e.count for e in batch)
        if outcome.ok:
            self.delivered_units += units
            self.backoff.reset()
            if self._failing and self._say_outage:
                log.info("%s delivery works again; %d %s waiting", self.signal,
                         self.queue.items, self.signal)
            self._failing = False
            if self.on_delivered is not None:
                self.on_delivered([e.item for e in batch])
        elif outcome.retryable:
            self.queue.put_back(batch)
            if not self._failing and self._say_outage:
                log.warning("%s: the collector does not answer (%s); %s wait in a queue of "
                            "at most %d (%d bytes), oldest dropped first", self.signal,
                            outcome.why, self.signal, self.queue.max_items,
                            self.queue.max_bytes)
            self._failing = True
        else:
            log.warning("%s: the collector refused %d %s for good (%s); dropped",
                        self.signal, units, self.signal, outcome.why)
            for entry in batch:
                self.queue.ledger.drop(outcome.reason, entry.units)
        self._in_flight = []
        self.report()
        return outcome

    def report(self) -> None:
        """Blocking: the drops since the last report and the depth, as self-metrics."""
        depth = self.queue.items + sum(e.count for e in self._in_flight)
        self.metrics.report(self.queue.ledger.take(), depth)

    # ---- shutdown --------------------------------------------------------------------

    async def flush(self, deadline: float) -> None:
        """Deliver what is queued until `deadline` (monotonic) or the first failure, then
        close the transport; what is left is dropped and counted as shutdown."""
        if await self._settled(deadline):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._deliver_queued(deadline),
                                       max(0.1, deadline - time.monotonic()))
        self._close()  # cuts an attempt short: it settles as a retryable failure
        settled = await self._settled(time.monotonic() + SETTLE_S)
        loop = asyncio.get_running_loop()
        if not settled:  # stuck in the transport: counted now, never settled
            for entry in self._in_flight:
                self.queue.ledger.drop(SHUTDOWN, entry.units)
            self._in_flight = []
        left = self.queue.drain(SHUTDOWN)
        if left:
            log.warning("%s: %d %s undelivered at shutdown, counted as dropped", self.signal,
                        left, self.signal)
        await loop.run_in_executor(None, self.report)
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _settled(self, deadline: float) -> bool:
        """Whether no attempt is in flight, waiting for one until `deadline`."""
        future = self._future
        if future is None or future.done():
            return True
        with contextlib.suppress(TimeoutError, Exception):
            await asyncio.wait_for(asyncio.shield(future), max(0.01, deadline - time.monotonic()))
        return future.done()
