"""Cumulative state built from the kernel's per-interval deltas.

The kernel maps are drained on every collection, so they stay small and exited processes
leave them; the cumulative counts exporters need live here instead, one series per
(metric, workload, attributes), bounded, and expired once their workload is gone and its
last values were exported. Each metric's series are capped (otel_ebpf.cardinality): past
its limit, new series fold into the metric's overflow series.

A series of an aggregated workload (pid 0: a container's or cgroup's executable) is also
forgotten once it has been quiet for the quiet time, however long its cgroup lives: a
node's long-lived cgroups run ever new executables (a CI runner's compilers, cron's
shells), and their series would otherwise pile up. Should it be counted again, it is a
new series: it starts from zero with the start time its caller gives for new series (the
start of the window its first delta covers), so its cumulative value never goes down
against an unchanged start time.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

from opentelemetry.sdk.metrics import Exemplar

from otel_ebpf.cardinality import OVERFLOW, OVERFLOW_ATTRIBUTES, SeriesLimit
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
    version: int = 0  # the store's add() that last changed it
    # its workload is gone and its last values were exported: not exported again unless a
    # late delta revives it, forgotten after the quiet time
    retired: bool = False
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


def series_key(name: str, workload: Workload,
               attributes: Mapping[str, AttributeValue]) -> SeriesKey:
    """What makes a series one: metric, workload identity (not its name), attributes."""
    return name, workload.identity_key, frozenset(attributes.items())


class CumulativeStore:
    """Cumulative series from deltas. Thread-safe: probes' results, self-metrics and the
    exporter reach it from different threads; the exporter works on copies (series())."""

    def __init__(self, max_series: int = 100_000, exemplars_per_series: int = 4,
                 limit: SeriesLimit | None = None) -> None:
        self._lock = threading.Lock()
        self._version = 0
        self.max_series = max_series
        self.limit = limit  # None: no cap per metric
        self.exemplars_per_series = exemplars_per_series
        self.dropped_series = 0  # records refused because the store was full
        self._series: dict[SeriesKey, Series] = {}
        # newest last; kept apart from Series so an exemplar may arrive before its series
        self._exemplars: dict[SeriesKey, deque[Exemplar]] = {}

    def add_exemplar(self, metric: str, workload: Workload,
                     attributes: dict[str, AttributeValue], exemplar: Exemplar) -> None:
        if not self.exemplars_per_series:
            return
        key = series_key(metric, workload, attributes)
        with self._lock:
            if self.limit is not None and self.limit.folded(key):
                key = series_key(metric, OVERFLOW, OVERFLOW_ATTRIBUTES)
            if key not in self._series and len(self._exemplars) >= self.max_series:
                return
            kept = self._exemplars.get(key)
            if kept is None:
                kept = self._exemplars[key] = deque(maxlen=self.exemplars_per_series)
            kept.append(exemplar)

    def exemplars_of(self, series: Series) -> list[Exemplar]:
        key = series_key(series.descriptor.name, series.workload, series.attributes)
        with self._lock:
            return list(self._exemplars.get(key, ()))

    def __len__(self) -> int:
        return len(self._series)

    def add(self, records: Iterable[Record], start_ns: int, now_ns: int) -> None:
        """Fold deltas in. `start_ns` is the start time of any series they create: when
        the kernel started counting what they hold (their probe's start for its first
        collection, the previous collection for later ones)."""
        with self._lock:
            self._version += 1
            if len(self._series) >= self.max_series * 0.9:
                self._forget_retired()  # a gone process's quiet time yields to live data
            for record in records:
                self._add(record, start_ns, now_ns)

    def _add(self, record: Record, start_ns: int, now_ns: int) -> None:
        key = series_key(record.descriptor.name, record.workload, record.attributes)
        series = self._series.get(key)
        if series is None or series.retired:
            series = self._admit(key, series, record, start_ns, now_ns)
            if series is None:
                return
        series.updated_ns = now_ns
        series.version = self._version
        series.exported_since_update = False
        series.retired = False
        if record.workload.comm and series.workload != OVERFLOW:
            series.workload = record.workload  # keep the newest kernel-side name
        if isinstance(record, CounterDelta):
            series.value += record.value
        else:
            _fold_histogram(series, record)

    def _admit(self, key: SeriesKey, series: Series | None, record: Record, start_ns: int,
               now_ns: int) -> Series | None:
        """Where a delta without an exported series goes: its own series (new, or retired
        and revived), or, past its metric's limit, the metric's overflow series. None: the
        store is full."""
        limit = self.limit
        if (limit is not None and record.workload != OVERFLOW
                and not limit.admit(key, record.workload, now_ns)):
            return self._overflow_of(record, start_ns, now_ns)
        if series is not None:
            return series
        if len(self._series) >= self.max_series:
            if limit is not None:
                limit.release(key[0])
            self.dropped_series += 1
            return None
        series = self._series[key] = _new_series(record, record.workload, record.attributes,
                                                 start_ns, now_ns)
        return series

    def _overflow_of(self, record: Record, start_ns: int, now_ns: int) -> Series:
        key = series_key(record.descriptor.name, OVERFLOW, OVERFLOW_ATTRIBUTES)
        series = self._series.get(key)
        if series is None:  # one per metric, beyond max_series: it never expires
            series = self._series[key] = _new_series(record, OVERFLOW, OVERFLOW_ATTRIBUTES,
                                                     start_ns, now_ns)
        return series

    def _delete(self, key: SeriesKey) -> None:
        series = self._series.pop(key)
        self._exemplars.pop(key, None)
        if not series.retired:
            self._released(series)

    def _released(self, series: Series) -> None:
        if self.limit is not None and series.workload != OVERFLOW:
            self.limit.release(series.descriptor.name)

    def take_overflowed(self) -> dict[str, int]:
        """metric -> deltas folded into its overflow series since the previous call."""
        with self._lock:
            return self.limit.take_overflowed() if self.limit is not None else {}

    def _forget_retired(self) -> None:
        for key in [k for k, s in self._series.items() if s.retired]:
            self._delete(key)

    def series(self) -> list[Series]:
        """A consistent copy of every series to export (not the retired ones), safe to
        read while adds go on."""
        with self._lock:
            return [replace(s, attributes=dict(s.attributes),
                            bucket_counts=None if s.bucket_counts is None
                            else list(s.bucket_counts))
                    for s in self._series.values() if not s.retired]

    def mark_exported(self, exported: Iterable[Series]) -> None:
        """These copies were delivered: their series count as exported unless an add()
        changed them since the copy was taken."""
        with self._lock:
            for copy in exported:
                live = self._series.get(
                    series_key(copy.descriptor.name, copy.workload, copy.attributes))
                if live is not None and live.version == copy.version:
                    live.exported_since_update = True

    def expire(self, alive: Callable[[Workload], bool], now_ns: int | None = None,
               quiet_ns: int = 0) -> int:
        """Retire the series whose workload is gone and whose last values were exported
        (they are exported no more), and forget those no delta changed for `quiet_ns`;
        forget too the exported series of aggregated workloads (pid 0) that no delta
        changed for `quiet_ns`, gone or not. The quiet time matters: the kernel keeps
        counting for a process that exited (its sockets retransmit on), and a delta for a
        forgotten series starts a new series from zero. Returns how many were forgotten."""
        with self._lock:
            return self._expire(alive, None if now_ns is None else now_ns - quiet_ns)

    def _expire(self, alive: Callable[[Workload], bool], updated_by_ns: int | None) -> int:
        checked: dict[tuple[int, int], bool] = {}  # many series share one workload

        def is_alive(workload: Workload) -> bool:
            known = checked.get(workload.identity_key)
            if known is None:
                known = checked[workload.identity_key] = alive(workload)
            return known

        def kept_while_quiet(workload: Workload) -> bool:
            return workload.pid != 0 and is_alive(workload)

        gone = []
        for key, series in self._series.items():
            if not series.exported_since_update:
                continue
            quiet = updated_by_ns is None or series.updated_ns <= updated_by_ns
            if is_alive(series.workload):
                if quiet and updated_by_ns is not None and series.workload.pid == 0:
                    gone.append(key)  # an aggregated workload, quiet for the whole time
                continue
            if quiet:
                gone.append(key)
            elif not series.retired:
                series.retired = True
                self._released(series)
        for key in gone:
            self._delete(key)
        if self.limit is not None:
            self.limit.expire(kept_while_quiet if updated_by_ns is not None else is_alive,
                              updated_by_ns)
        orphans = [k for k in self._exemplars if k not in self._series
                   and not is_alive(Workload(pid=k[1][0], cgroup_id=k[1][1]))]
        for key in orphans:
            del self._exemplars[key]
        return len(gone)


def _new_series(record: Record, workload: Workload,
                attributes: Mapping[str, AttributeValue], start_ns: int, now_ns: int) -> Series:
    series = Series(record.descriptor, workload, dict(attributes), start_ns, now_ns)
    if isinstance(record, ExpHistogramDelta):
        series.scale, series.bucket_counts = record.scale, []
        series.min, series.max = record.min, record.max
    return series


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
