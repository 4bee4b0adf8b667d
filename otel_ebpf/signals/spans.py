"""The spans unit: the probes' kernel events as spans, delivered through a bounded queue
(otel_ebpf.export.traces); each delivered span that is an example of a metric series
becomes one of its exemplars, and what the delivery drops is counted by the agent's
counters.
"""

from __future__ import annotations

from otel_ebpf.export.traces import QueuedSpan, SpanExport, exemplar_of
from otel_ebpf.model import SpanRecord
from otel_ebpf.signals.metrics import MetricsSignal


class SpansSignal:
    def __init__(self, export: SpanExport, metrics: MetricsSignal) -> None:
        self.export = export
        self._metrics = metrics
        export.delivery.metrics.sink = metrics.counters.add
        export.delivery.on_delivered = self._link_exemplars

    def offer(self, records: list[SpanRecord]) -> None:
        if records:
            self.export.offer(records)

    def _link_exemplars(self, delivered: list[QueuedSpan]) -> None:
        """Only a span the collector got can be an exemplar."""
        for queued in delivered:
            if (linked := exemplar_of(queued)) is not None:
                self._metrics.add_exemplar(*linked)

    async def run(self) -> None:
        await self.export.run()

    async def last(self, deadline: float) -> None:
        """Deliver what is queued until `deadline`; the rest is counted as dropped."""
        await self.export.flush(deadline)
