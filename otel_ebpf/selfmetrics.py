"""The agent's metrics about itself: what it could not record or deliver. Exported with
the probes' metrics, under the agent's own resource."""

from __future__ import annotations

from otel_ebpf.model import MetricDescriptor

LOST_EVENTS = MetricDescriptor(
    "otel_ebpf.probe.lost_events", "{event}",
    "Kernel events a probe could not record, by reason (map_full, no_start, ...).")
SPANS_DROPPED = MetricDescriptor(
    "otel_ebpf.spans.dropped", "{span}",
    "Spans the agent did not deliver: queue_full, export_failed.")
PROFILES_DROPPED = MetricDescriptor(
    "otel_ebpf.profiles.dropped", "{profile}",
    "Profiles the agent did not deliver: unsupported (the collector has no profiles "
    "service), export_failed.")
METRICS_SERIES = MetricDescriptor(
    "otel_ebpf.metrics.series", "{series}",
    "Series of each metric (attribute metric) in the latest export, its overflow series "
    "included; at most exporter.cardinality_limit + 1.")
METRICS_OVERFLOWED = MetricDescriptor(
    "otel_ebpf.metrics.overflowed", "{point}",
    "Deltas folded into a metric's otel.metric.overflow=true series because the metric "
    "had reached its series limit, by metric.")
METRICS_SPLIT = MetricDescriptor(
    "otel_ebpf.metrics.requests.split", "{request}",
    "Metrics requests sent in smaller parts: max_request (over exporter.max_request_bytes "
    "or max_request_points), refused (the collector refused it as too large).")
METRICS_DROPPED = MetricDescriptor(
    "otel_ebpf.metrics.dropped", "{point}",
    "Data points the agent could not deliver: too_large (alone over "
    "exporter.max_request_bytes), refused (the collector refused it alone as too large).")
