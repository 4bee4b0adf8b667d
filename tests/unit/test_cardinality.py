"""The series cap: past a metric's limit, new series fold into one overflow series whose
sums and histograms stay exact; admission is stable; what folds is counted."""

from __future__ import annotations

import random
from collections.abc import Iterable

import pytest

from otel_ebpf.aggregate import CumulativeStore, Series
from otel_ebpf.cardinality import OVERFLOW, OVERFLOW_ATTRIBUTES, SeriesLimit
from otel_ebpf.export.metrics import build_metrics_data
from otel_ebpf.model import CounterDelta, ExpHistogramDelta, Identity, MetricDescriptor, Workload

CALLS = MetricDescriptor("calls", "{call}", "calls")
OTHER = MetricDescriptor("other", "{call}", "other calls")
DURATION = MetricDescriptor("duration", "s", "durations")


def w(pid: int) -> Workload:
    return Workload(pid, f"p{pid}", 0)


def calls(pid: int, n: int, descriptor: MetricDescriptor = CALLS) -> CounterDelta:
    return CounterDelta(descriptor, w(pid), {"call": "read"}, n)


def durations(pid: int, offset: int, buckets: list[int], lo: float, hi: float
              ) -> ExpHistogramDelta:
    return ExpHistogramDelta(DURATION, w(pid), {"call": "read"}, 2, offset, buckets,
                             sum(buckets), 0.25 * sum(buckets), lo, hi)


def by_pid(series: Iterable[Series], name: str = "calls") -> dict[int, Series]:
    return {s.workload.pid: s for s in series if s.descriptor.name == name}


def store_with(limit: int) -> CumulativeStore:
    return CumulativeStore(limit=SeriesLimit(limit))


def test_past_the_limit_series_fold_into_one_overflow_series_with_exact_sums() -> None:
    store = store_with(3)
    total = 0
    for round_ in range(1, 6):
        store.add([calls(pid, pid * round_) for pid in range(1, 9)], 100, 100 + round_)
        total += sum(pid * round_ for pid in range(1, 9))
    series = by_pid(store.series())
    assert sorted(series) == [OVERFLOW.pid, 1, 2, 3]  # first come, first admitted
    overflow = series[OVERFLOW.pid]
    assert overflow.attributes == OVERFLOW_ATTRIBUTES
    assert overflow.start_ns == 100
    assert overflow.value == sum(pid * r for pid in range(4, 9) for r in range(1, 6))
    assert sum(s.value for s in series.values()) == total
    # counted: every delta that folded, by metric
    assert store.take_overflowed() == {"calls": 5 * 5}
    assert store.take_overflowed() == {}


def test_the_limit_is_per_metric_and_can_be_set_per_metric() -> None:
    store = CumulativeStore(limit=SeriesLimit(2, per_metric={"other": 4}))
    store.add([calls(pid, 1) for pid in range(1, 7)]
              + [calls(pid, 1, OTHER) for pid in range(1, 7)], 0, 1)
    assert sorted(by_pid(store.series(), "calls")) == [OVERFLOW.pid, 1, 2]
    assert sorted(by_pid(store.series(), "other")) == [OVERFLOW.pid, 1, 2, 3, 4]


def test_overflow_histograms_merge_exactly() -> None:
    store = store_with(1)
    store.add([durations(1, 0, [1, 1], 1.0, 2.0),
               durations(2, -3, [2, 0, 0, 0, 5], 0.1, 3.0),
               durations(3, 2, [7], 2.5, 2.6)], 0, 1)
    store.add([durations(2, 4, [1], 9.0, 9.0)], 0, 2)
    overflow = by_pid(store.series(), "duration")[OVERFLOW.pid]
    assert overflow.scale == 2
    # buckets -3..4 of pid 2 and 3 merged: 2 at -3, 5 at 1, 7 at 2, 1 at 4
    assert (overflow.offset, overflow.bucket_counts) == (-3, [2, 0, 0, 0, 5, 7, 0, 1])
    assert overflow.count == 2 + 5 + 7 + 1
    assert overflow.sum == 0.25 * (2 + 5 + 7 + 1)
    assert (overflow.min, overflow.max) == (0.1, 9.0)


def test_admission_is_stable() -> None:
    store = store_with(2)
    store.add([calls(1, 1), calls(2, 1), calls(3, 1)], 0, 1)  # 3 folds
    alive = {1, 2, 3, 4}

    def is_alive(workload: Workload) -> bool:
        return workload.pid <= 0 or workload.pid in alive

    for t in range(2, 6):  # admitted ones stay admitted however the deltas come
        store.add([calls(3, 10), calls(2, 1), calls(1, 1)], 0, t)
        store.mark_exported(store.series())
        store.expire(is_alive, t, 0)
    assert sorted(by_pid(store.series())) == [OVERFLOW.pid, 1, 2]
    # pid 1 ends: once exported its slot is free, and goes to a new series, not to 3,
    # which keeps folding while it lives
    alive.discard(1)
    store.mark_exported(store.series())
    assert store.expire(is_alive, 10, 0) == 1
    store.add([calls(3, 10), calls(4, 1)], 0, 11)
    series = by_pid(store.series())
    assert sorted(series) == [OVERFLOW.pid, 2, 4]
    assert series[OVERFLOW.pid].value == 1 + 4 * 10 + 10
    # 3 ends too: forgotten after its quiet time, a new 3 is a new series
    alive.discard(3)
    alive.discard(4)
    store.mark_exported(store.series())
    store.expire(is_alive, 20, 5)
    alive.add(3)
    store.add([calls(3, 5)], 0, 21)
    assert by_pid(store.series())[3].value == 5


def test_a_retired_series_revived_past_the_limit_folds() -> None:
    """The cap is hard: a late delta for a retired series (its workload gone, its slot
    given away) goes to the overflow series."""
    store = store_with(1)
    store.add([calls(1, 1)], 0, 1)
    store.mark_exported(store.series())
    store.expire(lambda wl: wl.pid != 1, 1, 60)  # gone, quiet time not over: retired
    store.add([calls(2, 1)], 0, 2)
    store.add([calls(1, 7)], 0, 3)  # the kernel still counted for it
    series = by_pid(store.series())
    assert sorted(series) == [OVERFLOW.pid, 2]
    assert series[OVERFLOW.pid].value == 7


def test_exported_series_never_exceed_the_limit_plus_overflow() -> None:
    store = store_with(50)
    store.add([calls(pid, 1) for pid in range(1, 1001)]
              + [durations(pid, 0, [1], 1.0, 1.0) for pid in range(1, 1001)], 0, 1)
    data = build_metrics_data(store.series(), lambda wl: Identity(
        {"host.name": "h"} if wl == OVERFLOW else {"process.pid": wl.pid, "host.name": "h"}))
    per_metric: dict[str, int] = {}
    for rm in data.resource_metrics:
        for m in rm.scope_metrics[0].metrics:
            per_metric[m.name] = per_metric.get(m.name, 0) + len(m.data.data_points)
    assert per_metric == {"calls": 51, "duration": 51}
    assert sum(s.value for s in store.series() if s.descriptor is CALLS) == 1000
    assert sum(s.count for s in store.series() if s.descriptor is DURATION) == 1000


def test_exemplars_of_folded_series_go_to_the_overflow_series() -> None:
    from opentelemetry.sdk.metrics._internal.exemplar import Exemplar

    store = CumulativeStore(limit=SeriesLimit(1), exemplars_per_series=2)
    store.add([durations(1, 0, [1], 1.0, 1.0), durations(2, 0, [1], 1.0, 1.0)], 0, 1)
    store.add_exemplar("duration", w(2), {"call": "read"},
                       Exemplar({}, 1.0, 5, span_id=1, trace_id=2))
    overflow = by_pid(store.series(), "duration")[OVERFLOW.pid]
    assert [e.time_unix_nano for e in store.exemplars_of(overflow)] == [5]


def test_folded_series_are_forgotten_with_their_workload() -> None:
    limit = SeriesLimit(1, max_tracked=3)
    store = CumulativeStore(limit=limit)
    store.add([calls(pid, 1) for pid in range(1, 10)], 0, 1)
    assert sum(limit.folded_series().values()) == 3  # tracked at most
    store.expire(lambda wl: wl.pid <= 0, 5, 0)
    assert not limit.folded_series()
    assert store.take_overflowed() == {"calls": 8}


@pytest.mark.parametrize("quiet_ns", [0, 3, 10**9])
def test_under_churn_the_cap_holds_and_totals_stay_exact(quiet_ns: int) -> None:
    """Processes come and go (as on the issue's busy node), their series are retired and
    forgotten: at every export the metric has at most limit + 1 series, the cap counts
    exactly the series exported, and no count is lost while no series is forgotten."""
    rng = random.Random(7)
    limit = SeriesLimit(20)
    store = CumulativeStore(limit=limit)
    alive: set[int] = set()
    sent = 0
    next_pid = 1
    for t in range(1, 200):
        alive.update(range(next_pid, next_pid + 5))
        next_pid += 5
        for pid in rng.sample(sorted(alive), min(len(alive), 8)):
            alive.discard(pid)
        deltas = [calls(pid, rng.randint(1, 9)) for pid in sorted(alive)]
        deltas += [calls(rng.randint(1, next_pid), 1)]  # a late delta, maybe of a gone one
        sent += sum(d.value for d in deltas)
        store.add(deltas, 0, t)
        exported = store.series()
        own = [s for s in exported if s.workload != OVERFLOW]
        assert len(own) == limit.live("calls") <= 20
        assert len(exported) <= 21
        store.mark_exported(exported)
        store.expire(lambda wl: wl.pid <= 0 or wl.pid in alive, t, quiet_ns)
    if quiet_ns < 10**9:
        return  # forgotten series took their last values with them (they were exported)
    assert sum(s.value for s in store.series()) + sum(
        s.value for s in store._series.values() if s.retired) == sent


def test_the_overflow_series_is_on_the_hosts_resource() -> None:
    from otel_ebpf.config import Config
    from otel_ebpf.enrich.identity import IdentityResolver

    host = {"host.name": "node-1", "host.id": "abc", "os.type": "linux"}
    resolver = IdentityResolver(Config(resource_attributes={"deployment.environment": "x"}),
                                host)
    assert resolver.identify(OVERFLOW) == Identity({**host, "deployment.environment": "x"})
