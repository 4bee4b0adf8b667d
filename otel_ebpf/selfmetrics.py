"""The agent's metrics about itself: what it could not record or deliver. Exported with
the probes' metrics, under the agent's own resource."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping

from otel_ebpf.enrich.identity import AGENT
from otel_ebpf.export.queue import OVERFLOW, Attrs, Whose
from otel_ebpf.model import AttributeValue, CounterDelta, Identity, MetricDescriptor, Workload

LOST_EVENTS = MetricDescriptor(
    "otel_ebpf.probe.lost_events", "{event}",
    "Kernel events a probe could not record, by reason (map_full, no_start, ...).")
SPANS_DROPPED = MetricDescriptor(
    "otel_ebpf.spans.dropped", "{span}",
    "Spans the agent did not deliver, by reason (queue_full, export_refused, shutdown, "
    "spool_full, spool_corrupt, spool_error) and by the workload they came from.")
PROFILES_DROPPED = MetricDescriptor(
    "otel_ebpf.profiles.dropped", "{profile}",
    "Profiles the agent did not deliver, by reason (queue_full, export_refused, "
    "unsupported: the collector has no profiles service, shutdown, spool_full, "
    "spool_corrupt, spool_error) and by the workload they came from.")
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
SPANS_QUEUED = MetricDescriptor(
    "otel_ebpf.spans.queue.size", "{span}",
    "Spans waiting for the collector, in memory and in the spool (an UpDownCounter: the "
    "current depth).",
    monotonic=False)
PROFILES_QUEUED = MetricDescriptor(
    "otel_ebpf.profiles.queue.size", "{profile}",
    "Profiles waiting for the collector, in memory and in the spool (an UpDownCounter: "
    "the current depth).",
    monotonic=False)

# the workload a dropped item came from, as attributes of the drop counter: who it is,
# never which pid (a pid is unbounded under churn)
WORKLOAD_ATTRIBUTES = ("k8s.namespace.name", "k8s.pod.name", "k8s.container.name",
                       "container.name", "service.name", "process.executable.name")
OVERFLOW_ATTRIBUTES: dict[str, AttributeValue] = {"otel.metric.overflow": True}

Resolver = Callable[[Iterable[Workload]], Callable[[Workload], Identity]]
Sink = Callable[[list[CounterDelta]], None]


def workload_attributes(identity: Identity) -> dict[str, AttributeValue]:
    merged = {**identity.resource, **identity.point}
    return {k: merged[k] for k in WORKLOAD_ATTRIBUTES if k in merged}


class DeliveryMetrics:
    """One signal's delivery health as self-metrics, counted the same way for every
    signal: units dropped by reason and workload, and the queue's depth.

    A workload is its identity's attributes (WORKLOAD_ATTRIBUTES); at most `max_workloads`
    distinct ones are kept over the agent's life, the rest share one series marked
    otel.metric.overflow=true, as the OpenTelemetry SDKs do. Blocking (identities are
    resolved from /proc): call `report` from an exporter's thread."""

    def __init__(self, dropped: MetricDescriptor, queued: MetricDescriptor,
                 max_workloads: int, resolver: Resolver) -> None:
        self.dropped = dropped
        self.queued = queued
        self.max_workloads = max_workloads
        self.sink: Sink | None = None  # where the records go (the daemon's store)
        self._resolver = resolver
        self._seen: set[frozenset[tuple[str, AttributeValue]]] = set()
        self._depth = 0  # the depth reported so far
        self._lock = threading.Lock()

    def resolve(self, units: Mapping[Workload, int]) -> dict[Attrs, int]:
        """Units by the attributes of their workload, as the drop counter names it
        (blocking): what a spool file keeps, so that a later run can count its drops."""
        identity_of = self._resolver(w for w in units if w != OVERFLOW)
        resolved: dict[Attrs, int] = {}
        for workload, n in units.items():
            attrs = (OVERFLOW_ATTRIBUTES if workload == OVERFLOW
                     else workload_attributes(identity_of(workload)))
            key = frozenset(attrs.items())
            resolved[key] = resolved.get(key, 0) + n
        return resolved

    def report(self, drops: Mapping[tuple[str, Whose], int], depth: int) -> None:
        with self._lock:
            records = self._drop_records(drops)
            if depth != self._depth:
                records.append(CounterDelta(self.queued, AGENT, {}, depth - self._depth))
                self._depth = depth
        if records and self.sink is not None:
            self.sink(records)

    def _drop_records(self, drops: Mapping[tuple[str, Whose], int]) -> list[CounterDelta]:
        if not drops:
            return []
        identity_of = self._resolver(w for _, w in drops
                                     if isinstance(w, Workload) and w != OVERFLOW)
        merged: dict[frozenset[tuple[str, AttributeValue]], int] = {}
        for (reason, workload), n in drops.items():
            if isinstance(workload, frozenset):  # resolved when it was spooled
                key = workload
            else:
                attrs = (dict(OVERFLOW_ATTRIBUTES) if workload == OVERFLOW
                         else workload_attributes(identity_of(workload)))
                key = frozenset(attrs.items())
            if key not in self._seen:
                if len(self._seen) >= self.max_workloads:
                    key = frozenset(OVERFLOW_ATTRIBUTES.items())
                else:
                    self._seen.add(key)
            key = key | {("reason", reason)}
            merged[key] = merged.get(key, 0) + n
        return [CounterDelta(self.dropped, AGENT, dict(key), n) for key, n in merged.items()]
