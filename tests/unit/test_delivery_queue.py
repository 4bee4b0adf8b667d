"""The bounded delivery queue, its drop ledger and backoff, and the drop counters they feed:
the bound holds in items and bytes, the oldest go first, every drop is counted once, by
reason and by workload, with bounded cardinality."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from otel_ebpf.enrich.identity import AGENT
from otel_ebpf.export.queue import (
    EXPORT_REFUSED,
    OVERFLOW,
    QUEUE_FULL,
    SHUTDOWN,
    Backoff,
    BoundedQueue,
    DropLedger,
    Entry,
)
from otel_ebpf.model import CounterDelta, Identity, Workload
from otel_ebpf.selfmetrics import SPANS_DROPPED, SPANS_QUEUED, DeliveryMetrics

A = Workload(pid=10, comm="a")
B = Workload(pid=20, comm="b")


def entry(n: int, workload: Workload = A, nbytes: int = 100) -> Entry[int]:
    return Entry(n, nbytes, workload)


def items(queue: BoundedQueue[int]) -> list[int]:
    return [e.item for e in queue.take(1 << 30, 1 << 30)]


def test_past_the_item_bound_the_oldest_are_dropped_and_counted() -> None:
    ledger = DropLedger()
    queue: BoundedQueue[int] = BoundedQueue(5, 1 << 20, ledger)
    queue.offer_many(entry(i, A if i < 3 else B) for i in range(8))
    assert queue.items == 5 and queue.nbytes == 500
    assert ledger.take() == {(QUEUE_FULL, A): 3}  # 0, 1, 2: the oldest, all A's
    assert items(queue) == [3, 4, 5, 6, 7]
    assert queue.items == 0 and queue.nbytes == 0 and ledger.take() == {}


def test_the_byte_bound_holds_too_and_an_oversized_entry_goes_at_once() -> None:
    ledger = DropLedger()
    queue: BoundedQueue[int] = BoundedQueue(1000, 1000, ledger)
    for i in range(6):
        queue.offer(entry(i, nbytes=300))
    assert queue.nbytes == 900 and queue.items == 3
    assert ledger.take() == {(QUEUE_FULL, A): 3}
    queue.offer(entry(99, B, nbytes=5000))  # larger than the whole bound
    assert ledger.take() == {(QUEUE_FULL, A): 3, (QUEUE_FULL, B): 1}
    assert queue.nbytes == 0 and items(queue) == []


def test_units_count_per_workload_and_an_entry_of_many_units_fills_the_bound() -> None:
    ledger = DropLedger()
    queue: BoundedQueue[str] = BoundedQueue(4, 1 << 20, ledger)
    queue.offer(Entry.shared("request-1", 10, {A: 2, B: 1}))
    queue.offer(Entry.shared("request-2", 10, {B: 2}))
    assert queue.items == 2
    assert ledger.take() == {(QUEUE_FULL, A): 2, (QUEUE_FULL, B): 1}


def test_a_batch_put_back_keeps_its_place_and_goes_first_when_the_queue_filled() -> None:
    ledger = DropLedger()
    queue: BoundedQueue[int] = BoundedQueue(4, 1 << 20, ledger)
    queue.offer_many(entry(i) for i in range(4))
    batch = queue.take(2, 1 << 20)
    assert [e.item for e in batch] == [0, 1] and queue.items == 2
    queue.offer_many(entry(i, B) for i in (4, 5))  # arrives while the batch is in flight
    assert ledger.take() == {}
    queue.put_back(batch)  # the collector did not answer
    assert ledger.take() == {(QUEUE_FULL, A): 2}  # 0 and 1 were the oldest
    assert items(queue) == [2, 3, 4, 5]


def test_take_respects_the_batch_bounds_but_always_makes_progress() -> None:
    queue: BoundedQueue[int] = BoundedQueue(100, 1 << 20, DropLedger())
    queue.offer_many(entry(i, nbytes=40) for i in range(10))
    assert [e.item for e in queue.take(3, 1 << 20)] == [0, 1, 2]
    assert [e.item for e in queue.take(100, 100)] == [3, 4]  # 2 x 40 <= 100 < 3 x 40
    assert [e.item for e in queue.take(100, 1)] == [5]  # one entry even over the bytes
    assert queue.items == 4


def test_drain_counts_what_is_left_under_its_reason() -> None:
    ledger = DropLedger()
    queue: BoundedQueue[int] = BoundedQueue(100, 1 << 20, ledger)
    queue.offer_many([entry(1), entry(2, B), entry(3, B)])
    assert queue.drain(SHUTDOWN) == 3
    assert ledger.take() == {(SHUTDOWN, A): 1, (SHUTDOWN, B): 2}
    assert queue.items == 0 and len(queue) == 0


def test_the_ledger_is_bounded_by_overflowing_into_one_key() -> None:
    ledger = DropLedger(max_keys=3)
    for pid in range(1, 6):
        ledger.drop(QUEUE_FULL, {Workload(pid=pid): 2})
    ledger.drop(QUEUE_FULL, {Workload(pid=1): 1})  # a known key still counts as itself
    counts = ledger.take()
    assert counts == {(QUEUE_FULL, Workload(pid=1)): 3, (QUEUE_FULL, Workload(pid=2)): 2,
                      (QUEUE_FULL, Workload(pid=3)): 2, (QUEUE_FULL, OVERFLOW): 4}
    assert sum(counts.values()) == 11


def test_backoff_doubles_to_its_cap_with_jitter_and_resets() -> None:
    backoff = Backoff(0.25, 2.0, jitter=0.2)
    waits = [backoff.next() for _ in range(8)]
    for wait, base in zip(waits, [0.25, 0.5, 1, 2, 2, 2, 2, 2], strict=True):
        assert base * 0.8 <= wait <= base * 1.2
    backoff.reset()
    assert backoff.next() <= 0.3


def _resolver(names: dict[Workload, dict[str, str]]):  # type: ignore[no-untyped-def]
    def resolve(workloads: Iterable[Workload]):  # type: ignore[no-untyped-def]
        return lambda w: Identity({"host.name": "h", "process.pid": w.pid, **names[w]},
                                  {"process.pid": w.pid})
    return resolve


def test_drops_are_counted_by_reason_and_workload_identity_without_pids() -> None:
    c1, c2 = Workload(pid=1, comm="web"), Workload(pid=2, comm="web")
    db = Workload(pid=3, comm="db")
    names = {c1: {"container.name": "web", "service.name": "web"},
             c2: {"container.name": "web", "service.name": "web"},
             db: {"service.name": "postgres", "process.executable.name": "postgres"}}
    metrics = DeliveryMetrics(SPANS_DROPPED, SPANS_QUEUED, 100, _resolver(names))
    got: list[CounterDelta] = []
    metrics.sink = got.extend
    metrics.report({(QUEUE_FULL, c1): 3, (QUEUE_FULL, c2): 4, (EXPORT_REFUSED, db): 1}, 7)
    drops = {frozenset(r.attributes.items()): r.value for r in got
             if r.descriptor is SPANS_DROPPED}
    assert drops == {
        frozenset({"reason": QUEUE_FULL, "container.name": "web",
                   "service.name": "web"}.items()): 7,  # two processes, one workload
        frozenset({"reason": EXPORT_REFUSED, "service.name": "postgres",
                   "process.executable.name": "postgres"}.items()): 1,
    }
    assert all(r.workload == AGENT for r in got)
    depth = [r for r in got if r.descriptor is SPANS_QUEUED]
    assert [(r.value, r.attributes) for r in depth] == [(7, {})]
    got.clear()
    metrics.report({}, 2)  # the queue's depth is an UpDownCounter: deltas add up to it
    assert [r.value for r in got] == [-5]
    got.clear()
    metrics.report({}, 2)
    assert got == []
    assert SPANS_QUEUED.monotonic is False and SPANS_DROPPED.monotonic is True


def test_drop_counter_cardinality_is_capped_with_an_overflow_series() -> None:
    workloads = [Workload(pid=p) for p in range(1, 11)]
    names = {w: {"service.name": f"svc{w.pid}"} for w in workloads}
    metrics = DeliveryMetrics(SPANS_DROPPED, SPANS_QUEUED, 3, _resolver(names))
    got: list[CounterDelta] = []
    metrics.sink = got.extend
    metrics.report({(QUEUE_FULL, w): 1 for w in workloads}, 0)
    metrics.report({(QUEUE_FULL, workloads[0]): 1, (QUEUE_FULL, OVERFLOW): 5}, 0)
    series: dict[frozenset[tuple[str, object]], int] = {}
    for r in got:
        key = frozenset(r.attributes.items())
        series[key] = series.get(key, 0) + r.value
    overflow = frozenset({"reason": QUEUE_FULL, "otel.metric.overflow": True}.items())
    assert len(series) == 4  # three workloads and the overflow series
    assert series[overflow] == 7 + 5
    assert series[frozenset({"reason": QUEUE_FULL, "service.name": "svc1"}.items())] == 2
    assert sum(series.values()) == 10 + 6


@pytest.mark.parametrize("text, expected", [("8MiB", 8 << 20), ("512KiB", 512 << 10),
                                            (65536, 65536), ("1GiB", 1 << 30)])
def test_queue_sizes_parse(text: object, expected: int) -> None:
    from otel_ebpf.config import QueueBound

    assert QueueBound(max_items=1, max_bytes=text).max_bytes == expected  # type: ignore[arg-type]
