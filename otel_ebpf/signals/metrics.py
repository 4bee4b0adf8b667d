"""The metrics unit: every probe's records become cumulative series, exported every
interval; and the agent's one way of counting what it lost or dropped.

What it owns: the series store (the probes' deltas, the agent's own counters, the
exemplars of delivered spans), the kernel maps' fill, the export (otel_ebpf.export.
metrics_export) on the shared periodic runner, and the fast retry after an outage: once
the collector answers again, the next export does not wait for the interval.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from opentelemetry.sdk.metrics import Exemplar
from opentelemetry.sdk.metrics.export import Metric

from otel_ebpf.aggregate import CumulativeStore
from otel_ebpf.cardinality import SeriesLimit
from otel_ebpf.config import ExporterConfig
from otel_ebpf.enrich.identity import AGENT
from otel_ebpf.export.agent_metrics import MapFill, process_metrics, setting_metrics
from otel_ebpf.export.metrics_export import MetricsExport
from otel_ebpf.export.otlp import OtlpShipper
from otel_ebpf.export.queue import Backoff
from otel_ebpf.export.transport import OneAttempt, until_answered
from otel_ebpf.model import AttributeValue, Collection, CounterDelta, Setting, Workload
from otel_ebpf.periodic import Periodic
from otel_ebpf.selfmetrics import LOST_EVENTS, Resolver

log = logging.getLogger(__name__)

# a gone process's series, and any aggregated workload's, is forgotten once exported and
# this long without a delta
EXPIRE_QUIET_S = 60.0


class AgentCounters:
    """The one way the agent counts what it could not record or deliver - a probe's lost
    events, a delivery's dropped spans and profiles - as cumulative counters on its own
    resource, in the series store; they go with the next export. Thread-safe."""

    def __init__(self, store: CumulativeStore, start_ns: int) -> None:
        self.store = store
        self.start_ns = start_ns

    def add(self, records: list[CounterDelta]) -> None:
        if records:
            self.store.add(records, self.start_ns, time.time_ns())

    def lost_events(self, probe: str, counts: dict[str, int]) -> None:
        self.add([CounterDelta(LOST_EVENTS, AGENT, {"probe": probe, "reason": reason}, n)
                  for reason, n in counts.items()])


class MetricsSignal:
    """Records in, OTLP metrics out. `shipper` None: nothing is exported (the store still
    takes records: the summary and the agent's counters need no collector)."""

    def __init__(self, exporter: ExporterConfig, shipper: OtlpShipper | None,
                 resolver: Resolver, alive: Callable[[Workload], bool],
                 exemplars_per_series: int, settings: Callable[[], list[Setting]],
                 start_ns: int) -> None:
        limit = SeriesLimit(exporter.cardinality_limit, exporter.cardinality_limits)
        self.store = CumulativeStore(exemplars_per_series=exemplars_per_series, limit=limit)
        self.counters = AgentCounters(self.store, start_ns)
        self.map_fill = MapFill()
        self.shipper = shipper
        self._settings = settings
        self._alive = alive  # blocking: whether a workload is still there
        self._retry = exporter.retry
        self.export = None if shipper is None else MetricsExport(
            self.store, shipper, resolver, exporter, start_ns, self._agent_metrics)
        self.periodic: Periodic[bool] = Periodic("export", exporter.interval,
                                                 self._export_once, self._after_export)

    @property
    def endpoint(self) -> str:
        return self.shipper.endpoint if self.shipper else "nowhere (exporter disabled)"

    def absorb(self, collection: Collection) -> None:
        """One probe's collection: its records, its lost events, its maps' fill. A series
        new in its window (a new workload, or one forgotten when quiet and counted again)
        starts with the window: its values never go down against its start time."""
        now = time.time_ns()
        self.store.add(collection.records, collection.window_start_ns or now, now)
        self.map_fill.update(collection.probe, collection.map_fill)
        self.counters.lost_events(collection.probe, collection.lost_events)

    def add_exemplar(self, metric: str, workload: Workload,
                     attributes: dict[str, AttributeValue], exemplar: Exemplar) -> None:
        self.store.add_exemplar(metric, workload, attributes, exemplar)

    def _agent_metrics(self, start_ns: int) -> list[Metric]:
        """The agent's own metrics read at each export: process, map fill, settings."""
        return (process_metrics(start_ns) + self.map_fill.metrics(start_ns)
                + setting_metrics(self._settings(), start_ns))

    # ---- export ----------------------------------------------------------------------

    def _export_once(self) -> bool:
        """Blocking. False: it failed in a way worth retrying before the interval."""
        assert self.export is not None
        if self.export.export_once():
            self.store.expire(self._alive, time.time_ns(), int(EXPIRE_QUIET_S * 1e9))
            return True
        exporter: Any = self.shipper and self.shipper.exporter
        return not (isinstance(exporter, OneAttempt) and exporter.outcome.retryable)

    async def _after_export(self, ok: bool | None) -> None:
        # the collector is away: as soon as it answers, export (once: a failure then waits
        # for the interval, so a collector that answers empty exports but fails real ones
        # never makes the agent rebuild its export in a loop)
        if ok is False:
            assert self.shipper is not None and isinstance(self.shipper.exporter, OneAttempt)
            await until_answered(self.shipper.exporter, self.periodic.pool,
                                 Backoff(self._retry.initial_backoff, self._retry.max_backoff))
            await self.periodic.once()

    async def run(self) -> None:
        if self.export is not None:
            await self.periodic.run()

    async def last(self, deadline: float) -> None:
        """The final export, until `deadline`; a collector that does not answer in time is
        abandoned (its retries are cancelled by shutting the exporter down)."""
        if self.shipper is None:
            return
        if self.periodic.busy:
            # the collector is not answering: waiting for it would only delay the exit
            log.warning("an export to %s was still retrying at shutdown; final flush skipped",
                        self.shipper.endpoint)
        elif not await self.periodic.last(deadline):
            log.warning("final export to %s did not finish in time; dropped",
                        self.shipper.endpoint)
        self.shipper.shutdown()

    def close(self) -> None:
        self.periodic.close()
