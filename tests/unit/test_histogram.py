"""The kernel's bucketing, mirrored in Python, against hand-computed cases, and the
conversion of its histograms into OTLP exponential histogram data points."""

from __future__ import annotations

import array
import math
import random
import re
from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics

from otel_ebpf import histogram as h
from otel_ebpf.aggregate import CumulativeStore
from otel_ebpf.export.metrics import build_metrics_data
from otel_ebpf.model import ExpHistogramDelta, Identity, Workload
from otel_ebpf.probes import syscall_latency as probe

BPF_SOURCE = Path(__file__).parents[2] / "probes" / "exp_histogram.h"


@pytest.mark.parametrize(
    ("ns", "index"),
    [
        (1_000_000_000, -1),  # 1 s is the inclusive top of (2^-1/4, 2^0]
        (1_000_000_001, 0),  # just above 1 s opens bucket 0
        (2_000_000_000, 3),  # 2 s tops (2^3/4, 2^1]
        (20_000_000, -23),  # 20 ms in (2^-23/4, 2^-22/4] = (18.58 ms, 22.10 ms]
        (500_000_000, -5),  # 0.5 s = 2^-1, top of (2^-5/4, 2^-4/4]
        (1_500_000_000, 2),  # 1.5 s in (2^2/4, 2^3/4] = (1.414, 1.682]
        (1_000, -80),  # 1 us in (2^-80/4, 2^-79/4] = (0.954 us, 1.134 us]
    ],
)
def test_bucket_index_hand_computed(ns: int, index: int) -> None:
    assert h.duration_bucket_index(ns) == index
    assert h.bucket_lower_bound(index, 2) < ns / 1e9 <= h.bucket_upper_bound(index, 2) * (
        1 + 1e-12)


def test_bucket_index_matches_float_math_away_from_boundaries() -> None:
    rng = random.Random(7)
    checked = 0
    while checked < 5000:
        ns = int(10 ** rng.uniform(2, 11))
        exact = math.log2(ns / 1e9) * 4
        if abs(exact - round(exact)) < 1e-4:  # within fixed-point reach of a boundary
            continue
        assert h.duration_bucket_index(ns) == math.ceil(exact) - 1, ns
        checked += 1


def test_python_mirror_uses_the_kernel_constants() -> None:
    text = BPF_SOURCE.read_text()
    defines = dict(re.findall(r"#define (\w+) \(?(-?\d+)", text))
    assert int(defines["HIST_MIN_INDEX"]) == h.HIST_MIN_INDEX
    assert int(defines["HIST_BUCKETS"]) == h.HIST_BUCKETS
    assert int(defines["HIST_SCALE"]) == h.HIST_SCALE
    assert [int(defines[f"HIST_QUARTER_{j}"]) for j in (1, 2, 3)] == list(h._QUARTERS)
    for j, q in enumerate(h._QUARTERS, start=1):
        assert q == math.ceil(2 ** (j / 4) * 65536)


def packed(counts: list[int]) -> bytes:
    """Buckets as a kernel map value holds them: native u32s."""
    return array.array("I", counts).tobytes()


def test_trim_and_merge() -> None:
    assert h.trim(-104, packed([0, 0, 3, 0, 1, 0])) == (-102, [3, 0, 1])
    assert h.trim(5, packed([0, 0])) == (0, [])
    assert h.merge_into(-10, [1, 2], -12, [5]) == (-12, [5, 0, 1, 2])
    assert h.merge_into(0, [], 3, [1]) == (3, [1])


@pytest.mark.parametrize(("counts", "expected"), [
    ([7], (-104, [7])),
    ([256, 0, 0], (-104, [256])),            # zero bytes inside a count are not an end
    ([0, 0, 0, 1 << 24], (-101, [1 << 24])),
    ([1, 0, 65536, 1], (-104, [1, 0, 65536, 1])),
])
def test_trim_finds_the_populated_span_of_packed_counts(
        counts: list[int], expected: tuple[int, list[int]]) -> None:
    assert h.trim(-104, packed(counts)) == expected


def test_quantile_is_the_bucket_top_clamped_to_observed() -> None:
    # 99 values in bucket -23, one in bucket 0: p99 is bucket -23's top, p100 the max
    counts = [99] + [0] * 22 + [1]
    assert h.quantile(0.99, 2, -23, counts, 0.019, 1.0) == pytest.approx(2 ** (-22 / 4))
    assert h.quantile(1.0, 2, -23, counts, 0.019, 1.0) == 1.0


def delta(ns_values: list[int], pid: int = 42) -> ExpHistogramDelta:
    slots = [0] * h.HIST_BUCKETS
    for ns in ns_values:
        slots[h.duration_bucket_index(ns) - h.HIST_MIN_INDEX] += 1
    offset, counts = h.trim(h.HIST_MIN_INDEX, packed(slots))
    return ExpHistogramDelta(probe.SYSCALL_DURATION, Workload(pid, "app"),
                             {"linux.syscall.name": "read"}, 2, offset, counts,
                             len(ns_values), sum(ns_values) / 1e9, min(ns_values) / 1e9,
                             max(ns_values) / 1e9)


def test_deltas_fold_into_one_cumulative_otlp_point() -> None:
    store = CumulativeStore()
    store.add([delta([20_000_000] * 3)], start_ns=111, now_ns=200)
    store.add([delta([1_000_000_000, 1_000])], start_ns=111, now_ns=300)
    resource = {"process.pid": 42, "process.executable.name": "app", "host.name": "h"}
    point = {"process.pid": 42, "process.executable.name": "app"}
    request = encode_metrics(build_metrics_data(
        store.series(), lambda w: Identity(resource, point), now_ns=400))

    (rm,) = request.resource_metrics
    assert {kv.key for kv in rm.resource.attributes} == set(resource)
    (metric,) = rm.scope_metrics[0].metrics
    assert (metric.name, metric.unit) == ("linux.syscall.duration", "s")
    (point,) = metric.exponential_histogram.data_points
    assert metric.exponential_histogram.aggregation_temporality == 2  # cumulative
    assert (point.start_time_unix_nano, point.time_unix_nano) == (111, 400)
    assert point.scale == 2 and point.zero_count == 0
    assert point.count == 5
    assert point.sum == pytest.approx(0.06 + 1.0 + 1e-6)
    assert (point.min, point.max) == (pytest.approx(1e-6), pytest.approx(1.0))
    # 1 us at index -80, 20 ms (x3) at -23, 1 s at -1: one span from -80 to -1
    assert point.positive.offset == -80
    counts = list(point.positive.bucket_counts)
    assert len(counts) == 80
    assert (counts[0], counts[-23 + 80], counts[-1]) == (1, 3, 1)
    assert sum(counts) == 5
    attrs = {kv.key: kv.value for kv in point.attributes}
    assert attrs["linux.syscall.name"].string_value == "read"
    assert attrs["process.pid"].int_value == 42
    assert attrs["process.executable.name"].string_value == "app"


def test_store_expires_gone_workloads_only_after_export() -> None:
    store = CumulativeStore()
    store.add([delta([1000], pid=7)], 0, 1)
    assert store.expire(lambda w: False) == 0  # not exported yet: keep its last values
    store.mark_exported(store.series())
    assert store.expire(lambda w: True) == 0
    assert store.expire(lambda w: False) == 1
    assert len(store) == 0


def test_store_retires_a_gone_series_then_forgets_it_after_the_quiet_time() -> None:
    store = CumulativeStore()
    store.add([delta([1000], pid=7)], 0, 100)
    store.mark_exported(store.series())
    assert store.expire(lambda w: False, now_ns=150, quiet_ns=100) == 0
    assert store.series() == []  # retired: its last values went out, not sent again
    # a late delta of the gone process (its socket still retransmits): the same series
    # comes back, cumulative from the same start
    store.add([delta([1000], pid=7)], 0, 160)
    (series,) = store.series()
    assert (series.count, series.start_ns) == (2, 0)
    store.mark_exported([series])
    assert store.expire(lambda w: False, now_ns=259, quiet_ns=100) == 0
    assert store.expire(lambda w: False, now_ns=260, quiet_ns=100) == 1
    assert len(store) == 0


def workload_delta(ns_values: list[int], pid: int = 0) -> ExpHistogramDelta:
    """A delta of an aggregated workload (pid 0: cgroup 9's "app")."""
    record = delta(ns_values)
    record.workload = Workload(pid, "app", cgroup_id=9)
    return record


def test_an_aggregated_workloads_quiet_series_is_forgotten_and_comes_back_afresh() -> None:
    """Its cgroup lives on (alive says so), yet once exported and quiet for the quiet
    time the series goes; counted again, it is a new series from zero whose start is the
    window its first delta covers, after the old series' last point: no value of one
    series ever goes down."""
    store = CumulativeStore()
    store.add([workload_delta([1000, 2000])], 0, 100)
    store.mark_exported(store.series())
    assert store.expire(lambda w: True, now_ns=150, quiet_ns=100) == 0  # not quiet yet
    assert len(store.series()) == 1  # still exported while quiet
    store.add([workload_delta([1000])], 0, 160)  # a delta: quiet again from 160
    store.mark_exported(store.series())
    assert store.expire(lambda w: True, now_ns=259, quiet_ns=100) == 0
    assert store.expire(lambda w: True, now_ns=260, quiet_ns=100) == 1
    assert len(store) == 0
    store.add([workload_delta([5000])], 300, 400)  # counted again, since 300
    (series,) = store.series()
    assert (series.count, series.start_ns) == (1, 300)


def test_a_process_and_the_agents_own_series_stay_while_they_live() -> None:
    store = CumulativeStore()
    store.add([delta([1000], pid=7), delta([1000], pid=-1), delta([1000], pid=-2)], 0, 100)
    store.mark_exported(store.series())
    assert store.expire(lambda w: True, now_ns=10**12, quiet_ns=100) == 0
    assert len(store.series()) == 3


def test_a_gone_cgroups_series_is_retired_at_once_and_forgotten_after_the_quiet_time(
) -> None:
    store = CumulativeStore()
    store.add([workload_delta([1000])], 0, 100)
    store.mark_exported(store.series())
    assert store.expire(lambda w: False, now_ns=110, quiet_ns=100) == 0
    assert store.series() == []  # retired: its last values went out
    assert store.expire(lambda w: False, now_ns=200, quiet_ns=100) == 1


def test_a_full_store_forgets_retired_series_before_refusing_live_ones() -> None:
    store = CumulativeStore(max_series=2)
    store.add([delta([1000], pid=1), delta([1000], pid=2)], 0, 1)
    store.mark_exported(store.series())
    store.expire(lambda w: w.pid != 1, now_ns=2, quiet_ns=100)  # pid 1 gone: retired
    store.add([delta([1000], pid=3)], 0, 3)
    assert store.dropped_series == 0
    assert sorted(s.workload.pid for s in store.series()) == [2, 3]


def test_store_asks_once_per_workload_whether_it_lives() -> None:
    store = CumulativeStore()
    store.add([delta([1000], pid=7), delta([2000], pid=7), delta([1000], pid=8)], 0, 1)
    store.mark_exported(store.series())
    asked: list[int] = []
    store.expire(lambda w: asked.append(w.pid) or True)
    assert sorted(asked) == [7, 8]


def test_store_keeps_a_series_changed_after_its_export_was_taken() -> None:
    store = CumulativeStore()
    store.add([delta([1000], pid=7)], 0, 1)
    exported = store.series()
    store.add([delta([1000], pid=7)], 0, 2)  # the process's last counts, not yet sent
    store.mark_exported(exported)
    assert store.expire(lambda w: False) == 0
    assert store.series()[0].count == 2
    assert exported[0].count == 1  # the copy did not move with the store


def test_store_bounds_its_series() -> None:
    store = CumulativeStore(max_series=2)
    store.add([delta([1000], pid=p) for p in (1, 2, 3)], 0, 1)
    assert len(store) == 2 and store.dropped_series == 1
