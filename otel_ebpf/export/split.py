"""Metrics requests a collector accepts: one export split into requests under a size and a
data-point bound.

A collector's OTLP gRPC receiver refuses a request over 4 MiB by default; rotel also drops
(while answering success) one of more than twice its batch size. An export over either
bound is cut between data points into parts, keeping each point's resource, scope and
metric. Sizes are the serialized protobuf: an export whose size bound (export/sizes.py,
no encoding) fits goes as it is; a bigger one is encoded as the official exporters do,
and a part's size counted from its pieces with every length prefix at its widest, so a
part never exceeds the bound. A data point too large to go even alone is left out and
reported, never looped on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.exporter.otlp.proto.common._internal.metrics_encoder import encode_metrics
from opentelemetry.proto.metrics.v1 import metrics_pb2 as pb
from opentelemetry.sdk.metrics.export import Metric, MetricsData, ResourceMetrics, ScopeMetrics

from otel_ebpf.export.sizes import size_bound

# where a data point is: resource, scope within it, metric within that, point within that
Address = tuple[int, int, int, int]


@dataclass(slots=True)
class Split:
    parts: list[MetricsData]
    sizes: list[int]  # each part's size, at most (bytes)
    # each point over the bound even alone, as a part of its own, with that part's size
    oversized: list[tuple[MetricsData, int]] = field(default_factory=list)

    @property
    def size(self) -> int:
        """The whole export's size (bytes, at most), oversized points included."""
        return sum(self.sizes) + sum(n for _, n in self.oversized)


def count_points(data: MetricsData) -> int:
    return sum(len(m.data.data_points) for rm in data.resource_metrics
               for sm in rm.scope_metrics for m in sm.metrics)


def iter_points(data: MetricsData) -> Iterator[Any]:
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                yield from m.data.data_points


def request_size(data: MetricsData) -> int:
    """The serialized size of `data` as one ExportMetricsServiceRequest."""
    return int(encode_metrics(data).ByteSize())


def split_metrics(data: MetricsData, max_bytes: int, max_points: int) -> Split:
    """`data` as requests of at most `max_bytes` serialized and `max_points` points each,
    in order; points that exceed `max_bytes` alone are in `oversized` instead."""
    bound = size_bound(data)
    if bound is not None and bound <= max_bytes and count_points(data) <= max_points:
        return Split([data], [bound])
    packer = _Packer(max_bytes, max_points)
    for r, rm in enumerate(data.resource_metrics):
        for s, sm in enumerate(rm.scope_metrics):
            # encoded alone, so that resources equal by value (which the encoder merges)
            # and scopes stay one-to-one with the SDK objects
            encoded = encode_metrics(MetricsData([ResourceMetrics(
                rm.resource, [sm], rm.schema_url)])).resource_metrics[0]
            packer.scope(r, _bare_size(encoded, "scope_metrics"),
                         _bare_size(encoded.scope_metrics[0], "metrics"))
            for m, metric in enumerate(encoded.scope_metrics[0].metrics):
                kind = metric.WhichOneof("data")
                if kind not in _KINDS:
                    continue
                packer.metric(_bare_metric_size(metric, kind))
                for p, point in enumerate(getattr(metric, kind).data_points):
                    packer.point((r, s, m, p), point.ByteSize())
    packer.close()
    oversized = [(assemble(data, [a]), n) for a, n in packer.oversized]
    if len(packer.parts) == 1 and not oversized:
        return Split([data], packer.sizes)
    return Split([assemble(data, addresses) for addresses in packer.parts], packer.sizes,
                 oversized)


def assemble(data: MetricsData, addresses: Sequence[Address]) -> MetricsData:
    """The points of `data` at `addresses` (in order), each under its own resource, scope
    and metric: one ResourceMetrics per resource, as the encoder merges equal ones."""
    tree: dict[int, dict[int, dict[int, list[Any]]]] = {}
    for r, s, m, p in addresses:
        metric = data.resource_metrics[r].scope_metrics[s].metrics[m]
        tree.setdefault(r, {}).setdefault(s, {}).setdefault(m, []).append(
            metric.data.data_points[p])
    resource_metrics = []
    for r, scopes in tree.items():
        rm = data.resource_metrics[r]
        scope_metrics = []
        for s, metrics in scopes.items():
            sm = rm.scope_metrics[s]
            scope_metrics.append(ScopeMetrics(scope=sm.scope, schema_url=sm.schema_url,
                                              metrics=[_with_points(sm.metrics[m], points)
                                                       for m, points in metrics.items()]))
        resource_metrics.append(ResourceMetrics(resource=rm.resource,
                                                scope_metrics=scope_metrics,
                                                schema_url=rm.schema_url))
    return MetricsData(resource_metrics=resource_metrics)


class _Packer:
    """Fills parts in order, closing one when the next point would not fit."""

    def __init__(self, max_bytes: int, max_points: int) -> None:
        self.max_bytes = max_bytes
        self.max_points = max_points
        # the widest length prefix a message within the bound can need (with its 1-byte
        # tag: every field on the way to a data point is numbered below 16)
        self.prefix = _varint_size(max_bytes)
        self.frame = 1 + self.prefix
        self.parts: list[list[Address]] = []
        self.sizes: list[int] = []
        self.oversized: list[tuple[Address, int]] = []
        self._resources: dict[int, int] = {}  # resource -> its own bytes, framed
        self._scope_bytes = 0
        self._metric_bytes = 0
        self._opened: set[tuple[int, ...]] = set()  # containers already in this part
        self._current: list[Address] = []
        self._size = 0

    def scope(self, resource: int, resource_bytes: int, scope_bytes: int) -> None:
        """The next points are in a new scope of `resource`; sizes without children."""
        self._resources[resource] = self.frame + resource_bytes
        self._scope_bytes = self.frame + scope_bytes

    def metric(self, bare_bytes: int) -> None:
        """The next points are in a new metric, `bare_bytes` without its points: its
        data message's length prefix is then 1 byte, and grows with the points."""
        self._metric_bytes = self.frame + bare_bytes + self.prefix - 1

    def point(self, address: Address, point_bytes: int) -> None:
        framed = 1 + _varint_size(point_bytes) + point_bytes
        alone = self._cost(address, framed, opened=set())
        if alone > self.max_bytes:
            self.oversized.append((address, alone))
            return
        cost = self._cost(address, framed, self._opened)
        if self._current and (self._size + cost > self.max_bytes
                              or len(self._current) >= self.max_points):
            self.close()
            cost = alone
        self._current.append(address)
        self._size += cost
        self._opened.update((address[:1], address[:2], address[:3]))

    def _cost(self, address: Address, framed: int, opened: set[tuple[int, ...]]) -> int:
        cost = framed
        if address[:3] not in opened:
            cost += self._metric_bytes
        if address[:2] not in opened:
            cost += self._scope_bytes
        if address[:1] not in opened:
            cost += self._resources[address[0]]
        return cost

    def close(self) -> None:
        if self._current:
            self.parts.append(self._current)
            self.sizes.append(self._size)
        self._current, self._size, self._opened = [], 0, set()


def _addresses(data: MetricsData) -> Iterator[Address]:
    for r, rm in enumerate(data.resource_metrics):
        for s, sm in enumerate(rm.scope_metrics):
            for m, metric in enumerate(sm.metrics):
                for p in range(len(metric.data.data_points)):
                    yield r, s, m, p


def _with_points(metric: Metric, points: list[Any]) -> Metric:
    data: Any = metric.data  # each kind of data has data_points
    return dataclasses.replace(metric, data=dataclasses.replace(data, data_points=points))


_KINDS = ("gauge", "sum", "histogram", "exponential_histogram", "summary")


def _bare_size(message: Any, children: str) -> int:
    """Bytes of `message` without its repeated `children` field."""
    bare = type(message)()
    bare.CopyFrom(message)
    bare.ClearField(children)
    return int(bare.ByteSize())


def _bare_metric_size(metric: pb.Metric, kind: str) -> int:
    """Bytes of `metric` without its data points (the data message stays, its
    temporality and monotonicity with it)."""
    bare = pb.Metric()
    bare.CopyFrom(metric)
    getattr(bare, kind).ClearField("data_points")
    return int(bare.ByteSize())


def _varint_size(n: int) -> int:
    size = 1
    while n >= 0x80:
        n >>= 7
        size += 1
    return size
