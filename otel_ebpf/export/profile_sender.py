"""Sends ExportProfilesServiceRequest over OTLP gRPC (the generated ProfilesServiceStub) or
OTLP/HTTP (POST /v1development/profiles).

The SDK has no profiles exporter yet, so this is the one transport the agent owns. It
follows the same config as the metrics exporter: endpoint, protocol, headers, insecure,
compression, timeout. A collector without profiles support (gRPC UNIMPLEMENTED, HTTP 404)
is reported once; its profiles are counted as dropped and metrics and traces carry on.
"""

from __future__ import annotations

import gzip
import logging
import os
import urllib.error
import urllib.request
from urllib.parse import urlparse

import grpc
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2_grpc import (
    ProfilesServiceStub,
)

from otel_ebpf.config import ExporterConfig

log = logging.getLogger(__name__)
HTTP_PATH = "/v1development/profiles"


class ProfilesSender:
    def __init__(self, config: ExporterConfig) -> None:
        self.config = config
        self.endpoint = config.resolved_endpoint()
        self.sent = 0
        self.dropped = 0  # profiles (not requests) that did not reach the collector
        self.unsupported = False
        self._failing = False
        self._channel: grpc.Channel | None = None
        self._stub: ProfilesServiceStub | None = None

    def _grpc_stub(self) -> ProfilesServiceStub:
        if self._stub is None:
            url = urlparse(self.endpoint if "://" in self.endpoint else f"//{self.endpoint}")
            target = url.netloc or url.path
            insecure = self.config.insecure
            if insecure is None:
                insecure = url.scheme != "https"
            compression = grpc.Compression.Gzip if self.config.compression == "gzip" else None
            if insecure:
                self._channel = grpc.insecure_channel(target, compression=compression)
            else:
                ca_path = os.environ.get("OTEL_EXPORTER_OTLP_CERTIFICATE")
                ca = open(ca_path, "rb").read() if ca_path else None  # noqa: SIM115
                self._channel = grpc.secure_channel(
                    target, grpc.ssl_channel_credentials(root_certificates=ca),
                    compression=compression)
            self._stub = ProfilesServiceStub(self._channel)  # type: ignore[no-untyped-call]
        return self._stub

    def send(self, request: ExportProfilesServiceRequest) -> bool:
        """Blocking: run it in an executor."""
        profiles = sum(len(sp.profiles) for rp in request.resource_profiles
                       for sp in rp.scope_profiles)
        if not profiles:
            return True
        try:
            if self.config.protocol == "grpc":
                self._send_grpc(request)
            else:
                self._send_http(request)
        except _Unsupported as exc:
            self.dropped += profiles
            if not self.unsupported:
                log.warning("the collector at %s does not accept OTLP profiles (%s); "
                            "profiles are dropped and counted, metrics and traces go on. Use "
                            "a collector with profiles support (OpenTelemetry Collector with "
                            "--feature-gates=service.profilesSupport)", self.endpoint, exc)
                self.unsupported = True
            return False
        except Exception as exc:
            self.dropped += profiles
            if not self._failing:
                log.warning("cannot export profiles to %s (%s); retrying quietly, next "
                            "message when it works", self.endpoint, exc)
                self._failing = True
            return False
        self.sent += profiles
        if self._failing or self.unsupported:
            log.info("profiles export to %s works again", self.endpoint)
        self._failing = self.unsupported = False
        return True

    def _send_grpc(self, request: ExportProfilesServiceRequest) -> None:
        metadata = [(k.lower(), v) for k, v in self.config.headers.items()]
        try:
            self._grpc_stub().Export(request, timeout=self.config.timeout, metadata=metadata)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise _Unsupported("gRPC UNIMPLEMENTED") from exc
            raise RuntimeError(f"{exc.code().name}: {exc.details()}") from exc

    def _send_http(self, request: ExportProfilesServiceRequest) -> None:
        url = self.endpoint.rstrip("/")
        if not url.endswith(HTTP_PATH):
            url += HTTP_PATH
        body = request.SerializeToString()
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
                raise _Unsupported(f"HTTP {exc.code} for {url}") from exc
            raise RuntimeError(f"HTTP {exc.code}") from exc

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
            self._stub = None


class _Unsupported(Exception):
    """The collector answered that it has no profiles service."""
