"""Cumulative series -> OTLP metrics, through the official OTLP exporters.

Data points are built directly as the SDK's export data classes (never replayed through
instruments) and handed to `OTLPMetricExporter`, so endpoint, TLS, headers, compression,
retries and every OTEL_EXPORTER_OTLP_* variable behave as in any OpenTelemetry component.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from opentelemetry.sdk.metrics._internal.exemplar import Exemplar
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Buckets,
    ExponentialHistogram,
    ExponentialHistogramDataPoint,
    Metric,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from otel_ebpf import __version__
from otel_ebpf.aggregate import Series
from otel_ebpf.config import ExporterConfig
from otel_ebpf.model import AttributeValue, Identity, Workload

log = logging.getLogger(__name__)

SCOPE = InstrumentationScope("otel-ebpf", __version__)
CUMULATIVE = AggregationTemporality.CUMULATIVE



def _point(series: Series, attrs: Mapping[str, AttributeValue], now_ns: int,
           exemplars: list[Exemplar]) -> Any:
    if series.is_histogram:
        return ExponentialHistogramDataPoint(
            attributes=dict(attrs),
            start_time_unix_nano=series.start_ns,
            time_unix_nano=now_ns,
            count=series.count,
            sum=series.sum,
            scale=series.scale,
            zero_count=series.zero_count,
            positive=Buckets(offset=series.offset, bucket_counts=list(series.bucket_counts or [])),
            negative=Buckets(offset=0, bucket_counts=[]),
            flags=0,
            min=series.min,
            max=series.max,
            exemplars=exemplars,
        )
    return NumberDataPoint(
        attributes=dict(attrs),
        start_time_unix_nano=series.start_ns,
        time_unix_nano=now_ns,
        value=series.value,
    )


def build_metrics_data(
    series: Iterable[Series],
    identity_of: Callable[[Workload], Identity],
    now_ns: int | None = None,
    exemplars_of: Callable[[Series], list[Exemplar]] = lambda _: [],
) -> MetricsData:
    """One ResourceMetrics per workload resource, one Metric per name within it."""
    now_ns = now_ns or time.time_ns()
    # resource attrs (frozen) -> metric name -> (series, points)
    grouped: dict[frozenset[tuple[str, AttributeValue]], dict[str, list[Any]]] = {}
    first_of: dict[tuple[frozenset[tuple[str, AttributeValue]], str], Series] = {}
    for s in series:
        identity = identity_of(s.workload)
        rkey = frozenset(identity.resource.items())
        attrs = {**s.attributes, **identity.point}
        grouped.setdefault(rkey, {}).setdefault(s.descriptor.name, []).append(
            _point(s, attrs, now_ns, exemplars_of(s))
        )
        first_of.setdefault((rkey, s.descriptor.name), s)

    resource_metrics = []
    for rkey, by_name in grouped.items():
        metrics = []
        for name, points in by_name.items():
            head = first_of[(rkey, name)]
            data: Any
            if head.is_histogram:
                data = ExponentialHistogram(data_points=points, aggregation_temporality=CUMULATIVE)
            else:
                data = Sum(data_points=points, aggregation_temporality=CUMULATIVE,
                           is_monotonic=True)
            metrics.append(Metric(name=name, description=head.descriptor.description,
                                  unit=head.descriptor.unit, data=data))
        resource_metrics.append(ResourceMetrics(
            resource=Resource(dict(rkey)),
            scope_metrics=[ScopeMetrics(scope=SCOPE, metrics=metrics, schema_url="")],
            schema_url="",
        ))
    return MetricsData(resource_metrics=resource_metrics)


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
            logging.getLogger(name).addFilter(self)

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
    return (GrpcMetrics if signal == "metrics" else GrpcSpans)(endpoint=endpoint, **kwargs)


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
        _listen_to_exporter_logs(self._report_outage)

    def _report_outage(self, reason: str) -> None:
        # the exporters' loggers are shared by both signals: attribute only our own
        if self._outage_failures is not None or self._closing or self.signal not in reason:
            return
        self._outage_failures = 0
        log.warning(
            "cannot export %s to %s (%s). Is a collector listening there? Set "
            "exporter.endpoint or OTEL_EXPORTER_OTLP_ENDPOINT. Retrying quietly; %s",
            self.signal, self.endpoint, reason,
            "values are cumulative, so nothing is lost once it answers." if
            self.signal == "metrics" else "spans that cannot be sent are counted as dropped.")

    def ship(self, data: Any) -> bool:
        """Blocking: run it in an executor."""
        result = self.exporter.export(data)
        if result.name == "SUCCESS":
            self.exported += 1
            if self._outage_failures is not None:
                log.info("%s export to %s works again after %d failed exports",
                         self.signal, self.endpoint, self._outage_failures)
                self._outage_failures = None
            return True
        self.failed += 1
        self._report_outage(f"{self.signal} export failed")
        if self._outage_failures is not None:
            self._outage_failures += 1
        return False

    def shutdown(self) -> None:
        """Ends the exporter, abandoning any retry in progress."""
        self._closing = True
        self.exporter.shutdown()
        if self._outage_failures is not None:
            log.warning("exiting with %s undelivered: %s did not answer (%d exports failed)",
                        self.signal, self.endpoint, self.failed)
