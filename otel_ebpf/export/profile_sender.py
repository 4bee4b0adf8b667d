"""Sends ExportProfilesServiceRequest over OTLP gRPC (the generated ProfilesServiceStub) or
OTLP/HTTP (POST /v1development/profiles).

The SDK has no profiles exporter yet, so this is the one transport the agent owns. It
follows the same config as the metrics exporter: endpoint, protocol, headers, insecure,
compression, timeout. Like the other signals' transports it makes one attempt per send and
says whether a failure is worth retrying; the profiles Delivery does the rest. A collector
without profiles support (gRPC UNIMPLEMENTED, HTTP 404) is reported once; its profiles
are dropped as unsupported and metrics and traces carry on.
"""

from __future__ import annotations

import gzip
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceResponse,
)

from otel_ebpf.config import ExporterConfig
from otel_ebpf.export.delivery import Delivery
from otel_ebpf.export.queue import (
    DELIVERED,
    UNSUPPORTED,
    Backoff,
    BoundedQueue,
    DropLedger,
    Outcome,
)
from otel_ebpf.export.spill import Spill
from otel_ebpf.export.spool import Spool
from otel_ebpf.export.transport import GRPC_STATUS, HTTP_STATUS, classify
from otel_ebpf.selfmetrics import PROFILES_DROPPED, PROFILES_QUEUED, DeliveryMetrics, Resolver

if TYPE_CHECKING:
    import grpc

log = logging.getLogger(__name__)
HTTP_PATH = "/v1development/profiles"


# a channel kept across an outage would otherwise wait up to 120 s (gRPC's default) before
# its next connection attempt; the channel is also rebuilt after UNAVAILABLE, as the SDK
# exporters do, so the next attempt connects at once
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 250),
                   ("grpc.min_reconnect_backoff_ms", 250),
                   ("grpc.max_reconnect_backoff_ms", 2000)]
EXPORT_METHOD = "/opentelemetry.proto.collector.profiles.v1development.ProfilesService/Export"


class ProfilesSender:
    """Sends serialized ExportProfilesServiceRequests, one attempt each (the profiles
    Delivery retries). Blocking: it runs on the delivery's thread."""

    def __init__(self, config: ExporterConfig) -> None:
        self.config = config
        self.endpoint = config.resolved_endpoint()
        self.unsupported = False
        self._channel: grpc.Channel | None = None
        self._export: grpc.UnaryUnaryMultiCallable[bytes, Any] | None = None

    def _grpc_export(self) -> grpc.UnaryUnaryMultiCallable[bytes, Any]:
        import grpc  # only with protocol grpc: the library holds ~18 MB once imported

        if self._export is None:
            url = urlparse(self.endpoint if "://" in self.endpoint else f"//{self.endpoint}")
            target = url.netloc or url.path
            insecure = self.config.insecure
            if insecure is None:
                insecure = url.scheme != "https"
            compression = grpc.Compression.Gzip if self.config.compression == "gzip" else None
            if insecure:
                self._channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS,
                                                      compression=compression)
            else:
                ca_path = os.environ.get("OTEL_EXPORTER_OTLP_CERTIFICATE")
                ca = open(ca_path, "rb").read() if ca_path else None  # noqa: SIM115
                self._channel = grpc.secure_channel(
                    target, grpc.ssl_channel_credentials(root_certificates=ca),
                    options=CHANNEL_OPTIONS, compression=compression)
            # the request goes as the bytes it was queued as (no serializer)
            self._export = self._channel.unary_unary(
                EXPORT_METHOD,
                response_deserializer=ExportProfilesServiceResponse.FromString)
        return self._export

    def send(self, request: bytes) -> Outcome:
        """One attempt at delivering a serialized ExportProfilesServiceRequest."""
        try:
            if self.config.protocol == "grpc":
                outcome = self._send_grpc(request)
            else:
                outcome = self._send_http(request)
        except Exception as exc:  # unreachable, TLS, timeout
            outcome = Outcome(False, retryable=True, why=f"{type(exc).__name__}: {exc}")
        if outcome.reason == UNSUPPORTED and not outcome.ok:
            if not self.unsupported:
                log.warning("the collector at %s does not accept OTLP profiles (%s); "
                            "profiles are dropped and counted, metrics and traces go on. Use "
                            "a collector with profiles support (OpenTelemetry Collector with "
                            "--feature-gates=service.profilesSupport)", self.endpoint,
                            outcome.why)
            self.unsupported = True
        elif outcome.ok:
            self.unsupported = False
        return outcome

    def _send_grpc(self, request: bytes) -> Outcome:
        import grpc

        metadata = tuple((k.lower(), v) for k, v in self.config.headers.items())
        try:
            self._grpc_export()(request, timeout=self.config.timeout, metadata=metadata)
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAVAILABLE:
                self.close()  # the next attempt connects afresh
            if code == grpc.StatusCode.UNIMPLEMENTED:
                return Outcome(False, why="gRPC UNIMPLEMENTED", reason=UNSUPPORTED)
            return classify(exc, {GRPC_STATUS: code.name})
        return DELIVERED

    def _send_http(self, request: bytes) -> Outcome:
        url = self.endpoint.rstrip("/")
        if not url.endswith(HTTP_PATH):
            url += HTTP_PATH
        body = request
        headers = {"Content-Type": "application/x-protobuf", **self.config.headers}
        if self.config.compression == "gzip":
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        req = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.config.timeout) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            if exc.code in (404, 405, 501):
                return Outcome(False, why=f"HTTP {exc.code} for {url}", reason=UNSUPPORTED)
            return classify(exc, {HTTP_STATUS: exc.code})
        return DELIVERED

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
            self._export = None


def profiles_delivery(sender: ProfilesSender, config: ExporterConfig,
                      resolver: Resolver) -> Delivery[bytes]:
    """Profiles' Delivery: each window's request as one entry, sent as soon as queued;
    with a spool directory, one spool file a request. SpoolError: it cannot be used."""
    bound = config.queue.profiles
    metrics = DeliveryMetrics(PROFILES_DROPPED, PROFILES_QUEUED, config.queue.max_workloads,
                              resolver)
    queue: BoundedQueue[bytes] = BoundedQueue(bound.max_items, bound.max_bytes, DropLedger())
    backoff = Backoff(config.retry.initial_backoff, config.retry.max_backoff)
    delivery = Delivery("profiles", lambda batch: _send_all(sender, batch), queue, backoff,
                        metrics, close=sender.close, batch_items=1, batch_bytes=1, linger=0.0)
    if config.queue.spool_directory is not None:
        spool = Spool(Path(config.queue.spool_directory) / "profiles", "profiles",
                      bound.max_spool_bytes, queue.ledger)
        spool.open()
        # a request is already serialized: its file holds it as it is
        delivery.spill_to(Spill(queue, spool, metrics, _only, sender.send, batch_items=1,
                                batch_bytes=1))
    return delivery


def _only(batch: list[bytes]) -> bytes:
    (request,) = batch  # batches of one (batch_items=1)
    return request


def _send_all(sender: ProfilesSender, batch: list[bytes]) -> Outcome:
    for request in batch:  # one a batch (batch_items=1)
        outcome = sender.send(request)
        if not outcome.ok:
            return outcome
    return DELIVERED

