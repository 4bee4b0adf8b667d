"""The metrics export loop: parts a collector refuses as too large go again smaller, what
never can go is counted, and only delivered series count as exported.

The collector here is a stand-in with a size limit that fails as the official gRPC
exporter does (its log line, FAILURE); tests/e2e/test_export_bounds.py does the same
against real collectors.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common._internal.metrics_encoder import encode_metrics
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.sdk.metrics.export import MetricExportResult, MetricsData

from otel_ebpf.aggregate import CumulativeStore, Series
from otel_ebpf.cardinality import OVERFLOW, SeriesLimit
from otel_ebpf.config import ExporterConfig
from otel_ebpf.enrich.identity import AGENT
from otel_ebpf.export.metrics_export import MetricsExport
from otel_ebpf.export.otlp import OtlpShipper
from otel_ebpf.export.split import request_size
from otel_ebpf.model import ExpHistogramDelta, Identity, MetricDescriptor, Workload
from tests.peers.otlp_sink import attrs_to_dict

DURATION = MetricDescriptor("linux.syscall.duration", "s", "durations")
GRPC_LOG = logging.getLogger("opentelemetry.exporter.otlp.proto.grpc.exporter")
HTTP_LOG = logging.getLogger("opentelemetry.exporter.otlp.proto.http.metric_exporter")


class Collector:
    """Takes requests up to `limit` bytes; refuses bigger ones as grpc-go does (or as an
    HTTP proxy does, saying no limit: `http`)."""

    def __init__(self, limit: int, http: bool = False) -> None:
        self.limit = limit
        self.http = http
        self.up = True
        self.requests: list[ExportMetricsServiceRequest] = []
        self.refused = 0

    def export(self, data: MetricsData, **_: Any) -> MetricExportResult:
        size = request_size(data)
        if not self.up:
            GRPC_LOG.error("Failed to export metrics to here, error code: "
                           "StatusCode.UNAVAILABLE, error details: connection refused")
            return MetricExportResult.FAILURE
        if size > self.limit and self.http:
            self.refused += 1
            HTTP_LOG.error("Failed to export metrics batch code: 413, reason: Payload Too "
                           "Large")
            return MetricExportResult.FAILURE
        if size > self.limit:
            self.refused += 1
            GRPC_LOG.error("Failed to export metrics to here, error code: StatusCode."
                           "RESOURCE_EXHAUSTED, error details: grpc: received message larger "
                           "than max (%d vs. %d)", size, self.limit)
            return MetricExportResult.FAILURE
        self.requests.append(encode_metrics(data))
        return MetricExportResult.SUCCESS

    def shutdown(self, **_: Any) -> None:
        pass

    def points(self, name: str) -> dict[tuple[Any, ...], Any]:
        """(pid, syscall) -> point of metric `name`; each must arrive once."""
        out: dict[tuple[Any, ...], Any] = {}
        for request in self.requests:
            for rm in request.resource_metrics:
                for m in (m for sm in rm.scope_metrics for m in sm.metrics if m.name == name):
                    for p in getattr(m, m.WhichOneof("data")).data_points:
                        key = tuple(sorted(attrs_to_dict(p.attributes).items()))
                        assert key not in out, f"{key} arrived twice"
                        out[key] = p
        return out


def identity_of(workload: Workload) -> Identity:
    if workload == AGENT:
        return Identity({"service.name": "otel-ebpf", "host.name": "h"})
    if workload == OVERFLOW:
        return Identity({"host.name": "h"})
    return Identity({"service.name": f"w{workload.pid}", "process.pid": workload.pid,
                     "host.name": "h"}, {"process.pid": workload.pid})


def fill(store: CumulativeStore, pids: range, buckets: int = 20, now: int = 1) -> None:
    store.add([ExpHistogramDelta(DURATION, Workload(pid, f"w{pid}"), {"call": f"c{c}"}, 2,
                                 -40, [1] * buckets, buckets, 0.1, 1e-6, 1e-3)
               for pid in pids for c in range(10)], 0, now)


def export(collector: Collector, store: CumulativeStore, **config: Any) -> MetricsExport:
    return MetricsExport(store, OtlpShipper(collector, "here"), lambda _: identity_of,
                         ExporterConfig(**config), 0)


def self_metric(store: CumulativeStore, name: str) -> dict[str, int]:
    return {str(next(iter(s.attributes.values()))): s.value for s in store.series()
            if s.descriptor.name == name}


def test_a_refused_request_goes_again_in_parts_and_later_ones_fit() -> None:
    store = CumulativeStore()
    fill(store, range(1, 201))  # 2,000 points, ~350 kB
    collector = Collector(limit=100_000)
    metrics = export(collector, store, max_request_bytes=1_000_000)
    assert metrics.export_once()
    assert collector.refused == 1
    assert metrics.max_bytes == 100_000 * 15 // 16  # the limit the refusal stated
    assert len(collector.points(DURATION.name)) == 2000
    assert all(r.ByteSize() <= 100_000 for r in collector.requests)
    assert all(s.exported_since_update for s in series_of(store))
    fill(store, range(1, 201), now=2)
    collector.requests.clear()
    assert metrics.export_once()
    assert collector.refused == 1  # no refusal: the parts were small enough at once
    points = collector.points(DURATION.name)
    assert {p.count for p in points.values()} == {40}  # cumulative: both rounds
    assert self_metric(store, "otel_ebpf.metrics.requests.split") == {
        "refused": 1, "max_request": 1}
    assert not self_metric(store, "otel_ebpf.metrics.dropped")


def test_a_collector_that_states_no_limit_gets_halves_until_they_fit() -> None:
    store = CumulativeStore()
    fill(store, range(1, 401))  # 4,000 points, ~700 kB
    collector = Collector(limit=100_000, http=True)
    metrics = export(collector, store)
    assert metrics.export_once()
    assert len(collector.points(DURATION.name)) == 4000
    # refused at ~700, ~350 and ~175 kB; the rest is cut under the bound learnt
    assert collector.refused == 3
    assert metrics.max_bytes < 100_000
    assert metrics.last_requests == collector.refused + len(collector.requests)


def test_a_refusal_that_is_no_size_limit_waits_for_the_next_export() -> None:
    """A bare RESOURCE_EXHAUSTED (a quota), or a refusal of a request smaller than any
    collector's limit: not cut further (that would only multiply the requests), nothing
    dropped, everything goes with the next export."""
    store = CumulativeStore()
    fill(store, range(1, 101))
    for collector in (Collector(limit=100), Collector(limit=0)):
        if collector.limit == 0:
            collector.export = lambda data, **_: (GRPC_LOG.error(  # type: ignore[method-assign]
                "Failed to export metrics to here, error code: StatusCode.RESOURCE_EXHAUSTED,"
                " error details: quota exceeded"), MetricExportResult.FAILURE)[1]
        metrics = export(collector, store, max_request_bytes=50_000)
        assert not metrics.export_once()
        assert metrics.last_requests <= 5
        assert not any(s.exported_since_update for s in series_of(store))
        assert not self_metric(store, "otel_ebpf.metrics.dropped")


def test_a_point_refused_alone_is_dropped_and_counted() -> None:
    store = CumulativeStore()
    fill(store, range(1, 3), buckets=30_000)  # ~30 kB a point
    fill(store, range(3, 5), buckets=2)
    collector = Collector(limit=20_000)
    metrics = export(collector, store)
    assert metrics.export_once()
    assert len(collector.points(DURATION.name)) == 20  # the small ones
    assert metrics.drops == {}  # counted into the store...
    assert self_metric(store, "otel_ebpf.metrics.dropped") == {"refused": 20}
    # ...and marked exported: sending them again would fail again
    assert all(s.exported_since_update for s in series_of(store))


def test_a_point_over_max_request_bytes_is_never_sent() -> None:
    store = CumulativeStore()
    fill(store, range(1, 2), buckets=20_000)  # ~20 kB a point
    fill(store, range(2, 3))
    collector = Collector(limit=10_000_000)
    assert export(collector, store, max_request_bytes=16_384).export_once()
    assert collector.refused == 0
    assert len(collector.points(DURATION.name)) == 10
    assert self_metric(store, "otel_ebpf.metrics.dropped") == {"too_large": 10}


def test_nothing_is_marked_exported_that_was_not_delivered() -> None:
    store = CumulativeStore()
    fill(store, range(1, 101))
    collector = Collector(limit=10_000_000)
    collector.up = False
    metrics = export(collector, store, max_request_bytes=50_000)
    assert not metrics.export_once()
    assert metrics.last_requests == 1  # the collector is down: the rest waits
    assert not any(s.exported_since_update for s in series_of(store))
    assert store.expire(lambda w: w.pid <= 0) == 0  # gone workloads keep their values
    fill(store, range(1, 101), now=2)
    collector.up = True
    assert metrics.export_once()
    assert {p.count for p in collector.points(DURATION.name).values()} == {40}
    assert all(s.exported_since_update for s in series_of(store))


def test_a_failure_part_way_keeps_the_delivered_parts_exported() -> None:
    store = CumulativeStore()
    fill(store, range(1, 101))
    collector = Collector(limit=10_000_000)
    metrics = export(collector, store, max_request_bytes=50_000)
    sent = 0
    real = collector.export

    def fail_after_two(data: MetricsData, **kw: Any) -> MetricExportResult:
        nonlocal sent
        sent += 1
        collector.up = sent <= 2
        return real(data, **kw)

    collector.export = fail_after_two  # type: ignore[method-assign]
    assert not metrics.export_once()
    exported = {s.workload.pid for s in series_of(store) if s.exported_since_update}
    delivered = {dict(k)["process.pid"] for k in collector.points(DURATION.name)}
    assert exported == delivered
    assert 0 < len(exported) < 100


@pytest.mark.parametrize("limit", [5, 1000])
def test_series_gauge_and_overflow_counter(limit: int) -> None:
    store = CumulativeStore(limit=SeriesLimit(limit))
    fill(store, range(1, 11))  # 100 series
    collector = Collector(limit=10_000_000)
    metrics = export(collector, store)
    assert metrics.export_once()
    assert metrics.export_once()  # self-metrics of the first export go with the next
    last = Collector(limit=10_000_000)
    metrics.shipper = OtlpShipper(last, "here")
    assert metrics.export_once()
    gauge = {dict((a.key, a.value.string_value) for a in p.attributes)["metric"]: p.as_int
             for p in last.points("otel_ebpf.metrics.series").values()}
    assert gauge[DURATION.name] == min(100, limit + 1)
    overflowed = self_metric(store, "otel_ebpf.metrics.overflowed")
    assert overflowed == ({DURATION.name: 100 - limit} if limit < 100 else {})


def series_of(store: CumulativeStore) -> list[Series]:
    return [s for s in store.series() if s.descriptor is DURATION]


@pytest.mark.parametrize(("message", "limit"), [
    # the OpenTelemetry Collector (grpc-go), as logged by the official gRPC exporter
    ("Failed to export metrics to 127.0.0.1:4317, error code: StatusCode.RESOURCE_EXHAUSTED, "
     "error details: grpc: received message larger than max (4884726 vs. 4194304)", 4194304),
    # rotel (tonic)
    ("Failed to export metrics to 127.0.0.1:4317, error code: StatusCode.OUT_OF_RANGE, error "
     "details: Error, decoded message length too large: found 4884726 bytes, the limit is: "
     "4194304 bytes", 4194304),
    # an HTTP proxy, as logged by the official HTTP exporter
    ("Failed to export metrics batch code: 413, reason: Request Entity Too Large", None),
])
def test_refusals_for_size_are_told_from_outages(message: str, limit: int | None) -> None:
    from otel_ebpf.export.otlp import Sent, refused_limit

    class Refusing(Collector):
        def export(self, data: MetricsData, **_: Any) -> MetricExportResult:
            GRPC_LOG.error(message)
            return MetricExportResult.FAILURE

    shipper = OtlpShipper(Refusing(0), "here")
    assert shipper.send(MetricsData([])) is Sent.TOO_LARGE
    assert refused_limit(shipper.refusal or "") == limit
    assert OtlpShipper(Collector(0), "here").send(MetricsData([])) is Sent.OK
    down = Collector(0)
    down.up = False
    assert OtlpShipper(down, "here").send(MetricsData([])) is Sent.FAILED
