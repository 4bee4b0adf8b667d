"""The official OTLP exporters as a transport that tries once and says why it failed.

The SDK exporters retry inside `export()`: up to six attempts, sleeping 1, 2, 4 s (+-20 %)
between them until the exporter timeout (10 s) is spent. During an outage each export
therefore blocks about 7 s, and when the collector comes back the exporter is most likely
asleep in a backoff: measured with the SDK 1.45 against rotel stopped for 20 s, the first
export after its return landed 3.3-4.3 s later with a 1 s export interval, and up to an
interval more when the return fell between two exports (the issue's 3 s and 11 s).

The agent owns the retry instead (otel_ebpf/export/delivery.py: queue, short capped
backoff, the next attempt on the next tick), so each exporter is made to attempt once.
The exporters still do the transport (gRPC or HTTP, TLS, headers, compression,
OTEL_EXPORTER_OTLP_*). Two of their internals are touched, both pinned by
tests/unit/test_transport.py against a real server so an SDK upgrade that moves them fails
a test rather than silently bringing the sleeps back:
- gRPC: no status code is retryable in the exporter (`_retryable_error_codes`; the
  constructor takes the same set, but the exporter is built elsewhere); the exporter still
  rebuilds its channel after UNAVAILABLE, so a returning collector is not hidden behind a
  grown reconnect backoff;
- HTTP: the backoff between attempts is infinite, which fails the attempt at once
  (a server's Retry-After is still honoured within the timeout);
- both: the exporter's own-metrics hook (`_metrics.export_operation`) is observed, not
  replaced, to learn the status code of a failure: retryable (unreachable, UNAVAILABLE,
  HTTP 429/502/503/504, ...) or refused (anything else: the data will never be accepted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
from collections.abc import Iterator
from concurrent.futures import Executor
from typing import Any

from otel_ebpf.export.queue import Backoff, Outcome

log = logging.getLogger(__name__)

# as the SDK's own retry (and the OTLP specification) treats them
RETRYABLE_GRPC = frozenset({"CANCELLED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED",
                            "OUT_OF_RANGE", "UNAVAILABLE", "DATA_LOSS"})
RETRYABLE_HTTP = frozenset({429, 502, 503, 504})
# how servers word a request refused for its size (as otel_ebpf.export.metrics reads them)
TOO_LARGE = re.compile(r"larger than max|exceeds max|too large", re.IGNORECASE)
GRPC_STATUS = "rpc.response.status_code"
HTTP_STATUS = "http.response.status_code"


class _Observed:
    """Stands in for an exporter's own-metrics hook, keeping the hook's behaviour and the
    result object of the last export operation."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.last: Any = None

    @contextlib.contextmanager
    def export_operation(self, num_items: int) -> Iterator[Any]:
        with self.inner.export_operation(num_items) as result:
            self.last = result
            yield result


class OneAttempt:
    """An official OTLP exporter (metrics or traces, gRPC or HTTP) that makes one attempt
    per export. `export` returns the exporter's own result, so it stands wherever the
    exporter did; `outcome` tells the last failure apart; `probe` asks the collector
    whether it answers, with an empty request (valid OTLP, nothing to build)."""

    def __init__(self, exporter: Any, signal: str) -> None:
        self.exporter = exporter
        self.signal = signal
        self.single = _disable_retries(exporter)
        self._observed: _Observed | None = None
        hook = getattr(exporter, "_metrics", None)
        if hook is not None and hasattr(hook, "export_operation"):
            self._observed = exporter._metrics = _Observed(hook)
        if not self.single or self._observed is None:
            log.warning("%s: this opentelemetry-exporter-otlp release does not let the agent "
                        "own the retries; exports may wait in its backoff after an outage",
                        type(exporter).__name__)

    def export(self, data: Any) -> Any:
        if self._observed is not None:
            self._observed.last = None
        return self.exporter.export(data)

    def probe(self) -> bool:
        """Blocking: whether the collector accepts an empty export now."""
        empty: Any = []
        if self.signal == "metrics":
            from opentelemetry.sdk.metrics.export import MetricsData

            empty = MetricsData(resource_metrics=[])
        return bool(self.export(empty).name == "SUCCESS")

    @property
    def outcome(self) -> Outcome:
        """Why the last export failed (call it after a failed export)."""
        result = self._observed.last if self._observed is not None else None
        if result is None:  # failed before the transport (shut down, not encodable)
            return Outcome(False, retryable=False, why="not sent")
        return classify(result.error, result.error_attrs or {})

    def shutdown(self) -> None:
        self.exporter.shutdown()


async def until_answered(exporter: OneAttempt, pool: Executor, backoff: Backoff) -> None:
    """Ask the collector with empty exports on the backoff until it answers: a cheap way
    back for a signal that does not resend what failed (cumulative metrics rebuild their
    whole export on the next attempt, so they wait for an answer before building one)."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(backoff.next())
        if await asyncio.shield(loop.run_in_executor(pool, exporter.probe)):
            return


def classify(error: BaseException | None, attrs: Any) -> Outcome:
    """A failed attempt, from the error and status code the exporter recorded."""
    if GRPC_STATUS in attrs:
        code = str(attrs[GRPC_STATUS])
        details = _details(error)
        # a request over the receiver's size limit (RESOURCE_EXHAUSTED from grpc-go,
        # OUT_OF_RANGE from tonic) would be refused again, however long it waited
        retryable = code in RETRYABLE_GRPC and not TOO_LARGE.search(details)
        why = f"gRPC {code}" + (f": {details}" if details else "")
        return Outcome(False, retryable, why, _retry_info(error))
    if HTTP_STATUS in attrs:
        status = int(attrs[HTTP_STATUS])
        return Outcome(False, status in RETRYABLE_HTTP, f"HTTP {status}")
    if error is not None and type(error).__name__ == "RequestPayloadTooLargeError":
        return Outcome(False, False, str(error))
    # no answer at all: refused connection, timeout, DNS, TLS handshake
    return Outcome(False, True, f"{type(error).__name__}: {error}" if error else "no answer")


def _details(error: BaseException | None) -> str:
    details = getattr(error, "details", None)
    try:
        return str(details() or "") if callable(details) else ""
    except Exception:
        return ""


def _retry_info(error: BaseException | None) -> float | None:
    """The delay a gRPC server asked for (google.rpc.RetryInfo), if any."""
    trailing = getattr(error, "trailing_metadata", None)
    if trailing is None:
        return None
    try:
        from google.rpc.error_details_pb2 import RetryInfo  # type: ignore[import-untyped]

        raw = dict(trailing() or ()).get("google.rpc.retryinfo-bin")
        if raw is None:
            return None
        info = RetryInfo()
        info.ParseFromString(raw)
        return float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)
    except Exception:
        return None


def _disable_retries(exporter: Any) -> bool:
    if hasattr(exporter, "_retryable_error_codes"):  # gRPC (OTLPExporterMixin)
        exporter._retryable_error_codes = frozenset()
        return True
    client = getattr(exporter, "_client", None)
    if client is not None and hasattr(client, "_compute_backoff"):  # HTTP (_OTLPHTTPClient)
        client._compute_backoff = lambda retry: math.inf
        return True
    return False
