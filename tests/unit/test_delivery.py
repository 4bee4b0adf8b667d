"""The delivery worker against a fake collector that goes away and comes back: nothing is
lost within the bound, the oldest go past it, every unit is delivered or counted as
dropped exactly once, and the first attempt after the return follows within the backoff."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterable

import pytest

from otel_ebpf.export.delivery import Delivery
from otel_ebpf.export.queue import (
    DELIVERED,
    EXPORT_REFUSED,
    QUEUE_FULL,
    SHUTDOWN,
    Backoff,
    BoundedQueue,
    DropLedger,
    Entry,
    Outcome,
)
from otel_ebpf.model import CounterDelta, Identity, Workload
from otel_ebpf.selfmetrics import SPANS_DROPPED, SPANS_QUEUED, DeliveryMetrics

W = Workload(pid=7, comm="w")


class FakeCollector:
    def __init__(self) -> None:
        self.up = True
        self.refuse: set[int] = set()
        self.received: list[int] = []
        self.attempts: list[tuple[float, bool]] = []
        self.closed = False
        self._lock = threading.Lock()

    def send(self, batch: list[int]) -> Outcome:
        with self._lock:
            self.attempts.append((time.monotonic(), self.up))
            if not self.up or self.closed:
                return Outcome(False, retryable=True, why="connection refused")
            if self.refuse & set(batch):
                return Outcome(False, retryable=False, why="INVALID_ARGUMENT")
            self.received.extend(batch)
            return DELIVERED


def make(collector: FakeCollector, max_items: int = 1000, batch: int = 10
         ) -> tuple[Delivery[int], list[CounterDelta]]:
    def resolver(workloads: Iterable[Workload]):  # type: ignore[no-untyped-def]
        return lambda w: Identity({"service.name": w.comm})

    metrics = DeliveryMetrics(SPANS_DROPPED, SPANS_QUEUED, 10, resolver)
    records: list[CounterDelta] = []
    metrics.sink = records.extend
    delivery: Delivery[int] = Delivery(
        "spans", collector.send, BoundedQueue(max_items, 1 << 30, DropLedger()),
        Backoff(0.02, 0.1), metrics, close=lambda: setattr(collector, "closed", True),
        batch_items=batch, batch_bytes=1 << 30, linger=0.01)
    return delivery, records


def offer(delivery: Delivery[int], numbers: Iterable[int]) -> None:
    delivery.offer([Entry(n, 100, W) for n in numbers])


def dropped(records: list[CounterDelta]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        if r.descriptor is SPANS_DROPPED:
            reason = str(r.attributes["reason"])
            out[reason] = out.get(reason, 0) + r.value
    return out


def depth(records: list[CounterDelta]) -> int:
    return sum(r.value for r in records if r.descriptor is SPANS_QUEUED)


async def until(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def test_an_outage_within_the_bound_loses_nothing_and_keeps_order() -> None:
    collector = FakeCollector()
    delivery, records = make(collector)
    worker = asyncio.create_task(delivery.run())
    offer(delivery, range(0, 30))
    await until(lambda: len(collector.received) == 30)
    collector.up = False
    offer(delivery, range(30, 200))
    await until(lambda: sum(1 for _, up in collector.attempts if not up) >= 5)
    assert depth(records) > 0  # the depth is reported while the collector is away
    returned = time.monotonic()
    collector.up = True
    await until(lambda: len(collector.received) == 200)
    first = min(t for t, up in collector.attempts if up and t >= returned)
    assert first - returned <= 0.1 * 1.2 + 0.05  # within the backoff's cap
    assert collector.received == list(range(200))
    assert dropped(records) == {} and depth(records) == 0
    assert delivery.delivered_units == 200
    worker.cancel()
    await delivery.flush(time.monotonic() + 1)


async def test_past_the_bound_the_oldest_go_and_delivered_plus_dropped_is_offered() -> None:
    collector = FakeCollector()
    collector.up = False
    delivery, records = make(collector, max_items=50)
    worker = asyncio.create_task(delivery.run())
    for start in range(0, 300, 30):
        offer(delivery, range(start, start + 30))
        await asyncio.sleep(0.01)
    assert delivery.queue.items + len(delivery._in_flight) <= 50 + delivery.batch_items
    collector.up = True
    await until(lambda: delivery.queue.items == 0 and not delivery._in_flight)
    worker.cancel()
    await delivery.flush(time.monotonic() + 1)
    lost = dropped(records)
    assert set(lost) == {QUEUE_FULL}
    assert len(collector.received) + lost[QUEUE_FULL] == 300
    assert collector.received == sorted(collector.received)  # in order
    assert collector.received[-1] == 299  # the newest survive
    assert len(collector.received) >= 50


async def test_a_refused_batch_is_dropped_once_and_the_rest_goes_on() -> None:
    collector = FakeCollector()
    collector.refuse = {15}
    delivery, records = make(collector)
    worker = asyncio.create_task(delivery.run())
    offer(delivery, range(40))
    await until(lambda: len(collector.received) == 30)
    worker.cancel()
    await delivery.flush(time.monotonic() + 1)
    assert collector.received == [*range(10), *range(20, 40)]
    assert dropped(records) == {EXPORT_REFUSED: 10}


async def test_shutdown_during_an_outage_counts_what_is_left() -> None:
    collector = FakeCollector()
    delivery, records = make(collector)
    worker = asyncio.create_task(delivery.run())
    collector.up = False
    offer(delivery, range(25))
    await until(lambda: len(collector.attempts) >= 2)
    worker.cancel()
    began = time.monotonic()
    await delivery.flush(time.monotonic() + 0.5)
    assert time.monotonic() - began < 1.0
    assert collector.closed
    assert dropped(records) == {SHUTDOWN: 25} and depth(records) == 0


async def test_shutdown_delivers_what_is_queued_when_the_collector_answers() -> None:
    collector = FakeCollector()
    delivery, records = make(collector)
    offer(delivery, range(25))  # never started: the final flush sends it all
    await delivery.flush(time.monotonic() + 1)
    assert collector.received == list(range(25))
    assert dropped(records) == {}


async def test_offers_from_another_thread_wake_the_worker() -> None:
    collector = FakeCollector()
    delivery, _ = make(collector)
    worker = asyncio.create_task(delivery.run())
    await asyncio.sleep(0.01)
    thread = threading.Thread(target=offer, args=(delivery, range(5)))
    thread.start()
    thread.join()
    await until(lambda: len(collector.received) == 5)
    worker.cancel()
    await delivery.flush(time.monotonic() + 1)


async def test_refusals_for_one_reason_are_said_once_and_all_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    collector = FakeCollector()
    collector.refuse = set(range(30))  # like a collector without profiles: every batch
    delivery, records = make(collector)
    worker = asyncio.create_task(delivery.run())
    with caplog.at_level(logging.WARNING, logger="otel_ebpf.export.delivery"):
        for start in (0, 10, 20):
            offer(delivery, range(start, start + 10))
            want = start + 10
            await until(lambda want=want: dropped(records).get(EXPORT_REFUSED, 0) >= want)
    worker.cancel()
    await delivery.flush(time.monotonic() + 1)
    assert dropped(records) == {EXPORT_REFUSED: 30}
    warnings = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(warnings) == 1 and "INVALID_ARGUMENT" in warnings[0].getMessage()
