"""The delivery with a spool, against the fake collector of test_delivery: past the memory
bound the oldest wait on disk instead of being dropped and come back first, in order;
past the spool's bound delivered + dropped == offered; memory stays within twice its
bound; what is queued at shutdown is delivered by the next run."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable
from pathlib import Path

from otel_ebpf.export.delivery import Delivery
from otel_ebpf.export.queue import SPOOL_FULL, Backoff, BoundedQueue, DropLedger, Entry
from otel_ebpf.export.spill import Spill
from otel_ebpf.export.spool import Spool
from otel_ebpf.model import CounterDelta, Identity, Workload
from otel_ebpf.selfmetrics import SPANS_DROPPED, SPANS_QUEUED, DeliveryMetrics
from tests.unit.test_delivery import FakeCollector, depth, dropped, until

W = Workload(pid=7, comm="w")


def make(collector: FakeCollector, directory: Path, max_items: int = 8,
         spool_bytes: int = 1 << 30) -> tuple[Delivery[int], list[CounterDelta]]:
    def resolver(workloads: Iterable[Workload]):  # type: ignore[no-untyped-def]
        return lambda w: Identity({"service.name": w.comm})

    metrics = DeliveryMetrics(SPANS_DROPPED, SPANS_QUEUED, 10, resolver)
    records: list[CounterDelta] = []
    metrics.sink = records.extend
    queue: BoundedQueue[int] = BoundedQueue(max_items, 1 << 30, DropLedger())
    delivery: Delivery[int] = Delivery(
        "spans", collector.send, queue, Backoff(0.02, 0.1), metrics,
        close=lambda: setattr(collector, "closed", True), batch_items=4,
        batch_bytes=1 << 30, linger=0.01)
    spool = Spool(directory, "spans", spool_bytes, queue.ledger)
    spool.open()

    def send(payload: bytes) -> object:
        return collector.send(json.loads(payload))

    delivery.spill_to(Spill(queue, spool, metrics, lambda b: json.dumps(b).encode(),
                            send, batch_items=4, batch_bytes=1 << 30))  # type: ignore[arg-type]
    return delivery, records


def offer(delivery: Delivery[int], numbers: Iterable[int]) -> None:
    delivery.offer([Entry(n, 100, W) for n in numbers])


async def an_outage(delivery: Delivery[int], collector: FakeCollector, n: int) -> int:
    """The collector away while n items are offered in tens, each offer once the spool's
    writer caught up with the previous (its lagging is test_a_lagging_writer_...'s); the
    most memory held."""
    collector.up = False
    most = 0
    for start in range(0, n, 10):
        offer(delivery, range(start, start + 10))
        most = max(most, delivery.queue.items)
        await until(lambda: not delivery.queue.over_bound)
    return most


async def test_past_the_memory_bound_nothing_is_lost_and_order_holds(tmp_path: Path) -> None:
    collector = FakeCollector()
    delivery, records = make(collector, tmp_path)
    worker = asyncio.create_task(delivery.run())
    most = await an_outage(delivery, collector, 200)
    assert most <= 2 * delivery.queue.max_items + 4  # and one of the writer's batches
    assert delivery.spill is not None and delivery.spill.spool.items > 150  # on disk
    assert delivery.waiting == 200  # memory, in flight and spool
    collector.up = True
    await until(lambda: len(collector.received) == 200)
    assert collector.received == list(range(200))
    assert dropped(records) == {}
    assert delivery.delivered_units == 200
    worker.cancel()
    await delivery.flush(time.monotonic() + 1)
    assert depth(records) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["lock"]


async def test_past_the_spool_bound_the_oldest_go_and_every_item_is_accounted(
        tmp_path: Path) -> None:
    collector = FakeCollector()
    delivery, records = make(collector, tmp_path, spool_bytes=1 << 16)  # ~500 B a file
    worker = asyncio.create_task(delivery.run())
    await an_outage(delivery, collector, 2000)
    collector.up = True
    await until(lambda: delivery.waiting == 0)
    worker.cancel()
    await delivery.flush(time.monotonic() + 1)
    lost = dropped(records)
    assert set(lost) == {SPOOL_FULL}
    assert len(collector.received) + lost[SPOOL_FULL] == 2000
    assert collector.received == sorted(collector.received)
    assert collector.received[-1] == 1999  # the newest survive


async def test_what_is_queued_at_shutdown_is_delivered_by_the_next_run(
        tmp_path: Path) -> None:
    collector = FakeCollector()
    delivery, records = make(collector, tmp_path)
    worker = asyncio.create_task(delivery.run())
    await an_outage(delivery, collector, 100)
    worker.cancel()
    await delivery.flush(time.monotonic() + 0.5)  # the collector still away
    assert dropped(records) == {} and collector.received == []
    # the next run, the collector back
    collector = FakeCollector()
    delivery, records = make(collector, tmp_path)
    assert delivery.waiting == 100
    worker = asyncio.create_task(delivery.run())
    await until(lambda: len(collector.received) == 100)
    assert collector.received == list(range(100))
    worker.cancel()
    await delivery.flush(time.monotonic() + 1)
    assert dropped(records) == {}


def test_a_lagging_writer_bounds_memory_by_dropping_the_oldest(tmp_path: Path) -> None:
    """The writer never runs (a stalled disk): past twice its bounds and one of the
    writer's batches the memory queue drops its oldest (queue_full), as without a
    spool; below that it holds them for the writer."""
    ledger = DropLedger()
    queue: BoundedQueue[int] = BoundedQueue(8, 1 << 30, ledger)
    queue.spills(4, 1 << 20)
    queue.offer_many(Entry(n, 100, W) for n in range(20))
    assert (queue.items, ledger.take()) == (20, {})  # over its bound: for the writer
    queue.offer_many(Entry(n, 100, W) for n in range(20, 30))
    assert queue.items == 20 and ledger.take() == {("queue_full", W): 10}
    assert [e.item for e in queue.take_spill(4, 1 << 30)] == [10, 11, 12, 13]
    while queue.take_spill(4, 1 << 30):
        pass
    assert queue.items == 4  # a spill takes the queue down to half its bound
