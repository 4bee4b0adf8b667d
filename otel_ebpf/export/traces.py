"""Span records -> OTLP spans through the official span exporter, behind a bounded queue.

Ids are minted here, when a span is accepted into the queue, so that exemplars only ever
point at spans that were handed to the exporter; a span refused by a full queue is counted
and leaves no exemplar behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from otel_ebpf import __version__
from otel_ebpf.export.metrics import OtlpShipper
from otel_ebpf.model import AttributeValue, Identity, SpanRecord, Workload

log = logging.getLogger(__name__)
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


SPAN_BATCH = 512
SPAN_EXPORT_S = 0.5  # the longest a queued span waits for a batch to fill


class SpanExport:
    """The span side of the agent: a bounded queue in front of the official OTLP span
    exporter, exported in batches on a thread of its own as soon as a batch is full, or
    SPAN_EXPORT_S after the first span of a batch was queued; an empty queue waits without
    waking. Counts what it drops; never grows past the queue."""

    def __init__(self, shipper: OtlpShipper, capacity: int,
                 resolver: Callable[[Iterable[Workload]], Callable[[Workload], Identity]]
                 ) -> None:
        self.shipper = shipper
        self.queue = SpanQueue(capacity)
        self.failed = 0  # spans in batches the exporter could not deliver
        self._resolver = resolver
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="spans")
        self._future: asyncio.Future[bool] | None = None
        self._queued = asyncio.Event()  # the queue holds a span
        self._ready = asyncio.Event()  # ... a full batch

    def offer(self, record: SpanRecord) -> QueuedSpan | None:
        queued = self.queue.offer(record)
        self._queued.set()
        if len(self.queue) >= SPAN_BATCH:
            self._ready.set()
        return queued

    def take_drops(self) -> dict[str, int]:
        """reason -> spans dropped since the previous call."""
        drops = {"queue_full": self.queue.dropped, "export_failed": self.failed}
        self.queue.dropped = self.failed = 0
        return {reason: n for reason, n in drops.items() if n}

    def _export(self, batch: list[QueuedSpan]) -> bool:
        identity_of = self._resolver(q.record.workload for q in batch)
        ok = self.shipper.ship(build_spans(batch, identity_of))
        if not ok:
            self.failed += len(batch)
        return ok

    def _start(self) -> asyncio.Future[bool] | None:
        if not len(self.queue) or (self._future is not None and not self._future.done()):
            return None
        loop = asyncio.get_running_loop()
        self._future = loop.run_in_executor(self._pool, self._export,
                                            self.queue.take(SPAN_BATCH))
        return self._future

    async def run(self) -> None:
        while True:
            await self._queued.wait()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), SPAN_EXPORT_S)
            self._queued.clear()
            self._ready.clear()
            while (future := self._start()) is not None:
                try:
                    # shield: cancelling this loop at shutdown must not lose the batch
                    await asyncio.shield(future)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("span export failed unexpectedly")
                    break

    async def flush(self, deadline: float) -> None:
        """Export what is queued until `deadline` (monotonic), then shut the exporter."""
        if self._future is not None and not self._future.done():
            log.warning("a span export was still retrying at shutdown; %d spans dropped",
                        len(self.queue))
        else:
            while time.monotonic() < deadline and (future := self._start()) is not None:
                try:
                    await asyncio.wait_for(future, max(0.1, deadline - time.monotonic()))
                except TimeoutError:
                    break
        self.shipper.shutdown()
        self._pool.shutdown(wait=False, cancel_futures=True)
