"""Cumulative state built from the kernel's per-interval deltas.

The kernel maps are drained on every collection, so they stay small and exited processes
leave them; the cumulative counts exporters need live here instead, one series per
(metric, workload, attributes), bounded, and expired once their workload is gone and its
last values were exported.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from opentelemetry.sdk.metrics._internal.exemplar import Exemplar

from otel_ebpf.histogram import merge_into
from otel_ebpf.model import (
    AttributeValue,
    CounterDelta,
    ExpHistogramDelta,
    MetricDescriptor,
    Record,
    Workload,
)

log = logging.getLogger(__name__)

SeriesKey = tuple[str, tuple[int, int], frozenset[tuple[str, AttributeValue]]]


@dataclass(slots=True)
class Series:
    descriptor: MetricDescriptor
    workload: Workload
    attributes: dict[str, AttributeValue]
    start_ns: int
    updated_ns: int
    exported_since_update: bool = False
    # counter
    value: int = 0
    # exponential histogram
    scale: int = 0
    offset: int = 0
    bucket_counts: list[int] | None = None
    count: int = 0
    sum: float = 0.0
    min: float = 0.0
    max: float = 0.0
    zero_count: int = 0

    @property
    def is_histogram(self) -> bool:
        return self.bucket_counts is not None


def series_key(record: Record) -> SeriesKey:
    return (
        record.descriptor.name,
        record.workload.identity_key,
        frozenset(record.attributes.items()),
    )


class CumulativeStore:
    def __init__(self, max_series: int = 100_000, exemplars_per_series: int = 4) -> None:
        self.max_series = max_series
        self.exemplars_per_series = exemplars_per_series
        self.dropped_series = 0  # records refused because the store was full
        self._series: dict[SeriesKey, Series] = {}
        # newest last; kept apart from Series so an exemplar may arrive before its series
        self._exemplars: dict[SeriesKey, deque[Exemplar]] = {}

    def add_exemplar(self, metric: str, workload: Workload,
                     attributes: dict[str, AttributeValue], exemplar: Exemplar) -> None:
        if not self.exemplars_per_series:
            return
        key = (metric, workload.identity_key, frozenset(attributes.items()))
        if key not in self._series and len(self._exemplars) >= self.max_series:
            return
        kept = self._exemplars.get(key)
        if kept is None:
            kept = self._exemplars[key] = deque(maxlen=self.exemplars_per_series)
        kept.append(exemplar)

    def exemplars_of(self, series: Series) -> list[Exemplar]:
        key = (series.descriptor.name, series.workload.identity_key,
               frozenset(series.attributes.items()))
        return list(self._exemplars.get(key, ()))

    def __len__(self) -> int:
        return len(self._series)

    def add(self, records: Iterable[Record], start_ns: int, now_ns: int) -> None:
        """Fold deltas in. `start_ns` is when their probe started counting."""
        for record in records:
            key = series_key(record)
            series = self._series.get(key)
            if series is None:
                if len(self._series) >= self.max_series:
                    self.dropped_series += 1
                    continue
                series = Series(record.descriptor, record.workload, dict(record.attributes),
                                start_ns, now_ns)
                if isinstance(record, ExpHistogramDelta):
                    series.scale, series.bucket_counts = record.scale, []
                    series.min, series.max = record.min, record.max
                self._series[key] = series
            series.updated_ns = now_ns
            series.exported_since_update = False
            if record.workload.comm:
                series.workload = record.workload  # keep the newest kernel-side name
            if isinstance(record, CounterDelta):
                series.value += record.value
            else:
                _fold_histogram(series, record)

    def series(self) -> list[Series]:
        return list(self._series.values())

    def mark_exported(self) -> None:
        for series in self._series.values():
            series.exported_since_update = True

    def expire(self, alive: Callable[[Workload], bool]) -> int:
        """Forget series whose workload is gone and whose final values were exported."""
        gone = [k for k, s in self._series.items() if s.exported_since_update
                and not alive(s.workload)]
        for key in gone:
            del self._series[key]
            self._exemplars.pop(key, None)
        orphans = [k for k in self._exemplars if k not in self._series
                   and not alive(Workload(pid=k[1][0], cgroup_id=k[1][1]))]
        for key in orphans:
            del self._exemplars[key]
        return len(gone)


def _fold_histogram(series: Series, record: ExpHistogramDelta) -> None:
    if record.scale != series.scale:
        raise ValueError(f"{record.descriptor.name}: scale changed from {series.scale} "
                         f"to {record.scale}; a probe must keep one scale")
    if record.count == 0:
        return
    assert series.bucket_counts is not None
    series.offset, series.bucket_counts = merge_into(
        series.offset, series.bucket_counts, record.offset, record.bucket_counts
    )
    if series.count == 0:
        series.min, series.max = record.min, record.max
    else:
        series.min = min(series.min, record.min)
        series.max = max(series.max, record.max)
    series.count += record.count
    series.sum += record.sum
    series.zero_count += record.zero_count
