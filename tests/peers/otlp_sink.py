"""In-process OTLP/gRPC sink that records every Export request it receives.

Why: end-to-end tests need a real OTLP endpoint to point the agent (or a collector in
front of it) at, and then need to assert on exactly what arrived on the wire. Using the
official generated servicers means the sink speaks precisely the protocol a production
backend would, and storing the raw protobuf requests lets tests inspect every field.

The sink only ever binds loopback (127.0.0.1) so tests never expose a port off-host.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from typing import Any

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

try:  # Profiles are still "v1development"; not every opentelemetry-proto release ships them.
    from opentelemetry.proto.collector.profiles.v1development import (
        profiles_service_pb2,
        profiles_service_pb2_grpc,
    )
except ImportError:  # pragma: no cover - depends on the installed opentelemetry-proto
    profiles_service_pb2 = None  # type: ignore[assignment]
    profiles_service_pb2_grpc = None  # type: ignore[assignment]

LOOPBACK = "127.0.0.1"

#: True when the installed opentelemetry-proto provides the profiles collector service.
HAS_PROFILES = profiles_service_pb2_grpc is not None


def any_value_to_py(value: AnyValue) -> Any:
    """Convert an OTLP ``AnyValue`` to the natural Python value (None when unset)."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value_to_py(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attrs_to_dict(value.kvlist_value.values)
    return getattr(value, kind)  # string/bool/int/double/bytes map 1:1 onto Python types


def attrs_to_dict(attributes: Iterable[KeyValue]) -> dict[str, Any]:
    """Decode a repeated ``KeyValue`` field (resource, scope or point attributes) to a dict.

    Arrays become lists and nested key/value lists become dicts, so tests can compare
    attributes with plain ``==`` instead of walking protobuf oneofs.
    """
    return {kv.key: any_value_to_py(kv.value) for kv in attributes}


class OtlpSink:
    """An OTLP/gRPC server on a free loopback port that records metrics, traces, logs, profiles.

    Use as a context manager (``with OtlpSink() as sink:``) or call ``start()``/``stop()``.
    All recorded lists are guarded by one condition variable, which ``wait_for`` waits on,
    so tests wake up as soon as a matching request arrives instead of sleeping blindly.
    """

    def __init__(self, max_workers: int = 4) -> None:
        self._max_workers = max_workers
        self._cond = threading.Condition(threading.RLock())  # re-entrant: predicates may read
        self._metrics: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self._traces: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self._logs: list[logs_service_pb2.ExportLogsServiceRequest] = []
        self._profiles: list[Any] = []
        # (time.monotonic() when recorded, signal) for each request, in arrival order
        self._arrivals: list[tuple[float, str]] = []
        self._server: grpc.Server | None = None
        self._port: int | None = None

    # ----------------------------------------------------------------- lifecycle
    def start(self, port: int = 0) -> int:
        """Start serving on ``127.0.0.1:<port>`` and return the bound port.

        The default port 0 lets the OS choose, so parallel tests never collide and there is
        no probe-then-bind race; pass the old ``port`` to restart a stopped sink in place
        (e.g. to simulate a backend outage and recovery).
        """
        if self._server is not None:
            raise RuntimeError("OtlpSink already started")
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self._max_workers))
        for add_to_server, base, response, bucket in self._services():
            record = functools.partial(self._record, bucket, base.__name__.removesuffix(
                "ServiceServicer").lower())
            add_to_server(_recorder(base, response, record), server)
        port = int(server.add_insecure_port(f"{LOOPBACK}:{port}"))
        if port == 0:
            raise RuntimeError("OtlpSink could not bind a loopback port")
        server.start()
        self._server, self._port = server, port
        return port

    def _services(self) -> list[tuple[Callable[..., None], type[Any], type[Any], list[Any]]]:
        """(add_*_to_server, generated servicer, response type, bucket) per OTLP signal."""
        m, t, lg = metrics_service_pb2_grpc, trace_service_pb2_grpc, logs_service_pb2_grpc
        services: list[tuple[Callable[..., None], type[Any], type[Any], list[Any]]] = [
            (m.add_MetricsServiceServicer_to_server, m.MetricsServiceServicer,
             metrics_service_pb2.ExportMetricsServiceResponse, self._metrics),
            (t.add_TraceServiceServicer_to_server, t.TraceServiceServicer,
             trace_service_pb2.ExportTraceServiceResponse, self._traces),
            (lg.add_LogsServiceServicer_to_server, lg.LogsServiceServicer,
             logs_service_pb2.ExportLogsServiceResponse, self._logs),
        ]  # fmt: skip
        if HAS_PROFILES:
            pg, pb = profiles_service_pb2_grpc, profiles_service_pb2
            services.append((pg.add_ProfilesServiceServicer_to_server, pg.ProfilesServiceServicer,
                             pb.ExportProfilesServiceResponse, self._profiles))  # fmt: skip
        return services

    def stop(self, grace: float | None = 0.5) -> None:
        """Stop the server (idempotent); in-flight RPCs get ``grace`` seconds to finish."""
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace).wait()

    def __enter__(self) -> OtlpSink:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port; raises if the sink was never started."""
        if self._port is None:
            raise RuntimeError("OtlpSink not started")
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` form, as gRPC channels and most CLI flags want it."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def endpoint(self) -> str:
        """``http://host:port`` form, as OTLP exporters want it (plaintext gRPC)."""
        return f"http://{self.address}"

    # ------------------------------------------------------------------ recording
    def _record(self, bucket: list[Any], signal: str, request: Any) -> None:
        with self._cond:
            bucket.append(request)
            self._arrivals.append((time.monotonic(), signal))
            self._cond.notify_all()

    def first_arrival(self, signal: str, after: float) -> float | None:
        """When (time.monotonic()) the first request of `signal` (metrics, trace, logs,
        profiles) arrived after `after`, or None."""
        with self._cond:
            return next((t for t, s in self._arrivals if s == signal and t > after), None)

    @property
    def metrics_requests(self) -> list[metrics_service_pb2.ExportMetricsServiceRequest]:
        """Snapshot of every metrics Export request received so far."""
        with self._cond:
            return list(self._metrics)

    @property
    def trace_requests(self) -> list[trace_service_pb2.ExportTraceServiceRequest]:
        """Snapshot of every trace Export request received so far."""
        with self._cond:
            return list(self._traces)

    @property
    def logs_requests(self) -> list[logs_service_pb2.ExportLogsServiceRequest]:
        """Snapshot of every logs Export request received so far."""
        with self._cond:
            return list(self._logs)

    @property
    def profiles_requests(self) -> list[Any]:
        """Snapshot of every profiles Export request (``ExportProfilesServiceRequest``)."""
        with self._cond:
            return list(self._profiles)

    def clear(self) -> None:
        """Forget everything received, e.g. between phases of one test."""
        with self._cond:
            for bucket in (self._metrics, self._traces, self._logs, self._profiles):
                bucket.clear()

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 5.0) -> bool:
        """Block until ``predicate()`` is truthy or ``timeout`` seconds pass; return the result.

        The predicate is re-evaluated each time a request is recorded (it may call this
        sink's accessors: the lock is re-entrant), so there is no polling interval to tune.
        """
        with self._cond:
            return bool(self._cond.wait_for(predicate, timeout))

    # ------------------------------------------------------------------- queries
    def metrics_points(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        """Every data point received for metric ``name``, paired with its resource attributes.

        Covers gauge, sum, histogram, exponential histogram and summary points, in arrival
        order, across all requests, resources and scopes — tests rarely care how a collector
        happened to batch things.
        """
        out: list[tuple[dict[str, Any], Any]] = []
        for request in self.metrics_requests:
            for rm in request.resource_metrics:
                resource = attrs_to_dict(rm.resource.attributes)
                for sm in rm.scope_metrics:
                    for metric in sm.metrics:
                        if metric.name != name:
                            continue
                        kind = metric.WhichOneof("data")
                        if kind is not None:
                            out.extend((resource, p) for p in getattr(metric, kind).data_points)
        return out

    def metric_names(self) -> set[str]:
        """Names of all metrics received so far (handy in assertion messages)."""
        return {
            m.name
            for req in self.metrics_requests
            for rm in req.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
        }

    def spans(self, name: str | None = None) -> list[tuple[dict[str, Any], Any]]:
        """Every span received (optionally only those called ``name``) with resource attrs."""
        return [
            (attrs_to_dict(rs.resource.attributes), span)
            for req in self.trace_requests
            for rs in req.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
            if name is None or span.name == name
        ]


def _recorder(servicer_base: type[Any], response: type[Any], record: Callable[[Any], None]) -> Any:
    """An instance of a generated ``*ServiceServicer`` whose Export records and acknowledges.

    Subclassing the official servicer keeps the real service/method names and codecs; an
    empty response means full success (no ``partial_success`` rejections).
    """

    class _Recorder(servicer_base):  # type: ignore[misc]
        def Export(self, request: Any, context: grpc.ServicerContext) -> Any:
            record(request)
            return response()

    return _Recorder()
