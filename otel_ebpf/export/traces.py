"""Span records -> OTLP spans through the official span exporter, behind a bounded queue.

Ids are minted here, when a span is queued. Exemplars are linked once a span was
delivered (Delivery.on_delivered), so they only ever point at spans the collector got; a
span dropped from the queue leaves no exemplar behind, and neither does one that went
through the spool (by its delivery the histogram has moved on).

Spans spilled to the spool (exporter.queue.spool_directory) are written as the
ExportTraceServiceRequest the exporter would send, identities resolved when written; read
back, they are turned into spans again and sent through the same exporter.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.sdk.metrics import Exemplar
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from otel_ebpf import __version__
from otel_ebpf.config import ExporterConfig
from otel_ebpf.export.delivery import Delivery
from otel_ebpf.export.otlp import OtlpShipper
from otel_ebpf.export.queue import (
    DELIVERED,
    SPOOL_CORRUPT,
    Backoff,
    BoundedQueue,
    DropLedger,
    Entry,
    Outcome,
)
from otel_ebpf.export.spill import Spill
from otel_ebpf.export.spool import Spool
from otel_ebpf.model import AttributeValue, Identity, SpanRecord, Workload
from otel_ebpf.selfmetrics import SPANS_DROPPED, SPANS_QUEUED, DeliveryMetrics, Resolver

log = logging.getLogger(__name__)
SCOPE = InstrumentationScope("otel-ebpf", __version__)
_rng = random.SystemRandom()


@dataclass(slots=True)
class QueuedSpan:
    record: SpanRecord
    trace_id: int
    span_id: int


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


def decode_spans(payload: bytes) -> list[ReadableSpan]:
    """An ExportTraceServiceRequest as written by `encode_spans`, as spans again."""
    request = ExportTraceServiceRequest.FromString(payload)
    spans = []
    for resource_spans in request.resource_spans:
        resource = Resource(_attributes(resource_spans.resource.attributes))
        for scope_spans in resource_spans.scope_spans:
            scope = InstrumentationScope(scope_spans.scope.name, scope_spans.scope.version)
            for span in scope_spans.spans:
                spans.append(ReadableSpan(
                    name=span.name,
                    context=SpanContext(int.from_bytes(span.trace_id, "big"),
                                        int.from_bytes(span.span_id, "big"), is_remote=False,
                                        trace_flags=TraceFlags(TraceFlags.SAMPLED)),
                    parent=None,
                    resource=resource,
                    attributes=_attributes(span.attributes),
                    kind=SpanKind(max(0, span.kind - 1)),  # OTLP counts from UNSPECIFIED
                    status=Status(StatusCode(span.status.code),
                                  span.status.message or None),
                    start_time=span.start_time_unix_nano,
                    end_time=span.end_time_unix_nano,
                    instrumentation_scope=scope,
                ))
    return spans


def _attributes(pairs: Iterable[KeyValue]) -> dict[str, AttributeValue]:
    return {kv.key: _value(kv.value) for kv in pairs}


def _value(value: AnyValue) -> AttributeValue:
    kind = value.WhichOneof("value")
    if kind == "bool_value":
        return value.bool_value
    if kind == "int_value":
        return value.int_value
    if kind == "double_value":
        return value.double_value
    return value.string_value  # the only other kind spans of this agent carry


SPAN_BATCH = 512
SPAN_BATCH_BYTES = 4 << 20  # estimated, as queued (the OTLP request is smaller)
SPAN_EXPORT_S = 0.5  # the longest a queued span waits for a batch to fill


def span_bytes(record: SpanRecord) -> int:
    """What a queued span holds in memory, estimated: ~1,210 bytes measured with
    tracemalloc for a slow-syscall span of four attributes (the record, its attribute
    dict, workload and exemplar key, the ids, the queue entry); ~120 more an attribute,
    and a long string's own length (a code.stacktrace is kilobytes)."""
    long_strings = sum(len(v) for v in record.attributes.values()
                       if isinstance(v, str) and len(v) > 64)
    return 730 + 120 * len(record.attributes) + len(record.name) + long_strings


class SpanExport:
    """The span side of the agent: ids are minted as spans are queued, and the queue, its
    bounds, the retry and the drop counts are the span Delivery's
    (otel_ebpf/export/delivery.py). Exporting the batches is one attempt each through the
    official OTLP span exporter."""

    def __init__(self, shipper: OtlpShipper, config: ExporterConfig,
                 resolver: Resolver) -> None:
        self.shipper = shipper
        self._resolver = resolver
        bound = config.queue.spans
        metrics = DeliveryMetrics(SPANS_DROPPED, SPANS_QUEUED, config.queue.max_workloads,
                                  resolver)
        queue: BoundedQueue[QueuedSpan] = BoundedQueue(bound.max_items, bound.max_bytes,
                                                       DropLedger())
        backoff = Backoff(config.retry.initial_backoff, config.retry.max_backoff)
        self.delivery = Delivery("spans", self._send, queue, backoff, metrics,
                                 close=shipper.shutdown, batch_items=SPAN_BATCH,
                                 batch_bytes=SPAN_BATCH_BYTES, linger=SPAN_EXPORT_S,
                                 say_outage=False)  # the shipper says it
        if config.queue.spool_directory is not None:  # SpoolError: cannot be used
            spool = Spool(Path(config.queue.spool_directory) / "spans", "spans",
                          bound.max_spool_bytes, queue.ledger)
            spool.open()
            self.delivery.spill_to(Spill(queue, spool, metrics, self._encode,
                                         self._send_encoded, batch_items=SPAN_BATCH,
                                         batch_bytes=SPAN_BATCH_BYTES))

    def offer(self, records: list[SpanRecord]) -> list[QueuedSpan]:
        """Queue spans (minting their ids); the queued spans, for exemplars."""
        queued = [QueuedSpan(r, _rng.getrandbits(128) or 1, _rng.getrandbits(64) or 1)
                  for r in records]
        self.delivery.offer([Entry(q, span_bytes(q.record), q.record.workload)
                             for q in queued])
        return queued

    def _send(self, batch: list[QueuedSpan]) -> Outcome:
        identity_of = self._resolver(q.record.workload for q in batch)
        if self.shipper.ship(build_spans(batch, identity_of)):
            return DELIVERED
        return outcome_of(self.shipper.exporter)

    def _encode(self, batch: list[QueuedSpan]) -> bytes:
        """Spans as the request the exporter would send (blocking: resolves identities)."""
        identity_of = self._resolver(q.record.workload for q in batch)
        return bytes(encode_spans(build_spans(batch, identity_of)).SerializeToString())

    def _send_encoded(self, payload: bytes) -> Outcome:
        try:
            spans = decode_spans(payload)
        except Exception as exc:  # checked by its CRC, yet not a request of ours
            return Outcome(False, why=f"not a trace request: {exc!r}", reason=SPOOL_CORRUPT)
        if self.shipper.ship(spans):
            return DELIVERED
        return outcome_of(self.shipper.exporter)

    async def run(self) -> None:
        await self.delivery.run()

    async def flush(self, deadline: float) -> None:
        """Deliver what is queued until `deadline` (monotonic), then shut the exporter;
        what is left is counted as dropped (shutdown)."""
        await self.delivery.flush(deadline)


def exemplar_of(queued: QueuedSpan
                ) -> tuple[str, Workload, dict[str, AttributeValue], Exemplar] | None:
    """The exemplar a delivered span makes for the metric series it is an example of:
    (metric, workload, attributes, exemplar), or None."""
    r = queued.record
    if r.example_of is None:
        return None
    metric, workload, attributes = r.example_of
    return metric, workload, attributes, Exemplar(
        filtered_attributes={"thread.id": r.attributes.get("thread.id", 0)},
        value=(r.end_unix_ns - r.start_unix_ns) / 1e9,
        time_unix_nano=r.end_unix_ns,
        span_id=queued.span_id,
        trace_id=queued.trace_id,
    )


def outcome_of(exporter: object) -> Outcome:
    """Why an export failed: a OneAttempt exporter knows; any other is retried."""
    outcome = getattr(exporter, "outcome", None)
    return outcome if isinstance(outcome, Outcome) else Outcome(False, True, "export failed")
