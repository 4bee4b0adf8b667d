"""/metrics: the agent's metrics as Prometheus metric families, through prometheus_client.

The source is what the OTLP export sends (otel_ebpf.export.metrics.build_metrics_data over
the cumulative store, plus the agent's own metrics), so a scrape and an export read the
same values. Conversion, by the OpenTelemetry specification:

- a monotonic cumulative Sum is a counter (`..._total`), a non-monotonic one a gauge;
- an exponential histogram is a classic histogram whose `le` boundaries are the upper
  boundaries of its own buckets (base 2^(2^-scale)): every cumulative count is the exact
  count of the kernel's buckets up to that boundary, nothing is interpolated. A series
  exposes the boundaries from its lowest to its highest populated bucket (and `+Inf`); as
  its counts are cumulative, that span only grows;
- point attributes are labels; of the resource, only the attributes that identify the
  workload (IDENTIFYING) are: never a command line, an environment value or whatever else a
  resource may carry (`resource_attributes` from the environment, cloud metadata).

Samples of one family that end up with the same labels (two resources alike in their
identifying attributes) are added together; counts and histograms stay exact.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from opentelemetry.sdk.metrics.export import (
    ExponentialHistogram,
    ExponentialHistogramDataPoint,
    Gauge,
    MetricsData,
    Sum,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from otel_ebpf.endpoints.naming import labels_of, metric_name
from otel_ebpf.histogram import bucket_upper_bound
from otel_ebpf.model import AttributeValue

log = logging.getLogger(__name__)

# resource attributes that say which workload a series is (bounded: one value per host,
# container, pod or cgroup), promoted to labels
IDENTIFYING = (
    "service.name", "service.namespace", "host.name",
    "container.id", "container.name",
    "k8s.namespace.name", "k8s.pod.name", "k8s.container.name",
    "linux.cgroup.path", "linux.cgroup.id",
    "process.pid", "process.executable.name",
)
# point attributes that may hold what a process was given (its arguments, environment):
# never labels, whatever a future identity puts on points
NEVER_LABELS = frozenset({"process.command", "process.command_line", "process.command_args",
                          "process.environ", "process.executable.path", "process.owner"})

LabelKey = tuple[tuple[str, str], ...]
# `le` as Go formats floats, as every Prometheus client writes it (Prometheus 2 compares
# the label as a string)
_go_float = cast(Callable[[float], str], floatToGoString)


@dataclass
class _Histogram:
    scale: int
    buckets: dict[int, int] = field(default_factory=dict)  # index -> count
    zero_count: int = 0
    count: int = 0
    sum: float = 0.0

    def add(self, point: ExponentialHistogramDataPoint) -> None:
        if point.scale != self.scale:  # a probe keeps one scale (the store enforces it)
            raise ValueError(f"histogram scales {self.scale} and {point.scale} in one family")
        for i, c in enumerate(point.positive.bucket_counts):
            if c:
                index = point.positive.offset + i
                self.buckets[index] = self.buckets.get(index, 0) + c
        self.zero_count += point.zero_count
        self.count += point.count
        self.sum += point.sum

    def classic(self) -> list[tuple[str, float]]:
        """Cumulative (le, count) pairs at the exact bucket boundaries, then +Inf."""
        out: list[tuple[str, float]] = []
        if self.buckets:
            seen = self.zero_count
            for index in range(min(self.buckets), max(self.buckets) + 1):
                seen += self.buckets.get(index, 0)
                out.append((_go_float(bucket_upper_bound(index, self.scale)), seen))
        elif self.zero_count:
            out.append(("0.0", self.zero_count))
        out.append(("+Inf", self.count))
        return out


@dataclass
class _Family:
    kind: str  # counter, gauge or histogram
    name: str
    unit: str
    help: str
    samples: dict[LabelKey, Any] = field(default_factory=dict)
    created: dict[LabelKey, float] = field(default_factory=dict)

    def build(self) -> Metric:
        names = sorted({k for key in self.samples for k, _ in key})
        family: Any
        if self.kind == "counter":
            family = CounterMetricFamily(self.name, self.help, labels=names, unit=self.unit)
        elif self.kind == "gauge":
            family = GaugeMetricFamily(self.name, self.help, labels=names, unit=self.unit)
        else:
            family = HistogramMetricFamily(self.name, self.help, labels=names, unit=self.unit)
        for key, value in sorted(self.samples.items()):
            labels = dict(key)
            values = [labels.get(n, "") for n in names]
            if self.kind == "counter":
                family.add_metric(values, value, created=self.created.get(key))
            elif self.kind == "gauge":
                family.add_metric(values, value)
            else:
                family.add_metric(values, value.classic(), value.sum)
        return family  # type: ignore[no-any-return]


def _labels(point_attributes: Mapping[str, AttributeValue],
            resource: Mapping[str, AttributeValue]) -> LabelKey:
    merged = {k: v for k, v in resource.items() if k in IDENTIFYING}
    merged.update((k, v) for k, v in point_attributes.items() if k not in NEVER_LABELS)
    return tuple(sorted(labels_of(merged).items()))


def families(data: MetricsData) -> list[Metric]:
    """Prometheus metric families of every metric in `data`."""
    by_name: dict[str, _Family] = {}
    for rm in data.resource_metrics:
        resource = rm.resource.attributes
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                _add(by_name, metric, resource)
    return [by_name[name].build() for name in sorted(by_name)]


def _add(by_name: dict[str, _Family], metric: Any, resource: Mapping[str, Any]) -> None:
    data = metric.data
    if isinstance(data, Sum) and data.is_monotonic:
        kind = "counter"
    elif isinstance(data, Sum | Gauge):
        kind = "gauge"
    elif isinstance(data, ExponentialHistogram):
        kind = "histogram"
    else:
        log.debug("/metrics: %s (%s) has no Prometheus form here", metric.name,
                  type(data).__name__)
        return
    name, unit = metric_name(metric.name, metric.unit or "", gauge=kind == "gauge")
    family = by_name.get(name)
    if family is None:
        family = by_name[name] = _Family(kind, name, unit, metric.description or metric.name)
    elif family.kind != kind:
        log.debug("/metrics: %s is a %s and a %s; the %s is left out", name, family.kind,
                  kind, kind)
        return
    for point in data.data_points:
        key = _labels(point.attributes or {}, resource)
        if kind == "histogram":
            histogram = family.samples.get(key)
            if histogram is None:
                histogram = family.samples[key] = _Histogram(point.scale)
            histogram.add(point)
        elif kind == "counter" or isinstance(data, Sum):
            family.samples[key] = family.samples.get(key, 0) + point.value
            start = point.start_time_unix_nano / 1e9
            family.created[key] = min(family.created.get(key, start), start)
        else:
            family.samples[key] = point.value


class MetricsCollector:
    """A prometheus_client custom collector: each collect() reads a fresh snapshot."""

    def __init__(self, snapshot: Callable[[], MetricsData]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        yield from families(self.snapshot())
