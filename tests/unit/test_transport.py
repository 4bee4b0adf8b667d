"""The official OTLP exporters made to attempt once (otel_ebpf/export/transport.py) and the
profiles sender, against real loopback servers: a failure returns at once, and says
whether it is worth retrying. Pins the SDK internals the agent relies on, and the cause of
the slow first export after an outage (the SDK's own backoff sleeping)."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanContext

from otel_ebpf.config import ExporterConfig
from otel_ebpf.export.otlp import make_otlp_exporter
from otel_ebpf.export.profile_sender import ProfilesSender
from otel_ebpf.export.queue import EXPORT_REFUSED, UNSUPPORTED
from otel_ebpf.export.transport import OneAttempt
from tests.peers.otlp_sink import OtlpSink

SPAN = ReadableSpan(name="s", context=SpanContext(1, 1, is_remote=False),
                    resource=Resource({}), start_time=1, end_time=2)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def exporter_config(protocol: str, port: int, timeout: float = 5.0) -> ExporterConfig:
    return ExporterConfig(endpoint=f"http://127.0.0.1:{port}", protocol=protocol,
                          timeout=timeout)


class StatusServer:
    """An HTTP server answering every POST with one status code."""

    def __init__(self, status: int) -> None:
        self.posts: list[str] = []
        posts = self.posts

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                posts.append(self.path)
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def grpc_answering(code: grpc.StatusCode, details: str) -> tuple[grpc.Server, int]:
    """A gRPC server whose trace service answers `code`, and has nothing else."""

    class Refuse(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: object, context: grpc.ServicerContext) -> object:
            context.abort(code, details)

    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Refuse(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


@pytest.fixture
def refusing_grpc() -> Iterator[int]:
    server, port = grpc_answering(grpc.StatusCode.INVALID_ARGUMENT, "bad spans")
    yield port
    server.stop(0).wait()


@pytest.mark.parametrize("code, details, retryable", [
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "grpc: received message larger than max (5 vs. 4)",
     False),
    (grpc.StatusCode.OUT_OF_RANGE, "decoded message length too large: found 5 bytes, the "
     "limit is: 4 bytes", False),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "quota exceeded", True),
    (grpc.StatusCode.UNAVAILABLE, "shutting down", True),
])
def test_a_size_refusal_is_not_retried_but_a_quota_is(
        code: grpc.StatusCode, details: str, retryable: bool) -> None:
    server, port = grpc_answering(code, details)
    try:
        exporter = OneAttempt(make_otlp_exporter(exporter_config("grpc", port), "traces"),
                              "traces")
        assert exporter.export([SPAN]).name == "FAILURE"
        assert exporter.outcome.retryable is retryable, exporter.outcome
        assert details in exporter.outcome.why
    finally:
        server.stop(0).wait()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_the_sdk_exporter_sleeps_in_its_backoff_while_the_collector_is_away(
        protocol: str) -> None:
    """The cause: each export during an outage retries inside the SDK, sleeping 1 s, 2 s,
    4 s (+-20 %) within its timeout, so a returning collector waits for the sleep."""
    exporter = make_otlp_exporter(exporter_config(protocol, closed_port(), timeout=2.5),
                                  "traces")
    began = time.monotonic()
    assert exporter.export([SPAN]).name == "FAILURE"
    assert time.monotonic() - began >= 0.8  # at least its first backoff
    exporter.shutdown()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_one_attempt_fails_at_once_and_retryably_when_nothing_listens(protocol: str) -> None:
    exporter = OneAttempt(make_otlp_exporter(exporter_config(protocol, closed_port()),
                                             "traces"), "traces")
    assert exporter.single
    began = time.monotonic()
    assert exporter.export([SPAN]).name == "FAILURE"
    assert time.monotonic() - began < 0.5
    outcome = exporter.outcome
    assert not outcome.ok and outcome.retryable, outcome
    assert not exporter.probe()
    exporter.shutdown()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_one_attempt_delivers_and_probes(protocol: str) -> None:
    if protocol == "grpc":
        with OtlpSink() as sink:
            config = exporter_config("grpc", sink.port)
            spans = OneAttempt(make_otlp_exporter(config, "traces"), "traces")
            metrics = OneAttempt(make_otlp_exporter(config, "metrics"), "metrics")
            assert spans.export([SPAN]).name == "SUCCESS"
            assert metrics.probe() and spans.probe()
            assert len(sink.spans()) == 1
            assert len(sink.metrics_requests) == 1 and not sink.metrics_requests[0].resource_metrics
        return
    server = StatusServer(200)
    try:
        exporter = OneAttempt(make_otlp_exporter(exporter_config(protocol, server.port),
                                                 "metrics"), "metrics")
        assert exporter.probe()
        assert server.posts == ["/v1/metrics"]  # an empty request, really sent
    finally:
        server.close()


def test_a_grpc_refusal_is_not_retryable(refusing_grpc: int) -> None:
    exporter = OneAttempt(make_otlp_exporter(exporter_config("grpc", refusing_grpc),
                                             "traces"), "traces")
    assert exporter.export([SPAN]).name == "FAILURE"
    assert exporter.outcome.retryable is False
    assert exporter.outcome.reason == EXPORT_REFUSED
    assert "INVALID_ARGUMENT" in exporter.outcome.why


@pytest.mark.parametrize("status, retryable", [(400, False), (413, False), (429, True),
                                               (503, True)])
def test_http_status_codes_are_classified(status: int, retryable: bool) -> None:
    server = StatusServer(status)
    try:
        exporter = OneAttempt(make_otlp_exporter(exporter_config("http/protobuf", server.port),
                                                 "traces"), "traces")
        began = time.monotonic()
        assert exporter.export([SPAN]).name == "FAILURE"
        assert time.monotonic() - began < 0.5
        assert exporter.outcome.retryable is retryable
        assert exporter.outcome.why == f"HTTP {status}"
    finally:
        server.close()


def test_profiles_sender_delivers_bytes_and_classifies_failures(refusing_grpc: int) -> None:
    request = ExportProfilesServiceRequest().SerializeToString()
    with OtlpSink() as sink:
        sender = ProfilesSender(exporter_config("grpc", sink.port))
        assert sender.send(request).ok
        assert len(sink.profiles_requests) == 1
        sender.close()
    down = ProfilesSender(exporter_config("grpc", closed_port()))
    outcome = down.send(request)
    assert not outcome.ok and outcome.retryable
    # a collector without a profiles service (this one has traces only)
    unsupported = ProfilesSender(exporter_config("grpc", refusing_grpc)).send(request)
    assert not unsupported.retryable and unsupported.reason == UNSUPPORTED
    for status, reason, retryable in ((404, UNSUPPORTED, False), (503, EXPORT_REFUSED, True)):
        server = StatusServer(status)
        try:
            outcome = ProfilesSender(exporter_config("http/protobuf", server.port)).send(request)
            assert outcome.retryable is retryable and outcome.reason == reason
        finally:
            server.close()


def test_every_exporter_failure_reaches_the_shipper_despite_the_sdks_duplicate_filter(
        ) -> None:
    """The SDK's gRPC exporter logger drops a message whose template repeats within 20 s
    (its DuplicateFilter, installed when the module is imported, as in every run of the
    agent): a second size refusal in a row must still be seen as one, not as an outage."""
    import logging

    from opentelemetry.exporter.otlp.proto.grpc import exporter as sdk_grpc

    from otel_ebpf.export.otlp import OtlpShipper, Sent

    class Refusing:
        def export(self, data: object) -> object:
            logging.getLogger(sdk_grpc.__name__).error(
                "Failed to export %s to %s, error code: %s, error details: %s", "metrics",
                "here", "StatusCode.RESOURCE_EXHAUSTED",
                "grpc: received message larger than max (5000000 vs. 4194304)")
            from opentelemetry.sdk.metrics.export import MetricExportResult

            return MetricExportResult.FAILURE

    shipper = OtlpShipper(Refusing(), "here", "metrics")
    assert shipper.send(object()) is Sent.TOO_LARGE
    assert shipper.send(object()) is Sent.TOO_LARGE
