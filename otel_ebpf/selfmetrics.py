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
