"""Splitting one metrics export into requests a collector accepts: every request under the
bounds as serialized, every data point in exactly one request (or reported), in order."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common._internal.metrics_encoder import encode_metrics
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Buckets,
    ExponentialHistogram,
    ExponentialHistogramDataPoint,
    Gauge,
    Metric,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from otel_ebpf.export.split import count_points, request_size, split_metrics

CUMULATIVE = AggregationTemporality.CUMULATIVE
SCOPE_A = InstrumentationScope("a", "1")
SCOPE_B = InstrumentationScope("b", "2")


def counter(i: int) -> NumberDataPoint:
    return NumberDataPoint({"i": i, "k": "v" * (i % 7)}, 1, 2, i)


def histogram(i: int, buckets: int = 20) -> ExponentialHistogramDataPoint:
    return ExponentialHistogramDataPoint(
        attributes={"i": i, "linux.syscall.name": f"call{i % 13}"}, start_time_unix_nano=1,
        time_unix_nano=2, count=buckets, sum=0.5, scale=2, zero_count=0,
        positive=Buckets(offset=-100, bucket_counts=[1] * buckets),
        negative=Buckets(offset=0, bucket_counts=[]), flags=0, min=1e-7, max=1e-3)


def metrics(n_resources: int = 30, points: int = 40) -> MetricsData:
    """Resources of several scopes and every kind of metric this agent exports; the
    attribute i numbers every data point."""
    i = 0

    def next_points(make: Any) -> list[Any]:
        nonlocal i
        made = [make(i + k) for k in range(points)]
        i += points
        return made

    resources = []
    for r in range(n_resources):
        sums = Metric("calls", "d", "{call}", Sum(next_points(counter), CUMULATIVE, True))
        hists = Metric("duration", "d", "s",
                       ExponentialHistogram(next_points(histogram), CUMULATIVE))
        gauge = Metric("series", "d", "{series}", Gauge(next_points(counter)))
        resources.append(ResourceMetrics(
            Resource({"service.name": f"svc{r}", "process.pid": r, "host.name": "h"}),
            [ScopeMetrics(SCOPE_A, [sums, hists], ""), ScopeMetrics(SCOPE_B, [gauge], "")],
            ""))
    return MetricsData(resources)


def wire_points(data: MetricsData) -> list[tuple[str, str, str, int]]:
    """(service, scope, metric, i) of every point, as a collector decodes the request."""
    out = []
    for rm in encode_metrics(data).resource_metrics:
        service = next(a.value.string_value for a in rm.resource.attributes
                       if a.key == "service.name")
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                for p in getattr(m, m.WhichOneof("data")).data_points:
                    i = next(a.value.int_value for a in p.attributes if a.key == "i")
                    out.append((service, sm.scope.name, m.name, i))
    return out


@pytest.mark.parametrize(("max_bytes", "max_points"), [
    (200_000, 100_000), (50_000, 100_000), (4_096, 100_000), (1_000, 100_000),
    (1_000_000, 500), (20_000, 77), (1_000_000, 1)])
def test_every_request_under_the_bounds_and_every_point_once(max_bytes: int,
                                                              max_points: int) -> None:
    data = metrics()
    whole = wire_points(data)
    split = split_metrics(data, max_bytes, max_points)
    assert not split.oversized
    assert len(split.parts) == len(split.sizes) > 1
    delivered = []
    for part, bound in zip(split.parts, split.sizes, strict=True):
        size = request_size(part)
        assert size <= bound <= max_bytes  # the bound counted is never an underestimate
        assert count_points(part) <= max_points
        delivered += wire_points(part)
    assert delivered == whole  # each point exactly once, in order
    assert len(whole) == 30 * 3 * 40


def test_parts_are_packed_not_cut_at_every_metric() -> None:
    data = metrics()
    total = request_size(data)
    split = split_metrics(data, 100_000, 100_000)
    # resource, scope and metric headers repeat in each part: a few per cent at most
    assert len(split.parts) <= total // 100_000 + 2
    assert all(size > 90_000 for size in split.sizes[:-1])


def test_an_export_that_fits_is_sent_as_it_is() -> None:
    data = metrics(2, 3)
    split = split_metrics(data, 1_000_000, 8192)
    assert split.parts == [data]
    assert split.parts[0] is data
    assert request_size(data) <= split.sizes[0] <= 1_000_000  # not encoded: bounded


def test_a_point_over_the_bound_alone_is_reported_not_looped_on() -> None:
    big = histogram(10_000, buckets=5000)
    data = MetricsData([ResourceMetrics(
        Resource({"service.name": "svc"}),
        [ScopeMetrics(SCOPE_A, [
            Metric("calls", "d", "{call}", Sum([counter(1), counter(2)], CUMULATIVE, True)),
            Metric("duration", "d", "s", ExponentialHistogram([histogram(3), big, histogram(4)],
                                                               CUMULATIVE))], "")],
        "")])
    split = split_metrics(data, 4_096, 8192)
    assert [wire_points(p) for p, _ in split.oversized] == [[("svc", "a", "duration", 10_000)]]
    alone = split.oversized[0][1]
    assert alone > 4_096
    assert request_size(split.oversized[0][0]) <= alone
    assert [p for part in split.parts for p in wire_points(part)] == [
        ("svc", "a", "calls", 1), ("svc", "a", "calls", 2), ("svc", "a", "duration", 3),
        ("svc", "a", "duration", 4)]


def test_a_12000_point_export_of_syscall_histograms() -> None:
    """The issue's busy node: 600 processes x 20 syscalls, each process its own resource
    (as the agent exports them), at the default bounds."""
    resources = []
    for pid in range(600):
        points = [histogram(pid * 20 + k, buckets=30) for k in range(20)]
        resources.append(ResourceMetrics(
            Resource({"service.name": f"worker{pid}", "process.pid": pid,
                      "process.executable.name": f"worker{pid}",
                      "process.executable.path": f"/usr/bin/worker{pid}",
                      "host.name": "node-1", "host.id": "0123456789abcdef" * 2,
                      "host.arch": "amd64", "os.type": "linux", "os.version": "6.18.0"}),
            [ScopeMetrics(SCOPE_A, [Metric("linux.syscall.duration", "d", "s",
                                           ExponentialHistogram(points, CUMULATIVE))], "")],
            ""))
    data = MetricsData(resources)
    split = split_metrics(data, 4_000_000, 8192)
    assert [count_points(p) for p in split.parts] == [8192, 12_000 - 8192]
    assert all(request_size(p) <= 4_000_000 for p in split.parts)
    small = split_metrics(data, 1_000_000, 8192)
    assert len(small.parts) == -(-request_size(data) // 1_000_000)
