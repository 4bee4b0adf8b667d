"""One unit per signal, each through the official OTLP exporters into a recording sink
built from the official servicers (tests/peers/otlp_sink.py): the metrics unit with the
agent's counters and its quick return after an outage, the spans unit linking delivered
spans as exemplars, the profiles unit building windows of the type its probe declared."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterable
from pathlib import Path

from otel_ebpf.config import Config, ExporterConfig
from otel_ebpf.enrich.host import host_attributes
from otel_ebpf.enrich.identity import AGENT, IdentityResolver
from otel_ebpf.export.otlp import OtlpShipper, make_otlp_exporter
from otel_ebpf.export.profile_sender import ProfilesSender, profiles_delivery
from otel_ebpf.export.profiles import ProfileExport
from otel_ebpf.export.traces import SpanExport
from otel_ebpf.export.transport import OneAttempt
from otel_ebpf.model import (
    Collection,
    CounterDelta,
    ExpHistogramDelta,
    Identity,
    MetricDescriptor,
    ProfileType,
    Setting,
    SpanRecord,
    StackSample,
    Workload,
)
from otel_ebpf.signals.metrics import MetricsSignal
from otel_ebpf.signals.profiles import ProfilesSignal
from otel_ebpf.signals.spans import SpansSignal
from otel_ebpf.symbolize.frames import Frame
from tests.peers.otlp_sink import OtlpSink, attrs_to_dict

COUNT = MetricDescriptor("test.count", "{thing}", "things")
WAIT = MetricDescriptor("test.wait", "s", "waits")
PERIOD = MetricDescriptor("test.period", "{call}", "a setting readers need")
W = Workload(os.getpid(), "pytest", 0)
OFF_CPU = ProfileType("off_cpu", "nanoseconds", "off_cpu", "nanoseconds")


def resolver(workloads: Iterable[Workload]) -> object:
    def identity_of(w: Workload) -> Identity:
        return Identity({"service.name": "agent" if w == AGENT else f"w{w.pid}"},
                        {} if w == AGENT else {"process.pid": w.pid})
    return identity_of


def exporter_config(endpoint: str) -> ExporterConfig:
    return ExporterConfig(endpoint=endpoint, protocol="grpc", insecure=True, interval=0.1,
                          timeout=2, retry={"initial_backoff": "50ms", "max_backoff": "100ms"})


def shipper(config: ExporterConfig, signal: str) -> OtlpShipper:
    return OtlpShipper(OneAttempt(make_otlp_exporter(config, signal), signal),
                       config.resolved_endpoint(), signal)


def metrics_signal(config: ExporterConfig, exporting: bool = True) -> MetricsSignal:
    return MetricsSignal(config, shipper(config, "metrics") if exporting else None,
                         resolver, lambda w: True, 4,  # type: ignore[arg-type]
                         lambda: [Setting(PERIOD, {"probe": "p"}, 64)], 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_metrics_unit_exports_records_counters_fill_and_settings() -> None:
    with OtlpSink() as sink:
        metrics = metrics_signal(exporter_config(sink.endpoint))
        metrics.absorb(Collection("p", [CounterDelta(COUNT, W, {"k": "v"}, 5)],
                                  lost_events={"map_full": 2}, map_fill={"m": (1, 4)}))
        assert await metrics.periodic.once() is True
        (resource, point), = sink.metrics_points("test.count")
        assert point.as_int == 5 and attrs_to_dict(point.attributes) == {
            "k": "v", "process.pid": W.pid}
        assert resource == {"service.name": f"w{W.pid}"}
        lost = {attrs_to_dict(p.attributes)["reason"]: p.as_int for r, p in
                sink.metrics_points("otel_ebpf.probe.lost_events")
                if r == {"service.name": "agent"}}
        assert lost == {"map_full": 2}
        assert [p.as_double for _, p in sink.metrics_points("otel_ebpf.probe.map.fill")] == [
            0.25]
        assert [p.as_int or p.as_double for _, p in sink.metrics_points("test.period")] == [
            64]
        await metrics.last(10**9)
        metrics.close()


async def test_metrics_unit_exports_as_soon_as_the_collector_is_back() -> None:
    port = free_port()
    config = exporter_config(f"http://127.0.0.1:{port}").model_copy(update={"interval": 600})
    metrics = metrics_signal(config)
    metrics.absorb(Collection("p", [CounterDelta(COUNT, W, {}, 1)]))
    assert await metrics.periodic.once() is False  # nobody there: worth a quick retry
    sink = OtlpSink()
    back = asyncio.create_task(metrics._after_export(False))
    await asyncio.sleep(0.3)  # a few empty probes find nobody
    assert not back.done()
    sink.start(port)
    try:
        # the export follows the collector's answer, not the 600 s interval
        await asyncio.wait_for(back, 30)
        assert [p.as_int for _, p in sink.metrics_points("test.count")] == [1]
        await metrics.last(10**9)
    finally:
        sink.stop()
        metrics.close()


async def test_spans_unit_links_delivered_spans_as_exemplars_and_counts_drops() -> None:
    with OtlpSink() as sink:
        config = exporter_config(sink.endpoint)
        metrics = metrics_signal(config, exporting=False)
        attrs: dict[str, str | int | float | bool] = {"linux.syscall.name": "read"}
        metrics.absorb(Collection("p", [ExpHistogramDelta(WAIT, W, dict(attrs), 2, 0, [1],
                                                          1, 0.5, 0.5, 0.5)]))
        spans = SpansSignal(SpanExport(shipper(config, "traces"), config, resolver), metrics)
        task = asyncio.create_task(spans.run())
        record = SpanRecord("syscall read", W, 1_000, 501_000, {"thread.id": 7},
                            example_of=("test.wait", W, dict(attrs)))
        spans.offer([record])
        assert await asyncio.to_thread(sink.wait_for, lambda: sink.spans("syscall read"), 10)
        (series,) = [s for s in metrics.store.series() if s.descriptor.name == "test.wait"]
        for _ in range(100):
            if metrics.store.exemplars_of(series):
                break
            await asyncio.sleep(0.05)
        (exemplar,) = metrics.store.exemplars_of(series)
        assert exemplar.value == 500e-6 and exemplar.filtered_attributes == {"thread.id": 7}
        task.cancel()
    # the collector is gone: what is left at shutdown is dropped and counted
    spans.offer([record])
    await spans.last(0)
    dropped = {s.attributes["reason"]: s.value for s in metrics.store.series()
               if s.descriptor.name == "otel_ebpf.spans.dropped"}
    assert dropped == {"shutdown": 1}


async def test_profiles_unit_builds_windows_of_the_declared_type(tmp_path: Path) -> None:
    folded = tmp_path / "stacks.folded"
    with OtlpSink() as sink:
        config = exporter_config(sink.endpoint)
        identity = IdentityResolver(Config(identity={"docker": {"enabled": False}}),
                                    host_attributes())
        delivery = profiles_delivery(ProfilesSender(config), config, identity.sample_resolver)
        metrics = metrics_signal(config, exporting=False)
        profiles = ProfilesSignal(ProfileExport(delivery, folded, 1), identity, 10,
                                  metrics.counters)
        task = asyncio.create_task(profiles.run())
        main = Frame(0x400100, "main", "native", None, 0)
        profiles.add(Collection("p", samples=[StackSample(W, W.pid, "t", (main,), 3)],
                                period_ns=1000, profile_type=OFF_CPU))
        profiles.add(Collection("q", [CounterDelta(COUNT, W, {}, 1)]))  # no samples
        await profiles.periodic.once()
        assert await asyncio.to_thread(sink.wait_for, lambda: sink.profiles_requests, 10)
        (request,) = sink.profiles_requests
        strings = request.dictionary.string_table
        (profile,) = request.resource_profiles[0].scope_profiles[0].profiles
        assert (strings[profile.sample_type.type_strindex],
                strings[profile.period_type.unit_strindex]) == ("off_cpu", "nanoseconds")
        assert [list(s.values) for s in profile.samples] == [[3]]
        assert folded.read_text().strip().endswith(";main 3")  # process;stack count
        task.cancel()
        await profiles.last(0)
        profiles.close()
