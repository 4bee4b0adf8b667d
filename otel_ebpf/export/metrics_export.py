"""The metrics side of the agent: once per interval, the store's series in requests a
collector accepts.

Each export is split under exporter.max_request_bytes and max_request_points
(otel_ebpf.export.split); a request the collector still refuses as too large is sent
again in smaller parts, and the agent sends smaller requests from then on. A series is
marked exported only once its point was delivered (or can never be), so an export that
fails part-way loses nothing: the next one carries the same cumulative values. What cannot
go is counted in otel_ebpf.metrics.dropped, never silently lost.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from opentelemetry.sdk.metrics.export import (
    Gauge,
    Metric,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.resources import Resource

from otel_ebpf.aggregate import CumulativeStore, Series
from otel_ebpf.config import ExporterConfig
from otel_ebpf.enrich.identity import AGENT
from otel_ebpf.export.metrics import SCOPE, build_metrics_data
from otel_ebpf.export.otlp import OtlpShipper, Sent, refused_limit
from otel_ebpf.export.split import count_points, iter_points, request_size, split_metrics
from otel_ebpf.model import CounterDelta, Identity, Workload
from otel_ebpf.selfmetrics import (
    METRICS_DROPPED,
    METRICS_OVERFLOWED,
    METRICS_SERIES,
    METRICS_SPLIT,
)

log = logging.getLogger(__name__)

# a refusal never makes requests smaller than this: a collector refusing even these has
# another reason (a quota), and the next export carries the same cumulative values
MIN_REQUEST_BYTES = 16_384


class MetricsExport:
    """One export at a time (the daemon's export thread); counts what it splits and drops
    into the store, which exports them with the next export."""

    def __init__(self, store: CumulativeStore, shipper: OtlpShipper,
                 resolver: Callable[[Iterable[Workload]], Callable[[Workload], Identity]],
                 config: ExporterConfig, start_ns: int,
                 agent_metrics: Callable[[int], list[Metric]] | None = None) -> None:
        self.store = store
        # the agent's own metrics read at export time (process, map fill), by start time
        self.agent_metrics = agent_metrics
        self.shipper = shipper
        self.max_bytes = config.max_request_bytes  # lowered when a collector refuses
        self.max_points = config.max_request_points
        self._resolver = resolver
        self._start_ns = start_ns
        self.splits: Counter[str] = Counter()  # reason -> requests split, untaken
        self.drops: Counter[str] = Counter()  # reason -> points dropped, untaken
        self._said: set[str] = set()  # drop reasons logged once
        self._at_limit: set[str] = set()  # metrics whose limit was logged
        self.last_requests = 0  # requests the latest export took

    def export_once(self) -> bool:
        """Blocking: run it in an executor. False: a request failed (the collector did not
        answer); what was not delivered goes with the next export."""
        self._count(METRICS_OVERFLOWED, "metric", self.store.take_overflowed())
        series = self.store.series()
        if not series:
            return True
        identity_of = self._resolver(s.workload for s in series)
        origin: dict[int, Series] = {}
        data = build_metrics_data(series, identity_of, exemplars_of=self.store.exemplars_of,
                                  origin=origin)
        data = with_series_gauge(data, identity_of(AGENT).resource, self._start_ns,
                                 self.agent_metrics(self._start_ns) if self.agent_metrics
                                 else [])
        handled: list[Any] = []  # points delivered, or that never can be
        ok = self._deliver(data, handled)
        self.store.mark_exported(origin[id(p)] for p in handled if id(p) in origin)
        self._count(METRICS_SPLIT, "reason", self.splits)
        self._count(METRICS_DROPPED, "reason", self.drops)
        self.splits.clear()
        self.drops.clear()
        return ok

    def _deliver(self, data: MetricsData, handled: list[Any]) -> bool:
        split = split_metrics(data, self.max_bytes, self.max_points)
        if len(split.parts) > 1:
            self.splits["max_request"] += 1
        for part, size in split.oversized:
            self._drop("too_large", part, size, handled)
        log.debug("metrics export: %d points, %d requests, %d bytes at most",
                  count_points(data), len(split.parts), split.size)
        self.last_requests = 0
        # (part, its size at most), in order; a refused part's pieces go first
        pending = list(zip(split.parts, split.sizes, strict=True))[::-1]
        while pending:
            part, size = pending.pop()
            if size > self.max_bytes and count_points(part) > 1:
                # sized before a refusal lowered the bound: it would be refused too
                pending.extend(self._pieces(part, self.max_bytes)[::-1])
                continue
            self.last_requests += 1
            sent = self.shipper.send(part)
            if sent is Sent.OK:
                handled.extend(iter_points(part))
                continue
            pieces = None if sent is Sent.FAILED else self._refused(part, handled)
            if pieces is None:
                return False  # the rest waits for the next export
            pending.extend(pieces[::-1])
        return True

    def _refused(self, part: MetricsData, handled: list[Any]
                 ) -> list[tuple[MetricsData, int]] | None:
        """The pieces to send instead of a part the collector refused as too large; None
        when it was not its size (no collector's limit is that low)."""
        size = request_size(part)
        if size <= MIN_REQUEST_BYTES:
            return None
        if count_points(part) == 1:
            self._drop("refused", part, size, handled)
            return []
        self.splits["refused"] += 1
        self._learn(size, self.shipper.refusal or "")
        return self._pieces(part, min(self.max_bytes, size - 1))

    def _pieces(self, part: MetricsData, bound: int) -> list[tuple[MetricsData, int]]:
        """`part` in pieces under `bound`, a point too large for it alone as a piece of
        its own (it may yet go: the bound is ours, not the collector's)."""
        split = split_metrics(part, bound, self.max_points)
        return list(zip(split.parts, split.sizes, strict=True)) + split.oversized

    def _learn(self, size: int, refusal: str) -> None:
        """Lower the bound under the collector's limit, from a refusal of `size` bytes:
        the limit the refusal states, else half the request; kept for later exports."""
        stated = refused_limit(refusal)
        bound = stated * 15 // 16 if stated is not None and stated < size else size // 2
        bound = max(MIN_REQUEST_BYTES, bound)
        if bound < self.max_bytes:
            log.warning("%s refused a metrics request of %d bytes as too large (%s); sending "
                        "requests of at most %d bytes from now on. Set "
                        "exporter.max_request_bytes under the collector's limit.",
                        self.shipper.endpoint, size, refusal, bound)
            self.max_bytes = bound

    def _drop(self, reason: str, part: MetricsData, size: int, handled: list[Any]) -> None:
        points = list(iter_points(part))
        handled.extend(points)  # sending it again would fail again
        self.drops[reason] += len(points)
        names = sorted({m.name for rm in part.resource_metrics for sm in rm.scope_metrics
                        for m in sm.metrics})
        (log.debug if reason in self._said else log.warning)(
            "metrics: a data point of %s takes %d bytes alone, %s; dropped (counted in %s)",
            ", ".join(names), size,
            "over exporter.max_request_bytes" if reason == "too_large"
            else "and the collector refused it as too large", METRICS_DROPPED.name)
        self._said.add(reason)

    def _count(self, descriptor: Any, attribute: str, counts: dict[str, int]) -> None:
        if not counts:
            return
        if descriptor is METRICS_OVERFLOWED:
            self._say_limits(counts)
        now = time.time_ns()
        self.store.add([CounterDelta(descriptor, AGENT, {attribute: key}, n)
                        for key, n in counts.items() if n], self._start_ns, now)

    def _say_limits(self, overflowed: dict[str, int]) -> None:
        limit = self.store.limit
        for metric in overflowed.keys() - self._at_limit:
            self._at_limit.add(metric)
            log.warning("metric %s reached its limit of %d series: further series fold into "
                        "its series with otel.metric.overflow=true (counted in %s; "
                        "exporter.cardinality_limits raises it)", metric,
                        limit.limit(metric) if limit else 0, METRICS_OVERFLOWED.name)


def with_series_gauge(data: MetricsData, agent: Any, start_ns: int,
                      extra: Sequence[Metric] = ()) -> MetricsData:
    """`data` plus otel_ebpf.metrics.series: how many series of each metric it holds, and
    `extra` metrics, on the agent's resource (`agent`: its attributes)."""
    counts: Counter[str] = Counter()
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                counts[m.name] += len(m.data.data_points)
    now = time.time_ns()
    gauge = Metric(
        name=METRICS_SERIES.name, description=METRICS_SERIES.description,
        unit=METRICS_SERIES.unit,
        data=Gauge(data_points=[NumberDataPoint(attributes={"metric": name},
                                                start_time_unix_nano=start_ns,
                                                time_unix_nano=now, value=n)
                                for name, n in sorted(counts.items())]))
    resource = Resource(dict(agent))
    resource_metrics = list(data.resource_metrics)
    for i, rm in enumerate(resource_metrics):
        if rm.resource == resource:
            first, *rest = rm.scope_metrics
            resource_metrics[i] = ResourceMetrics(
                resource=rm.resource, schema_url=rm.schema_url,
                scope_metrics=[ScopeMetrics(scope=first.scope, schema_url=first.schema_url,
                                            metrics=[*first.metrics, gauge, *extra]),
                              *rest])
            break
    else:
        resource_metrics.append(ResourceMetrics(
            resource=resource, schema_url="",
            scope_metrics=[ScopeMetrics(scope=SCOPE, metrics=[gauge, *extra], schema_url="")]))
    return MetricsData(resource_metrics=resource_metrics)
