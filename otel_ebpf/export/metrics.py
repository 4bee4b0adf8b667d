"""Cumulative series -> OTLP metrics data.

Data points are built directly as the SDK's export data classes (never replayed through
instruments) and handed to the official `OTLPMetricExporter` (otel_ebpf.export.otlp), so
endpoint, TLS, headers, compression, retries and every OTEL_EXPORTER_OTLP_* variable
behave as in any OpenTelemetry component.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from opentelemetry.sdk.metrics import Exemplar
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
from otel_ebpf.model import AttributeValue, Identity, Workload

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
    origin: dict[int, Series] | None = None,
) -> MetricsData:
    """One ResourceMetrics per workload resource, one Metric per name within it. `origin`,
    if given, receives the series of each data point, by the point's id()."""
    now_ns = now_ns or time.time_ns()
    # resource attrs (frozen) -> metric name -> (series, points)
    grouped: dict[frozenset[tuple[str, AttributeValue]], dict[str, list[Any]]] = {}
    first_of: dict[tuple[frozenset[tuple[str, AttributeValue]], str], Series] = {}
    for s in series:
        identity = identity_of(s.workload)
        rkey = frozenset(identity.resource.items())
        attrs = {**s.attributes, **identity.point}
        point = _point(s, attrs, now_ns, exemplars_of(s))
        grouped.setdefault(rkey, {}).setdefault(s.descriptor.name, []).append(point)
        if origin is not None:
            origin[id(point)] = s
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
                           is_monotonic=head.descriptor.monotonic)
            metrics.append(Metric(name=name, description=head.descriptor.description,
                                  unit=head.descriptor.unit, data=data))
        resource_metrics.append(ResourceMetrics(
            resource=Resource(dict(rkey)),
            scope_metrics=[ScopeMetrics(scope=SCOPE, metrics=metrics, schema_url="")],
            schema_url="",
        ))
    return MetricsData(resource_metrics=resource_metrics)
