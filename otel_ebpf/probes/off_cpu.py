"""Decoder for probes/off_cpu.bpf.c: where threads wait, as an OTLP profile of its own.

The kernel records the stacks of a thread that leaves the CPU blocked and, when it runs
again, adds the time it was away to its (thread, stacks) key: the drained sums are stack
samples whose values are nanoseconds off the CPU, exported with sample type `off_cpu` /
`nanoseconds` (the OpenTelemetry eBPF profiler's naming, so backends that read its
profiles read these). Stacks are interned by content (probes/stacks.h) and read, cached
and aged as the CPU profile's are (cpu_profile.InternedStacks).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import platform
import struct
import threading
from collections import Counter
from typing import Any

from pydantic import Field

from otel_ebpf.config_base import Duration, ProfilesProbeConfig
from otel_ebpf.kernel import btf as kbtf
from otel_ebpf.kernel.engine import EngineError, Program
from otel_ebpf.kernel.maps import unpacker
from otel_ebpf.model import Collection, MetricDescriptor, ProfileType, StackSample, Workload
from otel_ebpf.probes.base import Hook, Probe, Signal
from otel_ebpf.probes.cpu_profile import RETAIN_S, STACK_CACHE_ENTRIES, InternedStacks
from otel_ebpf.probes.runqueue_latency import MIN_KERNEL, kernel_release
from otel_ebpf.symbolize.symbols import Frame, Symbolizer

log = logging.getLogger(__name__)

SAMPLE_KEY_FIELDS = ("tgid", "tid", "user_stack", "kernel_stack", "user_stack_err",
                     "kernel_stack_err", "comm")
SAMPLE_VALUE_FIELDS = ("total_ns", "count", "cgroup_id")
NOT_CAPTURED = -errno.EAGAIN  # both stacks' error when the capture limit refused them
# the tracing machinery on top of every kernel stack taken in the tracepoint: not where
# the thread waits, dropped from the profile
TRACING_FRAMES = ("bpf_prog_", "bpf_trace_run", "__bpf_trace_", "__traceiter_")

OFF_CPU_TIME = MetricDescriptor(
    "off_cpu.time", "ns",
    "Time threads spent blocked off the CPU, by stack (exported as OTLP profiles).")
# each sample's value is nanoseconds off the CPU, every wait counted (no sampling period)
OFF_CPU = ProfileType("off_cpu", "nanoseconds", "off_cpu", "nanoseconds")


class OffCpuConfig(ProfilesProbeConfig):
    # opt-in: it walks two stacks at every blocking context switch (README: Off-CPU
    # profiles, the measured cost)
    enabled: bool = False
    interval: Duration = 1.0  # drain period
    # waits shorter than this are dropped (counted): most are ping-pongs nobody waits on
    min_block: Duration = 0.001
    # stack captures a second, the machine's total, each CPU its share; a wait whose
    # stacks the limit refused keeps its time under its thread, with no stack
    rate_per_second: int = Field(default=1000, ge=1, le=1_000_000)
    burst: int = Field(default=200, ge=1, le=1_000_000)
    # (thread, stacks) keys per interval; beyond, waits are counted lost
    max_samples: int = Field(default=8192, ge=256, le=1 << 20)
    # tasks off the CPU at once that can be tracked (least recently blocked evicted)
    max_tasks: int = Field(default=16384, ge=1024, le=1 << 20)
    user_stack_entries: int = Field(default=16384, ge=256, le=1 << 20)
    kernel_stack_entries: int = Field(default=4096, ge=256, le=1 << 20)
    keep_kernel_threads: bool = False


class OffCpu(Probe[OffCpuConfig]):
    name = "off_cpu"
    summary = ("off-CPU profiles: the kernel + user stacks of blocked threads, weighted by "
               "the time until they ran again, summed in the kernel")
    config_class = OffCpuConfig
    hooks = (Hook("raw_tracepoint", "sched/sched_switch", "on_switch"),)
    signals = frozenset({Signal.PROFILES})
    exports = (OFF_CPU_TIME,)
    # `short` waits are dropped by design and `waits` is a total; rate_limited waits keep
    # their time but lose their stacks
    lost_stats = ("rate_limited", "user_stack_lost", "kernel_stack_lost", "map_full",
                  "tasks_full", "announce_lost")
    filters_cgroups = True
    profile_type = OFF_CPU

    def __init__(self, config: OffCpuConfig, symbolizer: Symbolizer | None = None,
                 select_cgroups: bool = False) -> None:
        super().__init__(config, select_cgroups=select_cgroups)
        self.symbolizer = symbolizer or Symbolizer()
        self._user_stacks: InternedStacks | None = None
        self._kernel_stacks: InternedStacks | None = None
        self._keys = self._values = struct.Struct("")
        self._symbols_lock = threading.Lock()
        self._stack_cache: dict[tuple[int, int, int], tuple[Frame, ...]] = {}
        self._workloads: dict[tuple[int, bytes, int], Workload] = {}
        # every counter of the program since start, dropped-by-design ones included
        self.totals: Counter[str] = Counter()

    def program_flags(self) -> list[str]:
        if kernel_release() < MIN_KERNEL:
            raise EngineError(
                f"{self.name}: needs Linux {'.'.join(map(str, MIN_KERNEL))} or later (its "
                f"sched_switch tracepoint passes the task's state); this is "
                f"{platform.release()}. Set probes.{self.name}.enabled: false")
        c = self.config
        cpus = os.cpu_count() or 1
        # each CPU gets its share of the rate and of the burst
        interval_ns = max(1, int(1e9 * cpus / c.rate_per_second))
        flags = [f"-DTASKS={c.max_tasks}", f"-DMAX_SAMPLES={c.max_samples}",
                 f"-DUSER_STACK_ENTRIES={c.user_stack_entries}",
                 f"-DKERNEL_STACK_ENTRIES={c.kernel_stack_entries}",
                 f"-DMIN_BLOCK_NS={int(c.min_block * 1e9)}ULL",
                 f"-DRATE_INTERVAL_NS={interval_ns}ULL",
                 f"-DRATE_BURST={max(1, math.ceil(c.burst / cpus))}ULL"]
        if c.keep_kernel_threads:
            flags.append("-DKEEP_KERNEL_THREADS")
        try:
            btf = kbtf.vmlinux()
            mm = btf.member_offset("task_struct", "mm", btf.pointer_size)
        except kbtf.BtfError as exc:
            raise EngineError(
                f"{self.name}: cannot find a task's address space on this kernel: {exc} "
                "(it reads task_struct.mm at its offset in /sys/kernel/btf/vmlinux, "
                "CONFIG_DEBUG_INFO_BTF=y). Set probes.off_cpu.enabled: false") from exc
        return [*flags, f"-DTASK_MM_OFF={mm}"]

    def prepare(self, program: Program) -> None:
        samples = program.map("samples")
        try:
            self._keys = unpacker(samples.key_type, SAMPLE_KEY_FIELDS)
            self._values = unpacker(samples.value_type, SAMPLE_VALUE_FIELDS)
        except ValueError as exc:
            raise EngineError(f"off_cpu: the compiled samples map is not what the decoder "
                              f"reads: {exc} (a bug: report it)") from exc
        retain = max(1, math.ceil(RETAIN_S / self.config.interval))
        self._user_stacks = InternedStacks(program.map("user_stacks"),
                                           self.config.user_stack_entries, retain)
        self._kernel_stacks = InternedStacks(program.map("kernel_stacks"),
                                             self.config.kernel_stack_entries, retain)
        program.open_event_buffer("new_tgids", self._on_new_tgid, perf=False)

    def _on_new_tgid(self, event: Any) -> None:
        with self._symbols_lock:
            self.symbolizer.remember(int(event.tgid))

    def poll_spans(self) -> list[Any]:
        # not spans: new-process announcements, read as they come so that short-lived
        # processes have their maps captured while they live (as cpu_profile)
        if self._program is not None:
            self._program.poll_event_buffers()
        return []

    def collect(self) -> Collection:
        if self._program is None:
            return Collection(self.name)
        assert self._user_stacks is not None and self._kernel_stacks is not None
        keys, values = self._program.map("samples").drain_bytes()
        evicted = {"user_stack_lost": 0, "kernel_stack_lost": 0}
        samples = [self.decode(key, value, evicted) for key, value in zip(
            self._keys.iter_unpack(keys), self._values.iter_unpack(values), strict=True)]
        self._user_stacks.end_drain()
        self._kernel_stacks.end_drain()
        grown = self.take_stats()
        self.totals.update(grown)
        for name, n in evicted.items():
            grown[name] += n
        fill = {"samples": (len(samples), self.config.max_samples),
                "user_stacks": (len(self._user_stacks), self.config.user_stack_entries),
                "kernel_stacks": (len(self._kernel_stacks), self.config.kernel_stack_entries)}
        return Collection(self.name, samples=samples, lost_events=self.lost(grown),
                          period_ns=1, profile_type=self.profile_type, map_fill=fill)

    def decode(self, key: tuple[int, int, int, int, int, int, bytes],
               value: tuple[int, int, int], evicted: dict[str, int]) -> StackSample:
        """One samples entry -> a symbolized sample whose count is nanoseconds off-CPU."""
        assert self._user_stacks is not None and self._kernel_stacks is not None
        tgid, tid, user_id, kernel_id, user_err, kernel_err, raw_comm = key
        total_ns, _waits, cgroup_id = value
        lost = [part for part, err in (("user", user_err), ("kernel", kernel_err))
                if err and err != -errno.EFAULT]
        if user_id:
            self._user_stacks.use(user_id)
        if kernel_id:
            self._kernel_stacks.use(kernel_id)
        frames = self._stack_cache.get((tgid, kernel_id, user_id))
        if frames is None:
            kernel_addrs = self._kernel_stacks.addresses(kernel_id) if kernel_id else ()
            user_addrs = self._user_stacks.addresses(user_id) if user_id else ()
            for part, addrs in (("kernel", kernel_addrs), ("user", user_addrs)):
                if addrs is None:  # deleted under a late wait: lost, not faked
                    lost.append(part)
                    evicted[f"{part}_stack_lost"] += 1
            with self._symbols_lock:
                kernel = (self.symbolizer.kernel_frames(kernel_addrs) if kernel_addrs
                          else [])
                user = self.symbolizer.user_frames(tgid, user_addrs) if user_addrs else []
            while kernel and (kernel[0].function or "").startswith(TRACING_FRAMES):
                del kernel[0]
            frames = tuple(kernel + user)  # leaf first: the kernel part sits on top
            if kernel_addrs is not None and user_addrs is not None and all(
                    f.function for f in frames):
                if len(self._stack_cache) >= STACK_CACHE_ENTRIES:
                    self._stack_cache.pop(next(iter(self._stack_cache)))
                self._stack_cache[(tgid, kernel_id, user_id)] = frames
        workload = self._workloads.get((tgid, raw_comm, cgroup_id))
        if workload is None:
            if len(self._workloads) >= STACK_CACHE_ENTRIES:
                self._workloads.clear()
            workload = self._workloads[(tgid, raw_comm, cgroup_id)] = Workload(
                tgid, raw_comm.split(b"\0", 1)[0].decode(errors="replace"), cgroup_id)
        return StackSample(workload=workload, thread_id=tid, thread_name=workload.comm,
                           frames=frames, count=total_ns, lost_stacks=tuple(lost))

    def stop(self) -> None:
        super().stop()
        self._user_stacks = self._kernel_stacks = None
