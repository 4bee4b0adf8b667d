"""Signal-neutral records: what probes produce and exporters consume.

Probes turn BPF map contents into these plain values; they never know OTLP. Exporters turn
them into OTLP; they never know which probe produced a record. Records are *deltas* since
the previous collection of the same probe: the kernel maps are drained on every read, and
`otel_ebpf.aggregate` keeps the cumulative state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from otel_ebpf.symbolize.frames import Frame

AttributeValue = str | int | float | bool
Attributes = Mapping[str, AttributeValue]


@dataclass(frozen=True, slots=True)
class Workload:
    """Who produced a measurement, as far as the kernel saw it.

    `pid` is the thread-group id (0 when the probe aggregates above processes), `comm` the
    kernel's task name at the time (a fallback for processes gone before enrichment), and
    `cgroup_id` the cgroup v2 id (0 when not recorded).
    """

    pid: int = 0
    comm: str = ""
    cgroup_id: int = 0

    @property
    def identity_key(self) -> tuple[int, int]:
        # comm is deliberately not part of the identity: a thread rename or exec must not
        # split one process's series.
        return (self.pid, self.cgroup_id)


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a workload is, as exported: the OTLP Resource it belongs to (the container when
    there is one, else the process; plus host and cloud), and the attributes that go on
    each of its data points, spans and samples (the process within that resource)."""

    resource: Mapping[str, AttributeValue]
    point: Mapping[str, AttributeValue] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MetricDescriptor:
    name: str
    unit: str
    description: str
    # False: an UpDownCounter (a queue's depth), whose deltas may be negative
    monotonic: bool = True


@dataclass(slots=True)
class ExpHistogramDelta:
    """A base-2 exponential histogram of values in the descriptor's unit.

    `bucket_counts[i]` counts values v with base^(offset+i) < v <= base^(offset+i+1), where
    base = 2^(2^-scale): exactly the OTLP ExponentialHistogram positive buckets.
    """

    descriptor: MetricDescriptor
    workload: Workload
    attributes: dict[str, AttributeValue]
    scale: int
    offset: int
    bucket_counts: list[int]
    count: int
    sum: float
    min: float
    max: float
    zero_count: int = 0


@dataclass(slots=True)
class CounterDelta:
    """A monotonic count that grew by `value` since the previous collection."""

    descriptor: MetricDescriptor
    workload: Workload
    attributes: dict[str, AttributeValue]
    value: int


Record = ExpHistogramDelta | CounterDelta


@dataclass(slots=True)
class SpanRecord:
    """One timed kernel event (a slow syscall), already on the wall clock.

    `example_of` names the metric series this event is an example of (metric name, the
    series' workload, its attributes), so exporters can link the two with an exemplar.
    """

    name: str
    workload: Workload
    start_unix_ns: int
    end_unix_ns: int
    attributes: dict[str, AttributeValue]
    error_type: str | None = None
    example_of: tuple[str, Workload, dict[str, AttributeValue]] | None = None


@dataclass(slots=True)  # not frozen: made by the thousand, and frozen init is slow
class StackSample:
    """`count` on-CPU samples of one thread with one stack, `frames` leaf first.

    `lost_stacks` names the parts ("user", "kernel") the kernel could not record: those
    samples keep the frames that were recorded and are counted, never given fake frames.
    """

    workload: Workload
    thread_id: int
    thread_name: str
    frames: tuple[Frame, ...]
    count: int
    lost_stacks: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Setting:
    """A probe's setting that readers of its data need to judge it (the syscall probe's
    sampling period), exported as a gauge on the agent's resource."""

    descriptor: MetricDescriptor
    attributes: Mapping[str, AttributeValue]
    value: float


@dataclass(frozen=True, slots=True)
class ProfileType:
    """What the values of a probe's stack samples count, and the unit of its sampling
    period (pprof's and OTLP's sample type and period type): on-CPU sampling counts
    samples ("samples", "count") taken every period of CPU time ("cpu", "nanoseconds")."""

    sample_type: str
    sample_unit: str
    period_type: str
    period_unit: str


@dataclass(slots=True)
class Collection:
    """What one probe produced in one collection, plus the probe's own health counters."""

    probe: str
    records: list[Record] = field(default_factory=list)
    # reason -> events lost since the previous collection (map full, no start, ...)
    lost_events: dict[str, int] = field(default_factory=dict)
    samples: list[StackSample] = field(default_factory=list)
    period_ns: int = 0  # the sampling period of `samples`
    profile_type: ProfileType | None = None  # what `samples` count
    # kernel map name -> (entries in use at the drain, capacity): the operator's warning
    # before map_full
    map_fill: dict[str, tuple[int, int]] = field(default_factory=dict)
    # when the kernel started counting what `records` hold (the previous drain; set by
    # the agent): the start time of the series they create
    window_start_ns: int = 0
