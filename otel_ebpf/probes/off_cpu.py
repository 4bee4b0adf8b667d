"""Decoder for probes/off_cpu.bpf.c: where threads wait, as an OTLP profile of its own.

The kernel records the stacks of a thread that leaves the CPU blocked and, when it runs
again, adds the time it was away to its (thread, stacks) key: the drained sums are stack
samples whose values are nanoseconds off the CPU, exported with sample type `off_cpu` /
`nanoseconds` (the OpenTelemetry eBPF profiler's naming, so backends that read its
profiles read these). Stacks are interned by content (probes/stacks.h) and read, cached
and aged as every stacks.h program's are (probes/stacks.py).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import platform
from collections import Counter

from pydantic import Field

from otel_ebpf.config_base import Duration
from otel_ebpf.kernel import btf as kbtf
from otel_ebpf.kernel.engine import EngineError
from otel_ebpf.model import Collection, MetricDescriptor, ProfileType, StackSample
from otel_ebpf.probes.base import Hook
from otel_ebpf.probes.profiler import StackProfileConfig, StackProfiler
from otel_ebpf.probes.runqueue_latency import MIN_KERNEL, kernel_release
from otel_ebpf.probes.stacks import stack_errors
from otel_ebpf.symbolize.symbols import Symbolizer
from otel_ebpf.symbolize.unwind import shared as unwind_shared
from otel_ebpf.symbolize.unwind.shared import UNWIND_LOST, SharedUnwinder

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


class OffCpuConfig(StackProfileConfig):
    # opt-in: it walks two stacks at every blocking context switch (README: Off-CPU
    # profiles, the measured cost)
    enabled: bool = False
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
    keep_kernel_threads: bool = False


class OffCpu(StackProfiler[OffCpuConfig]):
    name = "off_cpu"
    summary = ("off-CPU profiles: the kernel + user stacks of blocked threads, weighted by "
               "the time until they ran again, summed in the kernel")
    config_class = OffCpuConfig
    hooks = (Hook("raw_tracepoint", "sched/sched_switch", "on_switch"),)
    exports = (OFF_CPU_TIME,)
    # `short` waits are dropped by design and `waits` is a total; rate_limited waits keep
    # their time but lose their stacks; user stacks cut short are counted by why
    lost_stats = ("rate_limited", "user_stack_lost", "kernel_stack_lost", "map_full",
                  "tasks_full", "announce_lost", *UNWIND_LOST)
    profile_type = OFF_CPU
    sample_key_fields = SAMPLE_KEY_FIELDS
    sample_value_fields = SAMPLE_VALUE_FIELDS

    def __init__(self, config: OffCpuConfig, symbolizer: Symbolizer | None = None,
                 select_cgroups: bool = False, unwinder: SharedUnwinder | None = None
                 ) -> None:
        super().__init__(config, symbolizer, select_cgroups, unwinder)
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
        return [*flags, *unwind_shared.COMPILE_FLAGS, f"-DTASK_MM_OFF={mm}"]

    def collect(self) -> Collection:
        if self._program is None:
            return Collection(self.name)
        samples, fill, grown = self.drain()
        self.totals.update(grown)
        return Collection(self.name, samples=samples, lost_events=self.lost(grown),
                          period_ns=1, profile_type=self.profile_type, map_fill=fill)

    def decode(self, key: tuple[int, int, int, int, int, int, bytes],
               value: tuple[int, int, int]) -> StackSample:
        """One samples entry -> a symbolized sample whose count is nanoseconds off-CPU."""
        assert self._stacks is not None
        tgid, tid, user_id, kernel_id, user_err, kernel_err, raw_comm = key
        total_ns, _waits, cgroup_id = value
        lost = stack_errors(user_err, kernel_err)
        frames = self._stacks.frames((tgid, kernel_id, user_id), kernel_id, user_id)
        if frames is None:
            # a lost stack counts once per wait key (its nanoseconds are not events)
            kernel_addrs, user_addrs = self._stacks.addresses(kernel_id, user_id, 1, lost)
            with self._symbols_lock:
                kernel = (self.symbolizer.kernel_frames(kernel_addrs) if kernel_addrs
                          else [])
                user = self.symbolizer.user_frames(tgid, user_addrs) if user_addrs else []
            while kernel and (kernel[0].function or "").startswith(TRACING_FRAMES):
                del kernel[0]
            frames = tuple(kernel + user)  # leaf first: the kernel part sits on top
            if kernel_addrs is not None and user_addrs is not None and all(
                    f.function for f in frames):
                self._stacks.keep((tgid, kernel_id, user_id), frames)
        workload = self._stacks.workload(tgid, raw_comm, cgroup_id)
        return StackSample(workload=workload, thread_id=tid, thread_name=workload.comm,
                           frames=frames, count=total_ns, lost_stacks=tuple(lost))
