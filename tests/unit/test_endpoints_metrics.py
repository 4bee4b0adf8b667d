"""/metrics content: OpenTelemetry-to-Prometheus names, exact classic histogram boundaries,
labels that identify a workload and nothing else, parsed back with prometheus_client's
own parser."""

from __future__ import annotations

import os

from opentelemetry.sdk.metrics.export import MetricsData
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from otel_ebpf.aggregate import CumulativeStore
from otel_ebpf.endpoints.naming import labels_of, metric_name
from otel_ebpf.endpoints.prometheus import MetricsCollector
from otel_ebpf.export.agent_metrics import MapFill, process_metrics
from otel_ebpf.export.metrics import build_metrics_data
from otel_ebpf.export.metrics_export import with_series_gauge
from otel_ebpf.histogram import bucket_upper_bound
from otel_ebpf.model import (
    CounterDelta,
    ExpHistogramDelta,
    Identity,
    MetricDescriptor,
    Workload,
)
from otel_ebpf.probes.syscall_latency import SYSCALL_DURATION
from otel_ebpf.probes.tcp_retransmit import RETRANSMITS
from otel_ebpf.selfmetrics import LOST_EVENTS, SPANS_QUEUED

APP = Workload(pid=0, comm="app", cgroup_id=7)
AGENT = Workload(pid=-1, comm="otel-ebpf")
SECRET = "password=hunter2"


def identity_of(workload: Workload) -> Identity:
    if workload == AGENT:
        return Identity({"service.name": "otel-ebpf", "host.name": "node-1",
                         "deployment.environment": SECRET})
    # what a resource may carry besides identity: configured attributes (from the
    # environment), a process's command line with identity.process.command_args
    return Identity({"service.name": "web", "host.name": "node-1",
                     "linux.cgroup.path": "/system.slice/web.service",
                     "process.command_line": f"web --{SECRET}",
                     "deployment.environment": SECRET},
                    {"process.executable.name": "web", "process.command_line": SECRET})


def histogram(offset: int, counts: list[int], zero: int = 0) -> ExpHistogramDelta:
    return ExpHistogramDelta(SYSCALL_DURATION, APP, {"linux.syscall.name": "read"}, 2,
                             offset, counts, sum(counts) + zero, 0.25, 1e-6, 1e-3, zero)


def scrape(store: CumulativeStore, openmetrics: bool = False) -> dict[str, object]:
    def snapshot() -> MetricsData:
        series = store.series()
        data = build_metrics_data(series, identity_of)
        mapfill = MapFill()
        mapfill.update("syscall_latency", {"counts": (64, 256)})
        return with_series_gauge(data, identity_of(AGENT).resource, 1,
                                 process_metrics(1) + mapfill.metrics(1))

    registry = CollectorRegistry(auto_describe=False)
    registry.register(MetricsCollector(snapshot))
    if openmetrics:
        from prometheus_client.openmetrics.exposition import generate_latest as om_latest

        return {f.name: f for f in parse_openmetrics(om_latest(registry).decode())}
    return {f.name: f for f in text_string_to_metric_families(generate_latest(registry)
                                                                 .decode())}


def test_names_follow_the_opentelemetry_prometheus_conventions() -> None:
    assert metric_name("linux.syscall.duration", "s") == ("linux_syscall_duration_seconds",
                                                          "seconds")
    assert metric_name("otel_ebpf.probe.lost_events", "{event}")[0] == (
        "otel_ebpf_probe_lost_events")
    assert metric_name("process.memory.usage", "By")[0] == "process_memory_usage_bytes"
    assert metric_name("otel_ebpf.probe.map.fill", "1", gauge=True)[0] == (
        "otel_ebpf_probe_map_fill_ratio")
    assert metric_name("process.cpu.time", "s")[0] == "process_cpu_time_seconds"
    assert metric_name("net.io", "By/s")[0] == "net_io_bytes_per_second"
    assert metric_name("request.duration_seconds", "s")[0] == "request_duration_seconds"
    assert labels_of({"linux.syscall.name": "read", "a.b": "1", "a_b": "2", "ok": True}) == {
        "linux_syscall_name": "read", "a_b": "1;2", "ok": "true"}


def test_a_histogram_is_classic_at_the_kernels_exact_bucket_boundaries() -> None:
    store = CumulativeStore()
    store.add([histogram(-40, [3, 0, 5])], 1, 2)
    store.add([histogram(-36, [2], zero=4)], 1, 3)  # one more bucket, and zeros
    family = scrape(store)["linux_syscall_duration_seconds"]
    assert family.type == "histogram"  # type: ignore[attr-defined]
    buckets = [(s.labels["le"], s.value) for s in family.samples  # type: ignore[attr-defined]
               if s.name.endswith("_bucket")]
    # every populated bucket's upper boundary 2^((i+1)/4), dense between the lowest and
    # the highest, counts cumulative from the zero bucket on
    expected_le = [bucket_upper_bound(i, 2) for i in range(-40, -35)]
    assert [float(le) for le, _ in buckets[:-1]] == expected_le
    assert [v for _, v in buckets] == [4 + 3, 7, 12, 12, 14, 14]
    assert buckets[-1][0] == "+Inf"
    count = next(s for s in family.samples if s.name.endswith("_count"))  # type: ignore
    total = next(s for s in family.samples if s.name.endswith("_sum"))  # type: ignore
    assert count.value == 14 and total.value == 0.5
    assert count.labels == {"linux_syscall_name": "read", "process_executable_name": "web",
                            "service_name": "web", "host_name": "node-1",
                            "linux_cgroup_path": "/system.slice/web.service"}


def test_counters_end_in_total_and_updown_sums_are_gauges() -> None:
    store = CumulativeStore()
    store.add([CounterDelta(RETRANSMITS, APP, {"network.peer.address": "10.0.0.2"}, 5),
               CounterDelta(LOST_EVENTS, AGENT, {"probe": "p", "reason": "map_full"}, 2),
               CounterDelta(SPANS_QUEUED, AGENT, {}, 3),
               CounterDelta(SPANS_QUEUED, AGENT, {}, -1)], 1_000_000_000, 2)
    families = scrape(store)
    retransmits = families["linux_tcp_retransmits"]
    assert retransmits.type == "counter"  # type: ignore[attr-defined]
    sample = next(s for s in retransmits.samples  # type: ignore[attr-defined]
                  if s.name == "linux_tcp_retransmits_total")
    assert sample.value == 5 and sample.labels["network_peer_address"] == "10.0.0.2"
    lost = families["otel_ebpf_probe_lost_events"].samples  # type: ignore[attr-defined]
    assert [(s.labels["reason"], s.value) for s in lost if s.name.endswith("_total")] == [
        ("map_full", 2)]
    queued = families["otel_ebpf_spans_queue_size"]
    assert queued.type == "gauge" and queued.samples[0].value == 2  # type: ignore
    # the agent's own metrics, read at scrape time, named as any OpenTelemetry process's
    assert families["process_cpu_time_seconds"].type == "counter"  # type: ignore
    assert families["process_memory_usage_bytes"].samples[0].value > 0  # type: ignore
    fill = families["otel_ebpf_probe_map_fill_ratio"].samples[0]  # type: ignore
    assert fill.value == 0.25 and fill.labels["map"] == "counts"
    series = {s.labels["metric"]: s.value  # type: ignore[attr-defined]
              for s in families["otel_ebpf_metrics_series"].samples}  # type: ignore
    assert series["linux.tcp.retransmits"] == 1


def test_no_command_line_or_environment_value_becomes_a_label() -> None:
    store = CumulativeStore()
    store.add([histogram(-40, [1]), CounterDelta(LOST_EVENTS, AGENT, {"probe": "p",
                                                                      "reason": "x"}, 1)],
              1, 2)
    for openmetrics in (False, True):
        for family in scrape(store, openmetrics).values():
            for sample in family.samples:  # type: ignore[attr-defined]
                assert not any(SECRET in v for v in sample.labels.values()), sample
                assert "deployment_environment" not in sample.labels
                assert "process_command_line" not in sample.labels
                assert not any(v and v in os.environ.values() and len(v) > 8
                               for v in sample.labels.values()), sample


def test_workloads_alike_in_their_labels_add_up_exactly() -> None:
    store = CumulativeStore()
    other = Workload(pid=0, comm="app", cgroup_id=8)  # same identity_of() answer
    store.add([histogram(-40, [3]), CounterDelta(RETRANSMITS, APP, {}, 2)], 1, 2)
    d = histogram(-39, [4])
    d.workload = other
    store.add([d, CounterDelta(RETRANSMITS, other, {}, 5)], 1, 2)
    families = scrape(store)
    total = [s for s in families["linux_tcp_retransmits"].samples  # type: ignore
             if s.name.endswith("_total")]
    assert [s.value for s in total] == [7]
    buckets = [s.value for s in families["linux_syscall_duration_seconds"].samples  # type: ignore
               if s.name.endswith("_bucket")]
    assert buckets == [3, 7, 7]


def test_openmetrics_carries_units_and_created_times() -> None:
    store = CumulativeStore()
    store.add([histogram(-40, [1]),
               CounterDelta(MetricDescriptor("x.y", "{thing}", "d"), APP, {}, 1)],
              5_000_000_000, 6)
    families = scrape(store, openmetrics=True)
    assert families["linux_syscall_duration_seconds"].unit == "seconds"  # type: ignore
    created = [s for s in families["x_y"].samples if s.name == "x_y_created"]  # type: ignore
    assert [s.value for s in created] == [5.0]
