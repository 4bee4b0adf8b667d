"""Decoder for probes/syscall_latency.bpf.c: drained latency maps -> exponential histograms.

The kernel already bucketed every duration at OTLP scale 2 in seconds (see the .bpf.c), so
decoding is a copy of the populated bucket span, not a re-bucketing.
"""

from __future__ import annotations

import ctypes as ct
import logging
import time
from typing import Any

from otel_ebpf.clock import MonotonicClock
from otel_ebpf.config import SyscallLatencyConfig
from otel_ebpf.enrich.cgroup import cgroup_id
from otel_ebpf.histogram import trim
from otel_ebpf.kernel.engine import Engine, Program, update_set_map
from otel_ebpf.kernel.syscalls import SyscallTable
from otel_ebpf.model import (
    Collection,
    ExpHistogramDelta,
    MetricDescriptor,
    SpanRecord,
    Workload,
)
from otel_ebpf.probes.base import Hook, Probe
from otel_ebpf.probes.slow_syscalls import SlowCallStream, ring_buffer_supported
from otel_ebpf.probes.slow_syscalls import cflags as slow_cflags

log = logging.getLogger(__name__)

# Keep in sync with probes/syscall_latency.bpf.c.
HIST_SCALE = 2
HIST_MIN_INDEX = -104
HIST_BUCKETS = 152
_STAT_REASONS = ("map_full", "no_start", "rate_limited", "buffer_full")
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
    summary = "latency of every syscall, histogram per process and syscall, in the kernel"
    hooks = (
        Hook("raw_tracepoint", "raw_syscalls/sys_enter"),
        Hook("raw_tracepoint", "raw_syscalls/sys_exit"),
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
        self._stats_seen = [0] * len(_STAT_REASONS)
        self._generation = 0  # which latency_<n> map the programs write

    def cflags(self) -> list[str]:
        flags = [f"-DMAX_ENTRIES={self.config.max_entries}"]
        if self.config.aggregation == "process":
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
        return flags

    def verify(self, engine: Engine) -> None:
        engine.verify(self.name, self.cflags(),
                      [("on_sys_enter", "raw_tracepoint"), ("on_sys_exit", "raw_tracepoint")])

    def start(self, engine: Engine) -> None:
        program = engine.load(self.name, self.cflags())
        self._program = program
        try:
            self._fill_filters(program)
            if self.slow is not None:
                self.slow.attach(program)
            program.attach_raw_tracepoint("sys_enter", "on_sys_enter")
            program.attach_raw_tracepoint("sys_exit", "on_sys_exit")
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
        return Collection(self.name, [self.decode(k, v) for k, v in entries], lost)

    def decode(self, key: Any, value: Any) -> ExpHistogramDelta:
        offset, counts = trim(HIST_MIN_INDEX, bytes(value.buckets))
        # per-process keys carry no cgroup (a shorter key is a cheaper hash); the value
        # recorded it at insert. System-wide series belong to no cgroup.
        cgroup = int(getattr(key, "cgroup_id", value.cgroup_id))
        if self.config.aggregation == "system":
            cgroup = 0
        return ExpHistogramDelta(
            descriptor=SYSCALL_DURATION,
            workload=Workload(int(key.tgid), value.comm.decode(errors="replace"), cgroup),
            attributes={"linux.syscall.name": self.syscalls.name(int(key.nr))},
            scale=HIST_SCALE,
            offset=offset,
            bucket_counts=counts,
            count=sum(counts),
            sum=value.sum_ns / 1e9,
            min=value.min_ns / 1e9,
            max=value.max_ns / 1e9,
        )

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
