"""Decoder for probes/syscall_latency.bpf.c: drained latency maps -> exponential histograms.

The kernel counts every call, times the calls that left the CPU and a sample of the
others, and buckets every timed duration at OTLP scale 2 in seconds (see the .bpf.c);
syscall_sampling spreads the untimed calls over their sample, so each exported histogram
counts every call.
"""

from __future__ import annotations

import ctypes as ct
import logging
from typing import Annotated, Any, cast

from pydantic import Field

from otel_ebpf.clock import MonotonicClock
from otel_ebpf.config_base import ProbeConfig, Strict
from otel_ebpf.histogram import (
    HIST_MIN_INDEX,
    HIST_SCALE,
    bucket_lower_bound,
    bucket_upper_bound,
    trim,
)
from otel_ebpf.kernel.engine import Program
from otel_ebpf.kernel.syscalls import SyscallTable
from otel_ebpf.model import (
    AttributeValue,
    Collection,
    ExpHistogramDelta,
    MetricDescriptor,
    Record,
    Setting,
    SpanRecord,
    Workload,
)
from otel_ebpf.probes.base import Hook, Probe, ProbeContext, Signal
from otel_ebpf.probes.generations import Generations
from otel_ebpf.probes.series import Aggregation, aggregation_flags
from otel_ebpf.probes.slow_syscalls import (
    SlowCallStream,
    SlowSpansConfig,
    ring_buffer_supported,
    series_of,
)
from otel_ebpf.probes.slow_syscalls import cflags as slow_cflags
from otel_ebpf.probes.syscall_sampling import Estimate, FastCallEstimator, Interval
from otel_ebpf.symbolize.unwind.shared import UNWIND_LOST, SharedUnwinder

log = logging.getLogger(__name__)


SYSCALL_DURATION = MetricDescriptor(
    name="linux.syscall.duration",
    unit="s",
    description="Time from syscall entry to exit, measured in the kernel per workload.",
)
# A backend reading quantiles needs the sampling period to judge them; counts never
# depend on it.
SAMPLE_PERIOD = MetricDescriptor(
    name="otel_ebpf.syscall.sample_period",
    unit="{call}",
    description="Of the syscalls that stay on the CPU, one in this many is timed; the "
                "others are spread over that sample (counts stay exact).",
)


class SyscallFilter(Strict):
    """A task is traced when it matches every non-empty list (OR within a list)."""

    pids: list[Annotated[int, Field(gt=0)]] = Field(default_factory=list)
    comms: list[Annotated[str, Field(min_length=1, max_length=15)]] = Field(
        default_factory=list
    )
    # cgroup v2 ids, or paths (absolute or relative to /sys/fs/cgroup)
    cgroups: list[int | str] = Field(default_factory=list)


class SyscallLatencyConfig(ProbeConfig):
    max_entries: int = Field(default=8192, ge=64, le=1 << 20)
    # workload: per container (else cgroup) and executable; process: per pid (grows with
    # churn); cgroup; system
    aggregation: Aggregation = "workload"
    # time one in this many calls that stay on the CPU (every call that leaves it is
    # timed); 1 times every call, at about twice the cost per call
    sample_period: int = Field(default=64, ge=1, le=1 << 16)
    filter: SyscallFilter = Field(default_factory=SyscallFilter)
    slow_spans: SlowSpansConfig = Field(default_factory=SlowSpansConfig)


class SyscallLatency(Probe[SyscallLatencyConfig]):
    name = "syscall_latency"
    summary = ("every syscall counted, and its latency as a histogram per workload and "
               "syscall, in the kernel")
    config_class = SyscallLatencyConfig
    # the switch hook first: a call must never enter unseen by it
    hooks = (
        Hook("raw_tracepoint", "sched/sched_switch", "on_sched_switch"),
        Hook("raw_tracepoint", "raw_syscalls/sys_exit", "on_sys_exit"),
        Hook("raw_tracepoint", "raw_syscalls/sys_enter", "on_sys_enter"),
    )
    signals = frozenset({Signal.METRICS, Signal.SPANS})
    exports = (SYSCALL_DURATION,)
    # and the slow calls' user stacks cut short, by why (probes/user_stack.h)
    lost_stats = ("map_full", "no_start", "rate_limited", "buffer_full",
                  "no_task_storage", "no_memory", "timing_lost", "slow_stack_lost",
                  *UNWIND_LOST)
    filters_cgroups = True
    wired_at_start = ("slow_spans.exemplars_per_series",)  # the series store's

    def __init__(self, config: SyscallLatencyConfig, syscalls: SyscallTable,
                 clock: MonotonicClock | None = None, perf_buffer: bool | None = None,
                 select_cgroups: bool = False, unwinder: SharedUnwinder | None = None
                 ) -> None:
        super().__init__(config, select_cgroups=select_cgroups)
        self.syscalls = syscalls
        self.slow: SlowCallStream | None = None
        if config.slow_spans.enabled:
            perf = not ring_buffer_supported() if perf_buffer is None else perf_buffer
            self.slow = SlowCallStream(config.slow_spans, syscalls, clock or MonotonicClock(),
                                       perf, config.aggregation, unwinder)
        self._terminal_reads_seen = 0
        self._stacks_lost_seen = 0
        self._forgotten_seen = 0
        self.latency = Generations("latency")
        self.estimator = FastCallEstimator()

    @classmethod
    def create(cls, config: ProbeConfig, context: ProbeContext) -> SyscallLatency:
        assert isinstance(config, SyscallLatencyConfig)
        return cls(config, context.syscalls, select_cgroups=context.select_cgroups,
                   unwinder=context.unwinder)

    @classmethod
    def produces(cls, config: ProbeConfig) -> frozenset[Signal]:
        assert isinstance(config, SyscallLatencyConfig)
        signals = super().produces(config)
        return signals if config.slow_spans.enabled else signals - {Signal.SPANS}

    @classmethod
    def exemplars_per_series(cls, config: ProbeConfig) -> int:
        assert isinstance(config, SyscallLatencyConfig)
        return config.slow_spans.exemplars_per_series

    def program_flags(self) -> list[str]:
        flags = [f"-DMAX_ENTRIES={self.config.max_entries}",
                 f"-DSAMPLE_PERIOD={self.config.sample_period}"]
        numbers = {name: nr for nr, name in self.syscalls.names.items()}
        if "execve" in numbers and "execveat" in numbers:
            flags += [f"-DNR_EXECVE={numbers['execve']}", f"-DNR_EXECVEAT={numbers['execveat']}"]
        if "clone" in numbers:  # a child's first return: no call of its own
            flags += [f"-DNR_{name.upper()}={numbers.get(name, -1)}"
                      for name in ("clone", "clone3", "fork", "vfork")]
        flags += aggregation_flags(self.name, self.config.aggregation)
        f = self.config.filter
        flags += [flag for flag, on in (("-DFILTER_TGID", f.pids), ("-DFILTER_COMM", f.comms))
                  if on]
        if self.slow is not None:
            flags += slow_cflags(self.config.slow_spans, self.syscalls, self.slow.perf)
        return flags

    def cgroup_filter_specs(self) -> list[int | str]:
        return list(self.config.filter.cgroups)

    def prepare(self, program: Program) -> None:
        """The pid and comm filters, and the slow-call thresholds and event buffer."""
        f = self.config.filter
        if f.pids:
            program.map("tgid_filter").set_members(ct.c_uint32(p) for p in f.pids)
        if f.comms:
            comm_map = program.map("comm_filter")
            keys = []
            for comm in f.comms:
                key = comm_map.key_type()
                key.comm = comm.encode()[:15]
                keys.append(key)
            comm_map.set_members(keys)
        if self.slow is not None:
            self.slow.attach(program)

    def collect(self) -> Collection:
        if self._program is None:
            return Collection(self.name)
        entries = self.latency.drain(self._program)
        lost = self.lost(self.take_stats())
        if self.slow is not None and self.slow.terminal_reads > self._terminal_reads_seen:
            lost["terminal_read_filtered"] = self.slow.terminal_reads - self._terminal_reads_seen
            self._terminal_reads_seen = self.slow.terminal_reads
        if self.slow is not None:
            if self.slow.stacks_lost > self._stacks_lost_seen:
                lost["slow_stack_lost"] = (lost.get("slow_stack_lost", 0)
                                           + self.slow.stacks_lost - self._stacks_lost_seen)
                self._stacks_lost_seen = self.slow.stacks_lost
            self.slow.end_interval(self.config.interval)
        if self.estimator.forgotten > self._forgotten_seen:
            lost["unsampled_forgotten"] = self.estimator.forgotten - self._forgotten_seen
            self._forgotten_seen = self.estimator.forgotten
        records: list[Record] = []
        seen: set[object] = set()
        for key, value in entries:
            seen.add(bytes(key))
            record = self.decode(key, value)
            if record is not None:
                records.append(record)
        for meta, estimate in self.estimator.settle(seen):
            workload, attributes = cast(tuple[Workload, dict[str, AttributeValue]], meta)
            records.append(_record(workload, attributes, estimate, 0, 0))
        return Collection(self.name, records, lost,
                          map_fill={"latency": (len(entries), self.config.max_entries)})

    def decode(self, key: Any, value: Any) -> ExpHistogramDelta | None:
        """One drained entry as a histogram of every call counted in it (None when all its
        calls still wait for a sample to be spread by)."""
        comm = value.comm.decode(errors="replace")
        exe = value.exe.decode(errors="replace")
        cgroup = int(key.cgroup_id or value.cgroup_id)
        nr = int(key.nr)
        workload, attributes = series_of(self.config.aggregation, self.syscalls.name(nr),
                                         int(key.tgid), comm, cgroup, exe)
        interval = Interval(
            calls=int(value.calls),
            offcpu=trim(HIST_MIN_INDEX, bytes(value.offcpu_buckets)),
            offcpu_sum_s=value.offcpu_sum_ns / 1e9,
            sampled=trim(HIST_MIN_INDEX, bytes(value.sampled_buckets)),
            sampled_sum_s=value.sampled_sum_ns / 1e9,
        )
        estimate = self.estimator.estimate(bytes(key), nr, interval, (workload, attributes))
        if not estimate.count:
            return None
        return _record(workload, attributes, estimate, int(value.min_ns), int(value.max_ns))

    def poll_spans(self) -> list[SpanRecord]:
        return self.slow.poll() if self.slow is not None else []

    def stop(self) -> None:
        if self.slow is not None:
            self.slow.detach()
        super().stop()

    def settings(self) -> list[Setting]:
        return [Setting(SAMPLE_PERIOD, {"probe": self.name}, self.config.sample_period)]


def _record(workload: Workload, attributes: dict[str, AttributeValue], estimate: Estimate,
            min_ns: int, max_ns: int) -> ExpHistogramDelta:
    """The histogram delta of an estimate. min and max are the timed calls' where they
    fall in the populated end buckets, else those buckets' bounds: spread calls may lie
    anywhere in their bucket."""
    first = next(i for i, c in enumerate(estimate.counts) if c) + estimate.offset
    last = max(i for i, c in enumerate(estimate.counts) if c) + estimate.offset
    lo, hi = min_ns / 1e9, max_ns / 1e9
    if not min_ns or lo > bucket_upper_bound(first, HIST_SCALE):
        lo = bucket_lower_bound(first, HIST_SCALE)
    if not max_ns or hi <= bucket_lower_bound(last, HIST_SCALE):
        hi = bucket_upper_bound(last, HIST_SCALE)
    return ExpHistogramDelta(
        descriptor=SYSCALL_DURATION,
        workload=workload,
        attributes=dict(attributes),
        scale=HIST_SCALE,
        offset=estimate.offset,
        bucket_counts=estimate.counts,
        count=estimate.count,
        sum=estimate.sum_s,
        min=lo,
        max=hi,
    )
