"""An upper bound of a metrics export's serialized size, without encoding it.

Encoding costs ~40-100 us a data point here, and the exporter encodes every request
anyway: measuring an export by encoding it would double the cost of every export. Most
exports are far under the bound, and this tells so at a fraction of that cost: string
lengths in UTF-8 and integers' varints are counted exactly, fixed fields and flags as if
always present. What it does not know (explicit
histograms, bytes or array attributes) it leaves to the encoder (None).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from opentelemetry.sdk.metrics.export import (
    ExponentialHistogramDataPoint,
    MetricsData,
    NumberDataPoint,
)

FIXED = 9  # a fixed64 or double field, with its tag
VARINT = 11  # any varint field (int64, enum), with its tag


def size_bound(data: MetricsData) -> int | None:
    """At least the size of `data` as one ExportMetricsServiceRequest, or None."""
    total = 0
    for rm in data.resource_metrics:
        resource = _attributes(rm.resource.attributes)
        if resource is None:
            return None
        size = _field(_field(resource)) + _string(rm.schema_url)
        for sm in rm.scope_metrics:
            scope = _scope_metrics(sm)
            if scope is None:
                return None
            size += _field(scope)
        total += _field(size)
    return total


def _scope_metrics(sm: Any) -> int | None:
    scope = _attributes(sm.scope.attributes or {})
    if scope is None:
        return None
    size = _field(_string(sm.scope.name) + _string(sm.scope.version or "") + scope)
    size += _string(sm.schema_url)
    for metric in sm.metrics:
        points = _points(metric.data.data_points)
        if points is None:
            return None
        # the data message: its points, temporality and monotonicity
        data = _field(points + 2 * VARINT)
        size += _field(_string(metric.name) + _string(metric.description or "")
                       + _string(metric.unit or "") + data)
    return size


def _points(points: Iterable[Any]) -> int | None:
    total = 0
    for point in points:
        if isinstance(point, NumberDataPoint):
            size = _number(point)
        elif isinstance(point, ExponentialHistogramDataPoint):
            size = _exponential(point)
        else:
            return None
        if size is None:
            return None
        total += _field(size)
    return total


def _number(point: NumberDataPoint) -> int | None:
    attributes = _attributes(point.attributes or {})
    exemplars = _exemplars(point.exemplars)
    if attributes is None or exemplars is None:
        return None
    return attributes + exemplars + 3 * FIXED + VARINT  # start, time, value; flags


def _exponential(point: ExponentialHistogramDataPoint) -> int | None:
    attributes = _attributes(point.attributes or {})
    exemplars = _exemplars(point.exemplars)
    if attributes is None or exemplars is None:
        return None
    buckets = sum(_field(VARINT + _field(_varints(b.bucket_counts)))
                  for b in (point.positive, point.negative) if b.bucket_counts)
    # start, time, count, sum, zero count, min, max, zero threshold; scale, flags
    return attributes + exemplars + buckets + 8 * FIXED + 2 * VARINT


def _exemplars(exemplars: Iterable[Any]) -> int | None:
    total = 0
    for exemplar in exemplars:
        attributes = _attributes(exemplar.filtered_attributes or {})
        if attributes is None:
            return None
        # time, value, span id (8 bytes), trace id (16 bytes)
        total += _field(attributes + 2 * FIXED + _field(8) + _field(16))
    return total


def _attributes(attributes: Mapping[str, Any]) -> int | None:
    total = 0
    for item in attributes.items():
        # the same few keys and values recur on every point: remembered (with the type,
        # as True == 1 would otherwise share a size)
        memo = (*item, type(item[1]))
        size = _KEY_VALUES.get(memo)
        if size is None:
            encoded = _value(item[1])
            if encoded is None:
                return None
            size = _field(_string(item[0]) + _field(encoded))
            if len(_KEY_VALUES) >= _KEY_VALUES_MAX:
                _KEY_VALUES.clear()
            _KEY_VALUES[memo] = size
        total += size
    return total


_KEY_VALUES: dict[tuple[str, Any, type], int] = {}
_KEY_VALUES_MAX = 65_536


def _value(value: Any) -> int | None:
    """An AnyValue's size."""
    if isinstance(value, bool | float):
        return FIXED
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, int):
        return 1 + (10 if value < 0 else _varint(value))
    return None


def _string(text: str) -> int:
    return _field(len(text.encode("utf-8", "surrogatepass")))


def _field(length: int) -> int:
    """A length-delimited field: tag (1 byte: every field here is numbered below 16),
    length, content."""
    if length < 128:
        return length + 2
    return length + 1 + (2 if length < 16_384 else _varint(length))


def _varint(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _varints(counts: Sequence[int]) -> int:
    """Bytes of packed unsigned varints."""
    if max(counts) < 128:
        return len(counts)
    return sum(map(_varint, counts))
