"""Span records -> OTLP spans through the official span exporter, behind a bounded queue.

Ids are minted here, when a span is accepted into the queue, so that exemplars only ever
point at spans that were handed to the exporter; a span refused by a full queue is counted
and leaves no exemplar behind.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from otel_ebpf import __version__
from otel_ebpf.model import AttributeValue, Identity, SpanRecord, Workload

SCOPE = InstrumentationScope("otel-ebpf", __version__)
_rng = random.SystemRandom()


@dataclass(slots=True)
class QueuedSpan:
    record: SpanRecord
    trace_id: int
    span_id: int


class SpanQueue:
    """A bounded FIFO of spans waiting for export. Never grows past `capacity`."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.dropped = 0  # refused because the queue was full
        self._items: deque[QueuedSpan] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def offer(self, record: SpanRecord) -> QueuedSpan | None:
        if len(self._items) >= self.capacity:
            self.dropped += 1
            return None
        queued = QueuedSpan(record, _rng.getrandbits(128) or 1, _rng.getrandbits(64) or 1)
        self._items.append(queued)
        return queued

    def take(self, limit: int) -> list[QueuedSpan]:
        return [self._items.popleft() for _ in range(min(limit, len(self._items)))]


def build_spans(
    batch: list[QueuedSpan],
    identity_of: Callable[[Workload], Identity],
) -> list[ReadableSpan]:
    resources: dict[frozenset[tuple[str, AttributeValue]], Resource] = {}
    spans = []
    for q in batch:
        r = q.record
        identity = identity_of(r.workload)
        key = frozenset(identity.resource.items())
        resource = resources.get(key)
        if resource is None:
            resource = resources[key] = Resource(dict(identity.resource))
        span_attrs = {**r.attributes, **identity.point}
        status = (Status(StatusCode.ERROR, r.error_type) if r.error_type
                  else Status(StatusCode.UNSET))
        spans.append(ReadableSpan(
            name=r.name,
            context=SpanContext(q.trace_id, q.span_id, is_remote=False,
                                trace_flags=TraceFlags(TraceFlags.SAMPLED)),
            parent=None,
            resource=resource,
            attributes=span_attrs,
            kind=SpanKind.INTERNAL,
            status=status,
            start_time=r.start_unix_ns,
            end_time=r.end_unix_ns,
            instrumentation_scope=SCOPE,
        ))
    return spans
