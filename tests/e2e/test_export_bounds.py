"""A busy node's metrics reach real collectors whole: an export that would exceed the
4 MiB a collector's OTLP gRPC receiver takes goes in requests it accepts, every series
arrives exactly once with exact values, and the series cap folds the rest exactly.

Series are synthesized through the daemon's store and export path (MetricsExport, the
official OTLP exporter) for thousands of workloads, as the issue's 200 short-lived
processes a second leave them; the peers are the OpenTelemetry Collector (v0.157.0, gRPC
max_recv_msg_size_mib 4 by default) and rotel in front of a recording sink.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.common._internal.metrics_encoder import encode_metrics
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2_grpc import (
    MetricsServiceStub,
)

from otel_ebpf.aggregate import CumulativeStore
from otel_ebpf.cardinality import OVERFLOW, SeriesLimit
from otel_ebpf.config import ExporterConfig
from otel_ebpf.enrich.identity import AGENT
from otel_ebpf.export.metrics import build_metrics_data
from otel_ebpf.export.metrics_export import MetricsExport
from otel_ebpf.export.otlp import OtlpShipper, make_otlp_exporter
from otel_ebpf.export.split import count_points, request_size
from otel_ebpf.model import CounterDelta, ExpHistogramDelta, Identity, MetricDescriptor, Workload
from tests.peers.otelcol import OtelCollector
from tests.peers.otlp_sink import OtlpSink, attrs_to_dict
from tests.peers.rotel import RotelCollector

pytestmark = pytest.mark.e2e

DURATION = MetricDescriptor("linux.syscall.duration", "s", "Duration of syscalls.")
RETRANSMITS = MetricDescriptor("linux.tcp.retransmits", "{segment}", "Retransmitted segments.")
SYSCALLS = ("read", "write", "openat", "close", "mmap", "futex", "epoll_wait", "recvfrom",
            "sendto", "fstat")
WORKLOADS = 2000  # x 10 syscalls: 20,000 series
FOUR_MIB = 4 * 1024 * 1024
WAIT = 60.0
HOST = {"host.name": "node-1.example", "host.id": "4b7ac1d5e0f64ad59bb0f9d3c1e2a7b6",
        "host.arch": "amd64", "os.type": "linux", "os.version": "6.18.0"}


def identity_of(workload: Workload) -> Identity:
    """What the resolver gives a process without a container (see enrich/identity.py)."""
    if workload == AGENT:
        return Identity({**HOST, "service.name": "otel-ebpf"})
    if workload == OVERFLOW:
        return Identity(dict(HOST))
    name = f"worker-{workload.pid}"
    return Identity({**HOST, "process.pid": workload.pid, "process.executable.name": name,
                     "process.executable.path": f"/usr/local/bin/{name}",
                     "service.name": name},
                    {"process.pid": workload.pid, "process.executable.name": name})


def truth(pid: int, call: int) -> int:
    """How many calls series (pid, call) counted: distinct, so a mix-up shows."""
    return pid * 10 + call + 1


def fill(store: CumulativeStore, workloads: int = WORKLOADS) -> None:
    """Kernel deltas of `workloads` processes, folded in two collections."""
    for half in (0, 1):
        records = []
        for pid in range(1000 + half, 1000 + workloads, 2):
            for c, name in enumerate(SYSCALLS):
                n = truth(pid, c)
                records.append(ExpHistogramDelta(
                    DURATION, Workload(pid, f"worker-{pid}"), {"linux.syscall.name": name},
                    2, -80, [n] + [1] * 30 + [0], n + 30, n * 1e-6, 1e-7, 3e-3))
        store.add(records, 1_000, 2_000 + half)


def expected(workloads: int = WORKLOADS) -> dict[tuple[int, str], int]:
    """(pid, syscall) -> the count of its series after fill()."""
    return {(pid, name): truth(pid, c) + 30 for pid in range(1000, 1000 + workloads)
            for c, name in enumerate(SYSCALLS)}


def metrics_export(store: CumulativeStore, endpoint: str, **config: Any) -> MetricsExport:
    exporter_config = ExporterConfig(endpoint=endpoint, protocol="grpc", insecure=True, **config)
    shipper = OtlpShipper(make_otlp_exporter(exporter_config), endpoint)
    return MetricsExport(store, shipper, lambda _: identity_of, exporter_config, 1_000)


class SmallCollector(OtelCollector):
    """The Collector with its gRPC receiver's limit lowered, as operators do."""

    def __init__(self, max_recv_mib: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_recv_mib = max_recv_mib

    def config(self) -> dict[str, Any]:
        config = super().config()
        config["receivers"]["otlp"]["protocols"]["grpc"]["max_recv_msg_size_mib"] = (
            self.max_recv_mib)
        return config


@pytest.fixture
def collector(otelcol_binary: Path, tmp_path: Path) -> Iterator[OtelCollector]:
    """The Collector, defaults but for a quiet debug exporter (20,000 points)."""
    with OtelCollector(binary=otelcol_binary, verbosity="basic",
                       log_path=tmp_path / "otelcol.log") as peer:
        yield peer


def json_points(collector: OtelCollector, name: str, requests: int
                ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(resource attributes, point) of metric `name` in the first `requests` requests the
    Collector wrote (its file exporter's OTLP/JSON, one line per request)."""
    docs = collector.wait_for_export("metrics", requests, WAIT)
    out = []
    for doc in docs[:requests]:
        for rm in doc["resourceMetrics"]:
            resource = {a["key"]: next(iter(a["value"].values()))
                        for a in rm["resource"].get("attributes", [])}
            for sm in rm["scopeMetrics"]:
                for metric in (m for m in sm["metrics"] if m["name"] == name):
                    kind = next(k for k in metric if k not in ("name", "description", "unit"))
                    out.extend((resource, p) for p in metric[kind]["dataPoints"])
    return out


def arrived(points: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[tuple[int, str], int]:
    """(pid, syscall) -> count, failing on any series that arrived twice."""
    counts: dict[tuple[int, str], int] = {}
    for resource, point in points:
        attrs = {a["key"]: next(iter(a["value"].values())) for a in point["attributes"]}
        key = (int(resource["process.pid"]), attrs["linux.syscall.name"])
        assert key not in counts, f"{key} arrived twice"
        counts[key] = int(point["count"])
    return counts


def test_an_export_over_4_mib_reaches_the_collector_whole(collector: OtelCollector) -> None:
    store = CumulativeStore(limit=SeriesLimit(50_000))
    fill(store)
    unsplit = build_metrics_data(store.series(), identity_of)
    assert count_points(unsplit) == WORKLOADS * len(SYSCALLS)
    assert request_size(unsplit) > FOUR_MIB  # the Collector would refuse it whole...
    with grpc.insecure_channel(collector.grpc_target) as channel, pytest.raises(
            grpc.RpcError) as refused:
        MetricsServiceStub(channel).Export(encode_metrics(unsplit), timeout=WAIT)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in str(refused.value.details())

    # ...and takes it split: bytes alone decide here (no point bound)
    metrics = metrics_export(store, collector.grpc_endpoint, max_request_points=1_000_000)
    assert metrics.export_once()
    assert metrics.shipper.failed == 0
    requests = metrics.last_requests
    assert requests == -(-request_size(unsplit) // 4_000_000)  # 2, packed full
    assert arrived(json_points(collector, DURATION.name, requests)) == expected()
    assert "larger than max" not in collector.read_log()
    counted = {s.attributes["reason"]: s.value for s in store.series()
               if s.descriptor.name.startswith("otel_ebpf.metrics.")}
    assert counted == {"max_request": 1}  # split once, nothing dropped


def test_a_collector_with_a_lower_limit_gets_smaller_parts(otelcol_binary: Path,
                                                           tmp_path: Path) -> None:
    """A refusal (RESOURCE_EXHAUSTED, from the real receiver) is answered at once with
    smaller parts, and later exports fit from the start."""
    store = CumulativeStore(limit=SeriesLimit(50_000))
    fill(store, 800)  # ~1.9 MB
    with SmallCollector(1, binary=otelcol_binary, verbosity="basic",
                        log_path=tmp_path / "otelcol.log") as peer:
        metrics = metrics_export(store, peer.grpc_endpoint)
        assert metrics.export_once()
        assert metrics.max_bytes == FOUR_MIB // 4 * 15 // 16  # the limit the refusal stated
        first = metrics.last_requests  # the refused request, then its parts
        assert metrics.shipper.failed == 1
        points = json_points(peer, DURATION.name, first - 1)
        assert arrived(points) == expected(800)
        assert metrics.export_once()  # again: no refusal now
        assert metrics.shipper.failed == 1
        assert metrics.last_requests == first - 1
    split = {s.attributes["reason"]: s.value for s in store.series()
             if s.descriptor.name == "otel_ebpf.metrics.requests.split"}
    assert split == {"refused": 1, "max_request": 1}


def test_rotel_gets_every_point_of_an_export_over_its_batch_limit(
        rotel: RotelCollector, otlp_sink: OtlpSink) -> None:
    """rotel answers success to a request of more than 2 x 8192 points, and drops it; the
    point bound keeps every request under that.

    rotel 0.0.1a15 also drops the resource of the points it puts at the end of a batch
    when it cuts a ResourceMetrics in two (requests from the official exporter, unsplit,
    show it too): points are identified here by their own attributes, which carry the
    process as well."""
    store = CumulativeStore(limit=SeriesLimit(50_000))
    records = [CounterDelta(RETRANSMITS, Workload(pid, f"worker-{pid}"),
                            {"network.peer.port": port}, pid + port)
               for pid in range(1000, 3000) for port in range(10)]
    store.add(records, 1_000, 2_000)
    unsplit = build_metrics_data(store.series(), identity_of)
    with grpc.insecure_channel(rotel.grpc_target) as channel:
        MetricsServiceStub(channel).Export(encode_metrics(unsplit), timeout=WAIT)  # "ok"
    deadline = time.monotonic() + WAIT
    while "dropping data" not in rotel.read_log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "Too many batch items split, dropping data" in rotel.read_log()

    metrics = metrics_export(store, rotel.grpc_endpoint)
    assert metrics.export_once()
    assert metrics.last_requests == 3  # 20,000 points (and the series gauge) / 8192

    def received() -> dict[tuple[int, int], int]:
        points = {}
        for resource, p in otlp_sink.metrics_points(RETRANSMITS.name):
            attrs = attrs_to_dict(p.attributes)
            key = (attrs["process.pid"], attrs["network.peer.port"])
            assert key not in points, f"{key} arrived twice"
            assert resource.get("process.pid", key[0]) == key[0]
            points[key] = p.as_int
        return points

    assert otlp_sink.wait_for(lambda: len(received()) >= 20_000, WAIT), rotel.read_log()
    assert received() == {(pid, port): pid + port for pid in range(1000, 3000)
                          for port in range(10)}
    assert rotel.read_log().count("dropping data") == 1  # the unsplit one only


def test_the_series_cap_at_a_collector(rotel: RotelCollector, otlp_sink: OtlpSink) -> None:
    """20,000 series under the default cap: 2,000 arrive as they are and one overflow
    series on the host's resource, and the counts add up exactly."""
    store = CumulativeStore(limit=SeriesLimit())
    fill(store)
    metrics = metrics_export(store, rotel.grpc_endpoint)
    assert metrics.export_once()
    assert otlp_sink.wait_for(lambda: len(otlp_sink.metrics_points(DURATION.name)) >= 2001,
                              WAIT)
    points = otlp_sink.metrics_points(DURATION.name)
    assert len(points) == 2001
    overflow = [(r, p) for r, p in points if attrs_to_dict(p.attributes).get(
        "otel.metric.overflow") is True]
    assert [r for r, _ in overflow] == [HOST]
    assert sum(p.count for _, p in points) == sum(expected().values())
    # the first 2,000 series to arrive kept theirs: the even pids' first collection
    admitted = {(pid, name) for pid in range(1000, 1400, 2) for name in SYSCALLS}
    assert {(r["process.pid"], attrs_to_dict(p.attributes)["linux.syscall.name"])
            for r, p in points if r != HOST} == admitted
    assert overflow[0][1].count == sum(n for key, n in expected().items()
                                       if key not in admitted)
    # the next export carries the operator's view: series per metric, deltas folded
    assert metrics.export_once()
    assert otlp_sink.wait_for(lambda: otlp_sink.metrics_points("otel_ebpf.metrics.overflowed"),
                              WAIT)
    (_, folded), = otlp_sink.metrics_points("otel_ebpf.metrics.overflowed")
    assert attrs_to_dict(folded.attributes) == {"metric": DURATION.name}
    assert folded.as_int == 18_000
    series = {attrs_to_dict(p.attributes)["metric"]: p.as_int
              for _, p in otlp_sink.metrics_points("otel_ebpf.metrics.series")}
    assert series[DURATION.name] == 2001
