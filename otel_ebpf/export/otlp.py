"""The official OTLP exporters behind one attempt each, and the shipper that tells the
operator about an unreachable collector once per outage. Shared by the metrics and the
span export (the profiles transport is otel_ebpf.export.profile_sender).
"""

from __future__ import annotations

import enum
import inspect
import logging
import os
import re
from collections.abc import Callable
from typing import Any

from otel_ebpf.config import ExporterConfig

log = logging.getLogger(__name__)


class _QuietExporterLogs(logging.Filter):
    """Keeps the OTLP exporters from logging every failed attempt; hands each message to
    the shippers, which say the first one of an outage once. One instance serves every
    shipper: the exporters of both signals share their loggers."""

    LOGGERS = ("opentelemetry.exporter.otlp.proto.grpc.exporter",
               "opentelemetry.exporter.otlp.proto.http.metric_exporter",
               "opentelemetry.exporter.otlp.proto.http.trace_exporter")

    def __init__(self) -> None:
        super().__init__()
        self.listeners: list[Callable[[str], None]] = []
        for name in self.LOGGERS:
            # first: the SDK's DuplicateFilter on these loggers drops a message whose
            # template repeats within 20 s, which would hide every refusal but the first
            logging.getLogger(name).filters.insert(0, self)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            message = record.getMessage()
            for listener in self.listeners:
                listener(message)
            return False
        return True


_quiet_exporter_logs: _QuietExporterLogs | None = None


def _listen_to_exporter_logs(listener: Callable[[str], None]) -> None:
    global _quiet_exporter_logs
    if _quiet_exporter_logs is None:
        _quiet_exporter_logs = _QuietExporterLogs()
    _quiet_exporter_logs.listeners.append(listener)


def make_otlp_exporter(config: ExporterConfig, signal: str = "metrics") -> Any:
    """The official OTLP exporter of `signal` (metrics or traces) for this config."""
    endpoint = config.resolved_endpoint()
    kwargs: dict[str, Any] = {"timeout": config.timeout}
    if config.headers:
        kwargs["headers"] = dict(config.headers)
    if config.protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http import Compression as HttpCompression
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter as HttpMetrics,
        )
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpSpans,
        )

        if config.compression:
            kwargs["compression"] = HttpCompression(config.compression)
        path = f"/v1/{signal}"
        if not endpoint.rstrip("/").endswith(path):
            endpoint = endpoint.rstrip("/") + path
        return (HttpMetrics if signal == "metrics" else HttpSpans)(endpoint=endpoint, **kwargs)

    from grpc import Compression as GrpcCompression
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
        OTLPMetricExporter as GrpcMetrics,
    )
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
        OTLPSpanExporter as GrpcSpans,
    )

    if config.compression:
        kwargs["compression"] = {"none": GrpcCompression.NoCompression,
                                 "gzip": GrpcCompression.Gzip,
                                 "deflate": GrpcCompression.Deflate}[config.compression]
    if config.insecure is not None:
        kwargs["insecure"] = config.insecure
    if signal == "metrics" and _can_set_retryable_codes(GrpcMetrics):
        kwargs["retryable_error_codes"] = _metrics_retryable_codes()
    return (GrpcMetrics if signal == "metrics" else GrpcSpans)(endpoint=endpoint, **kwargs)


_RETRYABLE_CODES_ENV = "OTEL_PYTHON_EXPORTER_OTLP_GRPC_RETRYABLE_ERROR_CODES"


def _can_set_retryable_codes(exporter: type) -> bool:
    return (_RETRYABLE_CODES_ENV not in os.environ
            and "retryable_error_codes" in inspect.signature(exporter).parameters)


def _metrics_retryable_codes() -> frozenset[Any]:
    """The OTLP specification's retryable codes. The exporter also retries
    RESOURCE_EXHAUSTED until its timeout, which is how a collector refuses a request over
    its size limit: the shipper answers that at once, in smaller parts (and a refusal for
    other reasons loses nothing: the next export carries the same cumulative values)."""
    from grpc import StatusCode

    return frozenset({StatusCode.CANCELLED, StatusCode.DEADLINE_EXCEEDED, StatusCode.ABORTED,
                      StatusCode.OUT_OF_RANGE, StatusCode.UNAVAILABLE, StatusCode.DATA_LOSS})


class Sent(enum.Enum):
    OK = "ok"
    TOO_LARGE = "too_large"  # refused for its size: smaller parts may go
    FAILED = "failed"  # the collector did not take it (unreachable, erring, ...)


# how the official exporters report a request refused for its size, as the servers word
# it: RESOURCE_EXHAUSTED "received message larger than max (N vs. LIMIT)" (grpc-go: the
# Collector; grpc-python alike), "gRPC message exceeds maximum size" (grpc-java),
# OUT_OF_RANGE "decoded message length too large: found N bytes, the limit is: LIMIT bytes"
# (tonic: rotel); HTTP 413; the HTTP exporter's own max_request_size. A RESOURCE_EXHAUSTED
# that says nothing of size is a quota: an outage, the next export carries the values.
_TOO_LARGE = re.compile(r"larger than max|exceeds max|too large|code: 413\b", re.IGNORECASE)
_SIZE_LIMIT = re.compile(r"larger than max \(\d+ vs\. (\d+)\)|the limit is: (\d+) bytes")


def refused_limit(message: str) -> int | None:
    """The size limit a refusal message states, if it states one."""
    found = _SIZE_LIMIT.search(message)
    return int(found.group(1) or found.group(2)) if found else None


class OtlpShipper:
    """Sends one signal's batches through an official OTLP exporter and tells the operator
    about an unreachable collector once per outage, not on every export."""

    def __init__(self, exporter: Any, endpoint: str, signal: str = "metrics") -> None:
        self.exporter = exporter
        self.endpoint = endpoint
        self.signal = signal
        self.exported = 0
        self.failed = 0
        self._outage_failures: int | None = None  # None: healthy
        self._closing = False
        self.refusal: str | None = None  # why the last send() was TOO_LARGE
        _listen_to_exporter_logs(self._on_exporter_log)

    def _on_exporter_log(self, message: str) -> None:
        # the exporters' loggers are shared by both signals: attribute only our own
        if self.signal not in message:
            return
        if _TOO_LARGE.search(message):
            self.refusal = message  # a refusal of this request, not an outage
            return
        self._report_outage(message)

    def _report_outage(self, reason: str) -> None:
        if self._outage_failures is not None or self._closing:
            return
        self._outage_failures = 0
        log.warning(
            "cannot export %s to %s (%s). Is a collector listening there? Set "
            "exporter.endpoint or OTEL_EXPORTER_OTLP_ENDPOINT. Retrying quietly; %s",
            self.signal, self.endpoint, reason,
            "values are cumulative, so nothing is lost once it answers." if
            self.signal == "metrics" else
            f"{self.signal} wait in a bounded queue (exporter.queue) until it answers.")

    @property
    def in_outage(self) -> bool:
        """The collector has not taken a request since one failed (a refusal for size is
        no outage)."""
        return self._outage_failures is not None

    def ship(self, data: Any) -> bool:
        """Blocking: run it in an executor."""
        return self.send(data) is Sent.OK

    def send(self, data: Any) -> Sent:
        """Blocking: run it in an executor. Sends one request (the caller keeps it under
        the collector's size limit; TOO_LARGE says it did not, with `refusal`)."""
        self.refusal = None
        result = self.exporter.export(data)
        if result.name == "SUCCESS":
            self.exported += 1
            if self._outage_failures is not None:
                log.info("%s export to %s works again after %d failed exports",
                         self.signal, self.endpoint, self._outage_failures)
                self._outage_failures = None
            return Sent.OK
        self.failed += 1
        if self.refusal is not None and not self._closing:
            return Sent.TOO_LARGE
        self._report_outage(f"{self.signal} export failed")
        if self._outage_failures is not None:
            self._outage_failures += 1
        return Sent.FAILED

    def shutdown(self) -> None:
        """Ends the exporter, abandoning any retry in progress."""
        self._closing = True
        self.exporter.shutdown()
        if self._outage_failures is not None:
            log.warning("exiting with %s undelivered: %s did not answer (%d exports failed)",
                        self.signal, self.endpoint, self.failed)
