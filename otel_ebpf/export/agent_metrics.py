"""The agent's own resource use and kernel map fill, as metrics read at export time.

Process metrics follow the semantic conventions (`process.cpu.time` by `cpu.mode`,
`process.memory.usage`, `process.memory.virtual`), so the dashboards that read any
OpenTelemetry process's metrics read the agent's. Map fill is a gauge per probe and map:
the share of the map's capacity the last drain found in use, which tells an operator
how close a probe is to counting `map_full`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Mapping

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Metric,
    NumberDataPoint,
    Sum,
)

from otel_ebpf.model import AttributeValue, Setting

CUMULATIVE = AggregationTemporality.CUMULATIVE
_PAGE = os.sysconf("SC_PAGE_SIZE")

MAP_FILL = "otel_ebpf.probe.map.fill"


def _point(value: float, start_ns: int, now_ns: int,
           attributes: Mapping[str, AttributeValue] | None = None) -> NumberDataPoint:
    return NumberDataPoint(attributes=dict(attributes or {}), start_time_unix_nano=start_ns,
                           time_unix_nano=now_ns, value=value)


def process_metrics(start_ns: int, now_ns: int | None = None) -> list[Metric]:
    """This process's CPU time (every thread) and memory, now."""
    now_ns = now_ns or time.time_ns()
    times = os.times()
    with open("/proc/self/statm") as f:
        size, resident = (int(v) * _PAGE for v in f.read().split()[:2])
    return [
        Metric(name="process.cpu.time", unit="s",
               description="Total CPU seconds broken down by different CPU modes.",
               data=Sum(data_points=[
                   _point(times.user, start_ns, now_ns, {"cpu.mode": "user"}),
                   _point(times.system, start_ns, now_ns, {"cpu.mode": "system"})],
                   aggregation_temporality=CUMULATIVE, is_monotonic=True)),
        Metric(name="process.memory.usage", unit="By",
               description="The amount of physical memory in use.",
               data=Sum(data_points=[_point(resident, start_ns, now_ns)],
                        aggregation_temporality=CUMULATIVE, is_monotonic=False)),
        Metric(name="process.memory.virtual", unit="By",
               description="The amount of committed virtual memory.",
               data=Sum(data_points=[_point(size, start_ns, now_ns)],
                        aggregation_temporality=CUMULATIVE, is_monotonic=False)),
    ]


class MapFill:
    """The latest fill of each probe's maps, as the probes report it with each drain."""

    def __init__(self) -> None:
        self._fill: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def update(self, probe: str, fill: Mapping[str, tuple[int, int]]) -> None:
        """`fill`: map name -> (entries in use, capacity)."""
        with self._lock:
            for name, (used, capacity) in fill.items():
                self._fill[(probe, name)] = used / capacity if capacity else 0.0

    def metrics(self, start_ns: int, now_ns: int | None = None) -> list[Metric]:
        now_ns = now_ns or time.time_ns()
        with self._lock:
            points = [_point(v, start_ns, now_ns, {"probe": probe, "map": name})
                      for (probe, name), v in sorted(self._fill.items())]
        if not points:
            return []
        return [Metric(name=MAP_FILL, unit="1",
                       description="Share of a kernel map's capacity in use at the probe's "
                       "last drain, by probe and map; near 1 the probe counts map_full.",
                       data=Gauge(data_points=points))]


def setting_metrics(settings: Iterable[Setting], start_ns: int,
                    now_ns: int | None = None) -> list[Metric]:
    """The probes' settings that readers need (e.g. a sampling period), as gauges."""
    now_ns = now_ns or time.time_ns()
    points: dict[str, tuple[Setting, list[NumberDataPoint]]] = {}
    for setting in settings:
        entry = points.setdefault(setting.descriptor.name, (setting, []))
        entry[1].append(_point(setting.value, start_ns, now_ns, setting.attributes))
    return [Metric(name=name, unit=first.descriptor.unit,
                   description=first.descriptor.description, data=Gauge(data_points=data))
            for name, (first, data) in points.items()]
