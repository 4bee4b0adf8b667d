"""Prove the e2e peers work: official OTLP exporters -> rotel -> OtlpSink.

Metrics are built by hand from the SDK's export data classes and handed straight to
``exporter.export()`` so every field (notably exponential-histogram buckets) is exactly
what we chose, independent of SDK aggregation.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest
import requests
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
    OTLPMetricExporter as HttpOTLPMetricExporter,
)
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.profiles.v1development import (
    profiles_service_pb2,
    profiles_service_pb2_grpc,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Buckets,
    ExponentialHistogram,
    ExponentialHistogramDataPoint,
    Metric,
    MetricExportResult,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from tests.peers.otlp_sink import OtlpSink, attrs_to_dict
from tests.peers.rotel import RotelCollector

pytestmark = pytest.mark.e2e

RESOURCE = Resource({"service.name": "otel-ebpf-test", "host.name": "peer-test"})
SCOPE = InstrumentationScope("otel_ebpf.tests", "0.1.0")
DELTA = AggregationTemporality.DELTA
CUMULATIVE = AggregationTemporality.CUMULATIVE
WAIT = 5.0


def _metrics(*metrics: Metric) -> MetricsData:
    scope = ScopeMetrics(scope=SCOPE, metrics=list(metrics), schema_url="")
    return MetricsData([ResourceMetrics(resource=RESOURCE, scope_metrics=[scope], schema_url="")])


def _now() -> tuple[int, int]:
    end = time.time_ns()
    return end - 1_000_000_000, end


def _sum(name: str, value: int, attrs: dict[str, str]) -> Metric:
    start, end = _now()
    point = NumberDataPoint(attrs, start_time_unix_nano=start, time_unix_nano=end, value=value)
    data = Sum([point], aggregation_temporality=CUMULATIVE, is_monotonic=True)
    return Metric(name=name, description="test counter", unit="{call}", data=data)


def _syscall_duration() -> Metric:
    """An exponential histogram shaped like the product's ``linux.syscall.duration``."""
    start, end = _now()
    point = ExponentialHistogramDataPoint(
        attributes={"syscall": "read", "process.pid": 42}, start_time_unix_nano=start,
        time_unix_nano=end, count=10, sum=0.0123, scale=2, zero_count=1,
        positive=Buckets(offset=-40, bucket_counts=[1, 0, 3, 5]),
        negative=Buckets(offset=0, bucket_counts=[]), flags=0, min=0.0001, max=0.004,
    )  # fmt: skip
    data = ExponentialHistogram([point], aggregation_temporality=DELTA)
    return Metric(name="linux.syscall.duration", description="syscall latency", unit="s", data=data)


def _assert_sum_arrived(sink: OtlpSink, name: str, value: int, attrs: dict[str, str]) -> None:
    assert sink.wait_for(lambda: sink.metrics_points(name), WAIT), sink.metric_names()
    resource, point = sink.metrics_points(name)[0]
    assert resource["service.name"] == "otel-ebpf-test"
    assert attrs_to_dict(point.attributes) == attrs
    assert point.as_int == value


def test_metrics_over_grpc_including_exponential_histogram(
    rotel: RotelCollector, otlp_sink: OtlpSink
) -> None:
    exporter = OTLPMetricExporter(endpoint=rotel.grpc_endpoint, insecure=True, timeout=5)
    data = _metrics(_sum("peer.grpc.calls", 7, {"path": "grpc"}), _syscall_duration())
    try:
        assert exporter.export(data) is MetricExportResult.SUCCESS
    finally:
        exporter.shutdown()
    _assert_sum_arrived(otlp_sink, "peer.grpc.calls", 7, {"path": "grpc"})

    assert otlp_sink.wait_for(lambda: otlp_sink.metrics_points("linux.syscall.duration"), WAIT)
    [(_, hist)] = otlp_sink.metrics_points("linux.syscall.duration")
    assert attrs_to_dict(hist.attributes) == {"syscall": "read", "process.pid": 42}
    assert (hist.scale, hist.count, hist.zero_count) == (2, 10, 1)
    assert (hist.sum, hist.min, hist.max) == (0.0123, 0.0001, 0.004)
    assert hist.positive.offset == -40
    assert list(hist.positive.bucket_counts) == [1, 0, 3, 5]
    assert list(hist.negative.bucket_counts) == []
    metric = next(
        m
        for req in otlp_sink.metrics_requests
        for rm in req.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "linux.syscall.duration"
    )
    assert metric.unit == "s"
    assert metric.exponential_histogram.aggregation_temporality == DELTA.value


def test_metrics_over_http_protobuf(rotel: RotelCollector, otlp_sink: OtlpSink) -> None:
    session = requests.Session()
    session.trust_env = False  # never route loopback traffic through an env-configured proxy
    exporter = HttpOTLPMetricExporter(
        endpoint=f"{rotel.http_endpoint}/v1/metrics", timeout=5, session=session
    )
    try:
        assert exporter.export(_metrics(_sum("peer.http.calls", 3, {"path": "http"}))) is (
            MetricExportResult.SUCCESS
        )
    finally:
        exporter.shutdown()
    _assert_sum_arrived(otlp_sink, "peer.http.calls", 3, {"path": "http"})


def test_span_over_grpc(rotel: RotelCollector, otlp_sink: OtlpSink) -> None:
    provider = TracerProvider(resource=RESOURCE)
    provider.add_span_processor(
        SimpleSpanProcessor(OTLPSpanExporter(endpoint=rotel.grpc_endpoint, insecure=True))
    )
    try:
        with provider.get_tracer("otel_ebpf.tests").start_as_current_span("peer-span") as span:
            span.set_attribute("tcp.retransmits", 2)
    finally:
        provider.shutdown()
    assert otlp_sink.wait_for(lambda: otlp_sink.spans("peer-span"), WAIT)
    [(resource, received)] = otlp_sink.spans("peer-span")
    assert resource["host.name"] == "peer-test"
    assert attrs_to_dict(received.attributes) == {"tcp.retransmits": 2}


def test_logs_over_http_protobuf(rotel: RotelCollector, otlp_sink: OtlpSink) -> None:
    request = ExportLogsServiceRequest()
    record = request.resource_logs.add().scope_logs.add().log_records.add()
    record.body.string_value = "peer log"
    session = requests.Session()
    session.trust_env = False
    response = session.post(
        f"{rotel.http_endpoint}/v1/logs",
        data=request.SerializeToString(),
        headers={"Content-Type": "application/x-protobuf"},
        timeout=5,
    )
    assert response.status_code == 200, response.text
    assert otlp_sink.wait_for(lambda: otlp_sink.logs_requests, WAIT)
    [received] = otlp_sink.logs_requests
    assert received.resource_logs[0].scope_logs[0].log_records[0].body.string_value == "peer log"


def test_rotel_redelivers_after_sink_restart(rotel: RotelCollector, otlp_sink: OtlpSink) -> None:
    port = otlp_sink.port
    otlp_sink.stop()
    exporter = OTLPMetricExporter(endpoint=rotel.grpc_endpoint, insecure=True, timeout=5)
    try:  # rotel accepts (and buffers) even while its downstream is unreachable
        assert exporter.export(_metrics(_sum("peer.retry", 1, {}))) is MetricExportResult.SUCCESS
    finally:
        exporter.shutdown()
    otlp_sink.start(port)
    arrived = otlp_sink.wait_for(lambda: otlp_sink.metrics_points("peer.retry"), WAIT)
    assert arrived, rotel.read_log()


def test_rotel_rejects_profiles_as_unimplemented(rotel: RotelCollector) -> None:
    with grpc.insecure_channel(rotel.grpc_endpoint.removeprefix("http://")) as channel:
        stub = profiles_service_pb2_grpc.ProfilesServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Export(profiles_service_pb2.ExportProfilesServiceRequest(), timeout=5)
    assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED


def test_sink_accepts_profiles_directly(otlp_sink: OtlpSink) -> None:
    request = profiles_service_pb2.ExportProfilesServiceRequest()
    resource = request.resource_profiles.add().resource
    resource.attributes.add(key="host.name").value.string_value = "peer-test"
    with grpc.insecure_channel(otlp_sink.address) as channel:
        stub = profiles_service_pb2_grpc.ProfilesServiceStub(channel)
        stub.Export(request, timeout=5)
    [received] = otlp_sink.profiles_requests
    assert attrs_to_dict(received.resource_profiles[0].resource.attributes) == {
        "host.name": "peer-test"
    }


def test_attrs_to_dict_decodes_every_value_kind() -> None:
    def kv(key: str, **value: Any) -> KeyValue:
        return KeyValue(key=key, value=AnyValue(**value))

    array = ArrayValue(values=[AnyValue(string_value="p"), AnyValue(int_value=2)])
    nested = KeyValueList(values=[kv("inner", bool_value=False)])
    attrs = [
        kv("s", string_value="x"), kv("i", int_value=3), kv("d", double_value=1.5),
        kv("b", bool_value=True), kv("y", bytes_value=b"\x00\x01"), kv("a", array_value=array),
        kv("k", kvlist_value=nested), kv("unset"),
    ]  # fmt: skip
    assert attrs_to_dict(attrs) == {
        "s": "x", "i": 3, "d": 1.5, "b": True, "y": b"\x00\x01", "a": ["p", 2],
        "k": {"inner": False}, "unset": None,
    }  # fmt: skip
