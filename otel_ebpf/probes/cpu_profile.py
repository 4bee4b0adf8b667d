"""Decoder for probes/cpu_profile.bpf.c: drained stack counts -> symbolized stack samples,
their native frames unwound in the kernel (probes/user_stack.h, tables loaded by
symbolize.unwind) and CPython's frames merged in (symbolize.python). Stacks are interned
and aged as every stacks.h program's are (probes/stacks.py).
"""

from __future__ import annotations

import logging
import math
import os
import time

from pydantic import Field

from otel_ebpf.kernel import btf as kbtf
from otel_ebpf.kernel.engine import Program
from otel_ebpf.model import Collection, MetricDescriptor, ProfileType, StackSample
from otel_ebpf.probes.base import Hook
from otel_ebpf.probes.profiler import StackProfileConfig, StackProfiler
from otel_ebpf.probes.stacks import stack_errors
from otel_ebpf.symbolize.python.unwinder import PythonUnwinder, merge
from otel_ebpf.symbolize.symbols import Frame, Symbolizer
from otel_ebpf.symbolize.unwind import shared as unwind_shared
from otel_ebpf.symbolize.unwind.shared import UNWIND_LOST, SharedUnwinder

log = logging.getLogger(__name__)

# the members of struct sample_key and struct sample_value of probes/cpu_profile.bpf.c that
# decode() reads, in order; their layout comes from the compiled program (unpacked in
# bulk: a drain can hold thousands of entries)
SAMPLE_KEY_FIELDS = ("tgid", "tid", "user_stack", "kernel_stack", "python_stack",
                     "user_stack_err", "kernel_stack_err", "comm")
SAMPLE_VALUE_FIELDS = ("count", "cgroup_id")

# the CPython walk's (probes/python_stack.h): the Python frames cut short or missing
PYTHON_LOST = ("py_truncated", "py_read_failed", "py_thread_lost", "py_stack_lost")

PROFILE_SAMPLES = MetricDescriptor(
    "cpu.samples", "{sample}",
    "On-CPU stack samples of the software cpu-clock (exported as OTLP profiles).")
# each sample's value counts samples, one every `period` nanoseconds of CPU time
ON_CPU = ProfileType("samples", "count", "cpu", "nanoseconds")


class CpuProfileConfig(StackProfileConfig):
    # a prime, so sampling does not run in lockstep with periodic work
    frequency: int = Field(default=19, ge=1, le=10_000)
    # keys of the in-kernel sample counts: null sizes it from frequency x CPUs x interval
    # (a drain walks every bucket, so an oversized map costs CPU on every drain)
    max_samples: int | None = Field(default=None, ge=64, le=1 << 20)
    # rows of DWARF unwind tables held in the kernel (8 bytes each, preallocated: the
    # default is 8 MiB, the tables of ~30 large binaries such as libc, python, libcrypto);
    # this and unwind_processes size the unwinder every stack probe shares (off_cpu's,
    # slow-call stacks'), whether or not this probe is enabled
    unwind_table_rows: int = Field(default=unwind_shared.DEFAULT_ROWS, ge=1 << 10,
                                   le=1 << 24)
    # processes whose executable mappings the kernel unwinder knows (~4 KiB each, as used)
    unwind_processes: int = Field(default=unwind_shared.DEFAULT_PROCESSES, ge=64,
                                  le=1 << 16)
    # distinct CPython stacks held in the kernel (~800 bytes each, allocated as used)
    python_stack_entries: int = Field(default=4096, ge=256, le=1 << 20)
    keep_idle: bool = False


def samples_map_size(config: CpuProfileConfig, cpus: int) -> int:
    """Keys for one interval's sample counts: at most one new key per sample, twice that for
    a late drain, as a power of two (the kernel rounds buckets up to one anyway)."""
    if config.max_samples is not None:
        return config.max_samples
    wanted = max(256.0, 2 * config.frequency * cpus * config.interval)
    return min(1 << 20, 1 << math.ceil(math.log2(wanted)))


class CpuProfile(StackProfiler[CpuProfileConfig]):
    name = "cpu_profile"
    summary = "sampled on-CPU stacks (kernel + user) of every process, counted in the kernel"
    config_class = CpuProfileConfig
    hooks = (Hook("perf_event", None, "on_cpu_sample", note="software cpu-clock, one per CPU"),)
    exports = (PROFILE_SAMPLES,)
    # idle samples are dropped by design and `samples` is a total
    lost_stats = ("user_stack_lost", "kernel_stack_lost", "map_full", "announce_lost",
                  *PYTHON_LOST,
                  # user stacks kept but cut short (probes/user_stack.h)
                  *UNWIND_LOST)
    profile_type = ON_CPU
    sample_key_fields = SAMPLE_KEY_FIELDS
    sample_value_fields = SAMPLE_VALUE_FIELDS
    # the profile export's, and the shared unwinder's sizes
    wired_at_start = ("folded_path", "unwind_table_rows", "unwind_processes")

    def __init__(self, config: CpuProfileConfig, symbolizer: Symbolizer | None = None,
                 select_cgroups: bool = False, unwinder: SharedUnwinder | None = None
                 ) -> None:
        # the agent's unwinder is sized from this section (daemon.py); without one, so is
        # this probe's own
        super().__init__(config, symbolizer, select_cgroups, unwinder or SharedUnwinder(
            config.unwind_table_rows, config.unwind_processes))
        self.period_ns = 1_000_000_000 // config.frequency
        self.max_samples = samples_map_size(config, os.cpu_count() or 1)
        self._python: PythonUnwinder | None = None

    def program_flags(self) -> list[str]:
        c = self.config
        flags = [f"-DSAMPLE_HZ={c.frequency}", f"-DMAX_SAMPLES={self.max_samples}",
                 f"-DUSER_STACK_ENTRIES={c.user_stack_entries}",
                 f"-DKERNEL_STACK_ENTRIES={c.kernel_stack_entries}",
                 f"-DPY_STACK_ENTRIES={c.python_stack_entries}",
                 *unwind_shared.COMPILE_FLAGS, *task_offset_flags()]
        if c.keep_idle:
            flags.append("-DKEEP_IDLE")
        return flags

    def sample_frequency(self) -> int:
        return self.config.frequency

    def prepare(self, program: Program) -> None:
        super().prepare(program)
        assert self._stacks is not None
        self._python = PythonUnwinder(program.map("py_procs"), program.map("py_layouts"),
                                      program.map("py_codes"), program.map("py_stacks"),
                                      self._stacks.user.retain_drains)

    def remember(self, tgid: int) -> None:
        super().remember(tgid)
        if self._python is not None:
            self._python.on_new_process(tgid)

    def collect(self) -> Collection:
        if self._program is None:
            return Collection(self.name)
        began = time.monotonic()
        samples, fill, grown = self.drain()
        if self._python is not None:
            with self._symbols_lock:
                self._python.end_drain()
        took = time.monotonic() - began
        if took > self.config.interval:
            log.info("cpu_profile: symbolizing %d stacks took %.2fs (longer than the %.2fs "
                     "interval)", len(samples), took, self.config.interval)
        return Collection(self.name, samples=samples, lost_events=self.lost(grown),
                          period_ns=self.period_ns, profile_type=self.profile_type,
                          map_fill=fill)

    def decode(self, key: tuple[int, int, int, int, int, int, int, bytes],
               value: tuple[int, int]) -> StackSample:
        """One samples entry (SAMPLE_KEY_FIELDS, SAMPLE_VALUE_FIELDS) -> a symbolized
        sample."""
        assert self._stacks is not None
        tgid, tid, user_id, kernel_id, python_id, user_err, kernel_err, raw_comm = key
        count, cgroup_id = value
        lost = stack_errors(user_err, kernel_err)
        # (tgid, kernel, user, python stack ids) -> frames: a hot stack is symbolized once
        frames = self._stacks.frames((tgid, kernel_id, user_id, python_id), kernel_id, user_id)
        if frames is None:
            kernel_addrs, user_addrs = self._stacks.addresses(kernel_id, user_id, count, lost)
            with self._symbols_lock:
                kernel = (self.symbolizer.kernel_frames(kernel_addrs) if kernel_addrs
                          else [])
                user = self.symbolizer.user_frames(tgid, user_addrs) if user_addrs else []
                python = self._python_frames(tgid, python_id)
            # leaf first: the kernel part sits on top
            frames = tuple(kernel) + (merge(user, python) if python else tuple(user))
            # frames outside every known file may resolve later (a library mapped after
            # the snapshot, JIT code named since); one in a file without its symbol will
            # not (a stripped interpreter's frames, for one: not caching them cost more
            # than the rest of a Python process's symbolization)
            if kernel_addrs is not None and user_addrs is not None and all(
                    f.function or final_without_name(f) for f in frames):
                self._stacks.keep((tgid, kernel_id, user_id, python_id), frames)
        workload = self._stacks.workload(tgid, raw_comm, cgroup_id)
        return StackSample(
            workload=workload,
            thread_id=tid,
            thread_name=workload.comm,
            frames=frames,
            count=count,
            lost_stacks=tuple(lost),
        )

    def _python_frames(self, tgid: int, python_id: int) -> list[tuple[Frame, bool]]:
        if not python_id or self._python is None:
            return []
        return self._python.named(tgid, python_id)

    def stop(self) -> None:
        super().stop()
        if self._python is not None:
            self._python.close()
            self._python = None


def final_without_name(frame: Frame) -> bool:
    """An unnamed frame that no later look-up will name: a native frame in a mapped file
    whose symbol table does not have it."""
    return (frame.kind == "native" and frame.mapping is not None
            and frame.mapping.path.startswith("/"))


def task_offset_flags() -> list[str]:
    """-D flags of the task_struct members the program reads, from the running kernel's
    BTF; -1 for one it cannot know. thread.fsbase is pthread_self() on x86-64 (how CPython
    3.8-3.10 name a thread); group_leader and start_time tell a reused pid's process."""
    members = {"TASK_FSBASE_OFF": "thread.fsbase", "TASK_GROUP_LEADER_OFF": "group_leader",
               "TASK_START_TIME_OFF": "start_time"}
    out = {}
    for flag, path in members.items():
        try:
            out[flag] = kbtf.vmlinux().member_offset("task_struct", path, 8)
        except (kbtf.BtfError, OSError):
            out[flag] = -1
    if out["TASK_GROUP_LEADER_OFF"] < 0:
        out["TASK_START_TIME_OFF"] = -1
    return [f"-D{flag}={offset}" for flag, offset in out.items()]
