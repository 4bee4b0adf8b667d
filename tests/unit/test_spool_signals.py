"""Spans and profiles through the spool: spans written as the OTLP request the exporter
sends and read back as the same spans (ids, times, attributes, status, resource),
profile requests byte for byte; both delivered through the real transports to a real
OTLP server by the next run of the agent (a new delivery on the same directory)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from pathlib import Path

from otel_ebpf.config import ExporterConfig, QueueConfig
from otel_ebpf.export.otlp import OtlpShipper, make_otlp_exporter
from otel_ebpf.export.traces import (
    QueuedSpan,
    SpanExport,
    build_spans,
    decode_spans,
    encode_spans,
)
from otel_ebpf.export.transport import OneAttempt
from otel_ebpf.model import Identity, SpanRecord, Workload
from tests.peers.otlp_sink import OtlpSink, attrs_to_dict
from tests.unit.test_transport import closed_port

W = Workload(pid=4242, comm="slowpoke", cgroup_id=77)


def identity(workloads: Iterable[Workload]):  # type: ignore[no-untyped-def]
    return lambda w: Identity({"service.name": w.comm, "host.name": "h"},
                              {"process.pid": w.pid, "process.executable.name": w.comm})


def record(i: int, error: str | None = None) -> SpanRecord:
    return SpanRecord(f"syscall call{i % 3}", W, 1_700_000_000_000_000_000 + i * 1000,
                      1_700_000_000_050_000_000 + i * 1000,
                      {"linux.syscall.name": f"call{i % 3}", "thread.id": 4242 + i,
                       "linux.syscall.latency_sampled": bool(i % 2), "ratio": 0.5},
                      error_type=error)


def test_spans_decoded_from_their_request_encode_to_the_same_request() -> None:
    queued = [QueuedSpan(record(i, "EAGAIN" if i == 2 else None), 10**30 + i, 10**15 + i)
              for i in range(5)]
    request = encode_spans(build_spans(queued, identity([W])))
    again = encode_spans(decode_spans(request.SerializeToString()))
    assert again == request


def exporter_config(port: int, spool: Path) -> ExporterConfig:
    return ExporterConfig(endpoint=f"http://127.0.0.1:{port}", protocol="grpc", timeout=2.0,
                          queue=QueueConfig(spool_directory=str(spool)))


def span_export(port: int, spool: Path) -> SpanExport:
    config = exporter_config(port, spool)
    shipper = OtlpShipper(OneAttempt(make_otlp_exporter(config, "traces"), "traces"),
                          config.resolved_endpoint(), "traces")
    return SpanExport(shipper, config, identity)


async def test_spans_left_in_the_spool_by_one_run_reach_the_collector_from_the_next(
        tmp_path: Path) -> None:
    first = span_export(closed_port(), tmp_path)  # the collector is away
    queued = first.offer([record(i) for i in range(40)])
    await first.flush(time.monotonic() + 1)  # one attempt fails: all 40 go to disk
    assert first.delivery.spill is not None and first.delivery.spill.spool.items == 40
    with OtlpSink() as sink:
        second = span_export(sink.port, tmp_path)
        worker = asyncio.create_task(second.run())
        assert await asyncio.to_thread(sink.wait_for, lambda: len(sink.spans()) >= 40, 10)
        worker.cancel()
        await second.flush(time.monotonic() + 1)
        got = sink.spans()
    assert len(got) == 40
    by_id = {int.from_bytes(s.span_id, "big"): (resource, s) for resource, s in got}
    for q in queued:
        resource, span = by_id[q.span_id]
        assert int.from_bytes(span.trace_id, "big") == q.trace_id
        assert (span.start_time_unix_nano, span.end_time_unix_nano) == (
            q.record.start_unix_ns, q.record.end_unix_ns)
        assert attrs_to_dict(span.attributes) == {**q.record.attributes, "process.pid": 4242,
                                                  "process.executable.name": "slowpoke"}
        assert resource == {"service.name": "slowpoke", "host.name": "h"}
    assert [p.name for p in (tmp_path / "spans").iterdir()] == ["lock"]


async def test_profiles_left_in_the_spool_reach_the_collector_from_the_next_run(
        tmp_path: Path) -> None:
    """Profiles too: each request one spool file, byte for byte, counted per workload
    (a request of two workloads' profiles counts two)."""
    from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
        ExportProfilesServiceRequest,
    )
    from opentelemetry.proto.profiles.v1development import profiles_pb2 as pb

    from otel_ebpf.export.profile_sender import ProfilesSender, profiles_delivery
    from otel_ebpf.export.queue import Entry

    requests = [ExportProfilesServiceRequest(resource_profiles=[
        pb.ResourceProfiles(schema_url=f"window-{i}")]).SerializeToString() for i in range(6)]
    other = Workload(pid=99, comm="other", cgroup_id=78)
    sender = ProfilesSender(exporter_config(closed_port(), tmp_path))
    first = profiles_delivery(sender, sender.config, identity)
    first.offer([Entry.shared(r, len(r), {W: 1, other: 1}) for r in requests])
    await first.flush(time.monotonic() + 1)
    assert first.spill is not None and (len(first.spill.spool), first.spill.spool.items) == (6, 12)
    with OtlpSink() as sink:
        sender = ProfilesSender(exporter_config(sink.port, tmp_path))
        second = profiles_delivery(sender, sender.config, identity)
        assert second.waiting == 12
        worker = asyncio.create_task(second.run())
        assert await asyncio.to_thread(
            sink.wait_for, lambda: len(sink.profiles_requests) >= 6, 10)
        worker.cancel()
        await second.flush(time.monotonic() + 1)
        got = [r.SerializeToString() for r in sink.profiles_requests]
    assert got == requests  # in order, as they were queued
    assert second.delivered_units == 12
