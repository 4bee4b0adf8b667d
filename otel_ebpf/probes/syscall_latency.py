"""Decoder for probes/syscall_latency.bpf.c: drained latency maps -> exponential histograms.

The kernel counts every call, times the calls that left the CPU and a sample of the
others, and buckets every timed duration at OTLP scale 2 in seconds (see the .bpf.c);
syscall_sampling spreads the untimed calls over their sample, so each exported histogram
counts every call.
"""

from __future__ import annotations

import ctypes as ct
import logging
import time
from typing import Any, cast

from otel_ebpf.clock import MonotonicClock
from otel_ebpf.config import SyscallLatencyConfig
from otel_ebpf.histogram import bucket_lower_bound, bucket_upper_bound, trim
from otel_ebpf.kernel import btf as kbtf
from otel_ebpf.kernel.cgroupfs import cgroup_id
from otel_ebpf.kernel.engine import Engine, EngineError, Program, update_set_map
from otel_ebpf.kernel.syscalls import SyscallTable
from otel_ebpf.model import (
    AttributeValue,
    Collection,
    ExpHistogramDelta,
    MetricDescriptor,
    Record,
    SpanRecord,
    Workload,
)
from otel_ebpf.probes.base import Hook, Probe
from otel_ebpf.probes.slow_syscalls import SlowCallStream, ring_buffer_supported, series_of
from otel_ebpf.probes.slow_syscalls import cflags as slow_cflags
from otel_ebpf.probes.syscall_sampling import Estimate, FastCallEstimator, Interval
from otel_ebpf.probes.task_layout import offset_flags

log = logging.getLogger(__name__)

# Keep in sync with probes/syscall_latency.bpf.c.
HIST_SCALE = 2
HIST_MIN_INDEX = -104
HIST_BUCKETS = 152
_STAT_REASONS = ("map_full", "no_start", "rate_limited", "buffer_full", "no_task_storage",
                 "no_memory", "timing_lost")
# After the generation flips, programs that read the old one may still be adding to its
# map: they finish within microseconds unless preempted; this covers a preempted one on
# anything but a hopelessly overloaded machine. The collecting thread sleeps, at no cost.
GENERATION_GRACE_S = 0.05

SYSCALL_DURATION = MetricDescriptor(
    name="linux.syscall.duration",
    unit="s",
    description="Time from syscall entry to exit, measured in the kernel per workload.",
)


class SyscallLatency(Probe):
    name = "syscall_latency"
    summary = ("every syscall counted, and its latency as a histogram per workload and "
               "syscall, in the kernel")
    hooks = (
        Hook("raw_tracepoint", "raw_syscalls/sys_enter"),
        Hook("raw_tracepoint", "raw_syscalls/sys_exit"),
        Hook("raw_tracepoint", "sched/sched_switch"),
    )
    exports = (SYSCALL_DURATION,)

    def __init__(self, config: SyscallLatencyConfig, syscalls: SyscallTable,
                 clock: MonotonicClock | None = None, perf_buffer: bool | None = None,
                 select_cgroups: bool = False) -> None:
        self.config = config
        self.select_cgroups = select_cgroups
        self._selected: set[int] = set()
        self.syscalls = syscalls
        self._program: Program | None = None
        self.slow: SlowCallStream | None = None
        if config.slow_spans.enabled:
            perf = not ring_buffer_supported() if perf_buffer is None else perf_buffer
            self.slow = SlowCallStream(config.slow_spans, syscalls, clock or MonotonicClock(),
                                       perf, config.aggregation)
        self._terminal_reads_seen = 0
        self._forgotten_seen = 0
        self._stats_seen = [0] * len(_STAT_REASONS)
        self._generation = 0  # which latency_<n> map the programs write
        self.estimator = FastCallEstimator()
        self._cflags: list[str] | None = None

    def cflags(self) -> list[str]:
        if self._cflags is not None:
            return self._cflags
        flags = [f"-DMAX_ENTRIES={self.config.max_entries}",
                 f"-DSAMPLE_PERIOD={self.config.sample_period}"]
        numbers = {name: nr for nr, name in self.syscalls.names.items()}
        if "execve" in numbers and "execveat" in numbers:
            flags += [f"-DNR_EXECVE={numbers['execve']}", f"-DNR_EXECVEAT={numbers['execveat']}"]
        if "clone" in numbers:  # a child's first return: no call of its own
            flags += [f"-DNR_{name.upper()}={numbers.get(name, -1)}"
                      for name in ("clone", "clone3", "fork", "vfork")]
        if self.config.aggregation == "workload":
            flags.append("-DKEY_WORKLOAD")
            try:
                flags += offset_flags(kbtf.vmlinux())
            except kbtf.BtfError as exc:
                raise EngineError(
                    f"{self.name}: cannot find a task's executable in this kernel: {exc}. "
                    "Workload series read it at offsets from /sys/kernel/btf/vmlinux "
                    "(CONFIG_DEBUG_INFO_BTF=y); where there is none, set "
                    "probes.syscall_latency.aggregation: cgroup") from exc
        elif self.config.aggregation == "process":
            flags.append("-DKEY_TGID")
        elif self.config.aggregation == "cgroup":
            flags.append("-DKEY_CGROUP")
        f = self.config.filter
        flags += [flag for flag, on in (
            ("-DFILTER_TGID", f.pids), ("-DFILTER_COMM", f.comms),
            ("-DFILTER_CGROUP", f.cgroups or self.select_cgroups)
        ) if on]
        if self.slow is not None:
            flags += slow_cflags(self.config.slow_spans, self.syscalls, self.slow.perf)
        self._cflags = flags
        return flags

    def verify(self, engine: Engine) -> None:
        engine.verify(self.name, self.cflags(),
                      [("on_sys_enter", "raw_tracepoint"), ("on_sys_exit", "raw_tracepoint"),
                       ("on_sched_switch", "raw_tracepoint")])

    def start(self, engine: Engine) -> None:
        program = engine.load(self.name, self.cflags())
        self._program = program
        try:
            self._fill_filters(program)
            if self.slow is not None:
                self.slow.attach(program)
            # the switch hook first: a call must never enter unseen by it
            program.attach_raw_tracepoint("sched_switch", "on_sched_switch")
            program.attach_raw_tracepoint("sys_exit", "on_sys_exit")
            program.attach_raw_tracepoint("sys_enter", "on_sys_enter")
        except Exception:
            self.stop()
            raise

    def _fill_filters(self, program: Program) -> None:
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
        if f.cgroups:
            program.map("cgroup_filter").set_members(
                ct.c_uint64(cgroup_id(c)) for c in f.cgroups
            )

    def collect(self) -> Collection:
        if self._program is None:
            return Collection(self.name)
        # swap maps, wait out the writers of the old one, then drain it: no count can land
        # in an entry the drain already copied
        drained = self._generation
        self._generation ^= 1
        self._program.map("generation").set(ct.c_int(0), ct.c_uint32(self._generation))
        time.sleep(GENERATION_GRACE_S)
        entries = self._program.map(f"latency_{drained}").drain()
        totals = self._program.map("probe_stats").percpu_sums()
        lost = {
            reason: total - seen
            for reason, total, seen in zip(_STAT_REASONS, totals, self._stats_seen, strict=True)
            if total > seen
        }
        self._stats_seen = totals
        if self.slow is not None and self.slow.terminal_reads > self._terminal_reads_seen:
            lost["terminal_read_filtered"] = self.slow.terminal_reads - self._terminal_reads_seen
            self._terminal_reads_seen = self.slow.terminal_reads
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

    def set_cgroup_filter(self, cgroup_ids: set[int]) -> None:
        if self._program is None or not self.select_cgroups:
            return
        static = {cgroup_id(c) for c in self.config.filter.cgroups}
        self._selected = update_set_map(self._program.map("cgroup_filter"),
                                        self._selected, cgroup_ids | static)

    def poll_spans(self) -> list[SpanRecord]:
        return self.slow.poll() if self.slow is not None else []

    def stop(self) -> None:
        if self._program is not None:
            self._program.close()
            self._program = None


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
