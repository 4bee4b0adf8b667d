"""Slow-call events of probes/syscall_latency.bpf.c -> span records.

The kernel side decides what is slow (per-syscall thresholds in an array map) and how many
events a second may leave (a token bucket); this module fills those maps from the config,
decodes the events and drops the few that only user space can recognise (a read of a
terminal is waiting for a human, not slow). Each event names the user stack that made the
call (interned by content in the kernel, probes/stacks.h): symbolized as the profiles
are, it is the span's `code.stacktrace`, so a slow fsync says which code path issued it.
"""

from __future__ import annotations

import ctypes as ct
import errno
import logging
import math
import os
import platform
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from otel_ebpf.clock import MonotonicClock
from otel_ebpf.config_base import Duration, Strict
from otel_ebpf.kernel.engine import Program
from otel_ebpf.kernel.syscalls import SyscallTable
from otel_ebpf.model import AttributeValue, SpanRecord, Workload
from otel_ebpf.probes.series import workload_of
from otel_ebpf.probes.stacks import RETAIN_S, InternedStacks
from otel_ebpf.symbolize.frames import Frame
from otel_ebpf.symbolize.symbols import Symbolizer
from otel_ebpf.symbolize.unwind import shared as unwind_shared
from otel_ebpf.symbolize.unwind.loader import UnwindLoader
from otel_ebpf.symbolize.unwind.shared import SharedUnwinder

log = logging.getLogger(__name__)

SYSCALL_SLOTS = 1024  # keep in sync with the .bpf.c
PAGE = 4096
MIN_RING_KERNEL = (5, 8)
STACKTRACE_CACHE = 4096  # (pid, stack) -> code.stacktrace strings kept
# syscalls whose first argument is a file descriptor worth showing on the span
FD_FIRST = frozenset({
    "read", "write", "pread64", "pwrite64", "readv", "writev", "preadv", "pwritev",
    "preadv2", "pwritev2", "recvfrom", "sendto", "recvmsg", "sendmsg", "recvmmsg",
    "sendmmsg", "connect", "accept", "accept4", "fsync", "fdatasync", "ioctl", "close",
    "fcntl", "getdents64", "sendfile", "splice", "ftruncate", "fallocate", "flock",
    "sync_file_range", "shutdown", "getsockopt", "setsockopt", "fstat", "lseek",
})
TERMINAL_READS = frozenset({"read", "readv", "pread64", "preadv", "preadv2"})
# Calls that block by design: slow is their normal, so they make no spans unless included.
BLOCKING_SYSCALLS = (
    "epoll_wait", "epoll_pwait", "epoll_pwait2", "poll", "ppoll", "select", "pselect6",
    "futex", "futex_waitv", "nanosleep", "clock_nanosleep", "wait4", "waitid", "pause",
    "rt_sigsuspend", "rt_sigtimedwait", "accept", "accept4", "io_getevents",
    "io_pgetevents", "io_uring_enter", "msgrcv", "semop", "semtimedop", "mq_timedreceive",
)


class SlowSpansConfig(Strict):
    """probes.syscall_latency.slow_spans: slow syscalls as spans; the kernel emits an event
    for each call over its threshold."""

    enabled: bool = True
    threshold: Duration = 0.010
    # per syscall name, overriding `threshold`
    thresholds: dict[str, Duration] = Field(default_factory=dict)
    exclude: list[str] = Field(default_factory=lambda: list(BLOCKING_SYSCALLS))
    # names taken back out of `exclude` (e.g. [nanosleep])
    include: list[str] = Field(default_factory=list)
    # reads of a terminal wait for a human: dropped in user space (counted)
    exclude_terminal_reads: bool = True
    rate_per_second: int = Field(default=1000, ge=1, le=1_000_000)
    burst: int = Field(default=200, ge=1, le=1_000_000)
    buffer_size: int = Field(default=1 << 20, ge=1 << 16, le=1 << 28,
                             description="kernel event buffer in bytes (power of two)")
    exemplars_per_series: int = Field(default=4, ge=0, le=64)
    # each span carries the user stack that made the call (code.stacktrace)
    stacks: bool = True
    # distinct user stacks of slow calls held in the kernel (1 KiB each, allocated as used;
    # one no span used for 30 s is deleted); full: the span has no stack (counted)
    stack_entries: int = Field(default=4096, ge=256, le=1 << 20)


@dataclass(frozen=True, slots=True)
class SlowCall:
    tgid: int
    tid: int
    comm: str
    cgroup_id: int
    nr: int
    ret: int
    arg0: int
    enter_ns: int  # CLOCK_MONOTONIC: the call's entry, or when it left the CPU
    exit_ns: int
    exe: str = ""  # the series' executable name (workload aggregation)
    entry_exact: bool = True
    user_stack: int = 0  # id in the kernel's user_stacks; 0: none recorded


def series_of(aggregation: str, syscall: str, tgid: int, comm: str, cgroup_id: int,
              exe: str) -> tuple[Workload, dict[str, AttributeValue]]:
    """The series a call is counted in, as the kernel keyed it: its workload and its
    attributes. One place, so that spans name the series their exemplars belong to."""
    workload, attributes = workload_of(aggregation, tgid, comm, cgroup_id, exe)
    return workload, {"linux.syscall.name": syscall, **attributes}


def ring_buffer_supported(release: str | None = None) -> bool:
    numbers = [int(p) for p in (release or platform.release()).split("-")[0].split(".")[:2]]
    return tuple(numbers) >= MIN_RING_KERNEL


def buffer_pages(size_bytes: int) -> int:
    """Both buffer kinds want a power-of-two page count."""
    pages = max(1, size_bytes // PAGE)
    return 1 << (pages - 1).bit_length()


def thresholds(config: SlowSpansConfig, table: SyscallTable) -> dict[int, int]:
    """syscall nr -> threshold in ns, for every syscall that can make a span."""
    unknown = sorted({*config.thresholds, *config.include, *config.exclude}
                     - set(table.names.values()))
    if unknown and table.names:
        log.warning("slow_spans: no syscall named %s in %s; ignored", ", ".join(unknown),
                    table.source)
    excluded = set(config.exclude) - set(config.include)
    out = {}
    for nr, name in table.names.items():
        if name in excluded or nr >= SYSCALL_SLOTS:
            continue
        out[nr] = int(config.thresholds.get(name, config.threshold) * 1e9)
    return out


def cflags(config: SlowSpansConfig, table: SyscallTable, perf: bool) -> list[str]:
    limits = thresholds(config, table)
    flags = ["-DSLOW_EVENTS", f"-DSLOW_MIN_NS={min(limits.values(), default=1 << 62)}ULL",
             f"-DSLOW_RATE={config.rate_per_second}ULL", f"-DSLOW_BURST={config.burst}ULL",
             f"-DRINGBUF_PAGES={buffer_pages(config.buffer_size)}"]
    if perf:
        flags.append("-DUSE_PERF_BUFFER")
    if config.stacks:
        flags += ["-DSLOW_STACKS", f"-DSTACK_ENTRIES={config.stack_entries}",
                  *unwind_shared.COMPILE_FLAGS]
    return flags


def format_stacktrace(frames: Sequence[Frame]) -> str:
    """code.stacktrace as native stack traces read: one frame a line, innermost first,
    `at function+0xoff (module+0xoff)` (the address inside the file as mapped)."""
    lines = []
    for f in frames:
        name = (f"{f.function}+{f.offset_in_function:#x}" if f.function
                else f"{f.address:#x}")
        where = (f" ({f.mapping.path}+{f.address - f.mapping.start + f.mapping.file_offset:#x})"
                 if f.mapping is not None else "")
        lines.append(f"at {name}{where}")
    return "\n".join(lines)


def error_type(ret: int) -> str | None:
    if -4095 <= ret < 0:
        return errno.errorcode.get(-ret, f"errno {-ret}")
    return None


def is_terminal(pid: int, fd: int) -> bool:
    try:
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return False
    return target.startswith(("/dev/pts/", "/dev/tty", "/dev/console"))


class SlowCallStream:
    """Owns the event buffer of a loaded syscall_latency program."""

    def __init__(self, config: SlowSpansConfig, table: SyscallTable, clock: MonotonicClock,
                 perf: bool, aggregation: str, unwinder: SharedUnwinder | None = None
                 ) -> None:
        self.config = config
        self.unwinder = unwinder or SharedUnwinder()
        self._unwind: UnwindLoader | None = None
        self.aggregation = aggregation
        self.table = table
        self.clock = clock
        self.perf = perf
        self.terminal_reads = 0  # events dropped because they waited on a terminal
        self.stacks_lost = 0  # events whose stack was gone from the kernel and the cache
        self._stacks: InternedStacks | None = None
        self._symbolizer: Symbolizer | None = None
        # spans are made on the event thread, stacks aged on the collecting one
        self._stacks_lock = threading.Lock()
        # (pid, stack id) -> its code.stacktrace: a process blocking in the same place again
        # (a poll loop, a worker's wait) costs a lookup, not a maps check and symbolization
        self._stacktraces: OrderedDict[tuple[int, int], str] = OrderedDict()
        self._pending: list[SlowCall] = []
        self._program: Program | None = None

    def attach(self, program: Program) -> None:
        limits = program.map("slow_threshold_ns")
        for nr, ns in thresholds(self.config, self.table).items():
            limits.set(ct.c_int(nr), ct.c_uint64(ns))
        if self.config.stacks:
            # aged by drains of the probe (end_interval), at most every interval
            self._stacks = InternedStacks(program.map("user_stacks"),
                                          self.config.stack_entries, 1)
            # the profilers' unwinder: a process they loaded is walked whole here too, and
            # the process of a slow call is loaded for its next ones
            self._unwind = self.unwinder.join(program)
            self._symbolizer = self._symbolizer or Symbolizer()
            self._warm(self._symbolizer)
        program.open_event_buffer("slow_events", self._on_event, perf=self.perf,
                                  pages=buffer_pages(self.config.buffer_size))
        self._program = program

    def detach(self) -> None:
        """The program stops: leave the shared unwinder."""
        if self._unwind is not None and self._program is not None:
            self.unwinder.leave(self._program)
        self._unwind = None
        self._program = None

    @staticmethod
    def _warm(symbolizer: Symbolizer) -> None:
        """Load the symbol reader and the C library's table now (the agent's own, shared
        by nearly every process), not at the first slow call: ~0.1 s of CPU the first
        span would otherwise cost right as the thread that made the call runs again."""
        import ctypes.util
        try:
            libc = ct.CDLL(ctypes.util.find_library("c"))
            address = ct.cast(libc.read, ct.c_void_p).value
        except (OSError, AttributeError):
            return
        if address:
            symbolizer.user_frames(os.getpid(), [address])

    def end_interval(self, interval_s: float) -> None:
        """Delete the kernel's copies of the stacks no span used for RETAIN_S."""
        if self._stacks is not None:
            with self._stacks_lock:
                self._stacks.retain_drains = max(1, math.ceil(RETAIN_S / interval_s))
                self._stacks.end_drain()

    def _on_event(self, ev: Any) -> None:
        self._pending.append(SlowCall(
            int(ev.tgid), int(ev.tid), ev.comm.decode(errors="replace"), int(ev.cgroup_id),
            int(ev.nr), int(ev.ret), int(ev.arg0), int(ev.enter_ns), int(ev.exit_ns),
            ev.exe.decode(errors="replace"), bool(ev.entry_exact),
            int(getattr(ev, "user_stack", 0))))

    def poll(self) -> list[SpanRecord]:
        if self._program is None:
            return []
        self._program.poll_event_buffers()
        calls, self._pending = self._pending, []
        if self._unwind is not None:
            # a process of a slow call not (wholly) loaded yet is loaded for its next calls
            # (one missing a table again when the compile budget allows: sampled); a loaded
            # one costs a dict lookup here, not a wake-up of the loader at every poll
            tables, incomplete = self._unwind.tables, set()
            for tgid in {call.tgid for call in calls if call.user_stack}:
                if not tables.knows(tgid):
                    self._unwind.add(tgid)
                elif not tables.complete(tgid):
                    incomplete.add(tgid)
            if incomplete:
                self._unwind.sampled(incomplete)
        return [span for call in calls if (span := self.to_span(call)) is not None]

    def to_span(self, call: SlowCall) -> SpanRecord | None:
        name = self.table.name(call.nr)
        fd = call.arg0 if name in FD_FIRST and call.arg0 < 1 << 31 else None
        if (self.config.exclude_terminal_reads and name in TERMINAL_READS and fd is not None
                and is_terminal(call.tgid, fd)):
            self.terminal_reads += 1
            return None
        attrs: dict[str, AttributeValue] = {
            "linux.syscall.name": name,
            "linux.syscall.return": call.ret,
            "thread.id": call.tid,
            "thread.name": call.comm,
        }
        if fd is not None:
            attrs["linux.syscall.fd"] = fd
        if not call.entry_exact:
            # timed from when it left the CPU: its on-CPU start is not in the span
            attrs["linux.syscall.timed_from"] = "off_cpu"
        err = error_type(call.ret)
        if err is not None:
            attrs["error.type"] = err
        if call.user_stack and self._stacks is not None and self._symbolizer is not None:
            stacktrace = self._stacktrace(call.tgid, call.user_stack)
            if stacktrace is not None:
                attrs["code.stacktrace"] = stacktrace
        return SpanRecord(
            name=f"syscall {name}",
            workload=Workload(call.tgid, call.comm, call.cgroup_id),
            start_unix_ns=self.clock.to_unix_ns(call.enter_ns),
            end_unix_ns=self.clock.to_unix_ns(call.exit_ns),
            attributes=attrs,
            error_type=err,
            example_of=("linux.syscall.duration", *series_of(
                self.aggregation, name, call.tgid, call.comm, call.cgroup_id, call.exe)),
        )

    def _stacktrace(self, tgid: int, stack_id: int) -> str | None:
        assert self._stacks is not None and self._symbolizer is not None
        key = (tgid, stack_id)
        with self._stacks_lock:
            self._stacks.use(stack_id)
            known = self._stacktraces.get(key)
            if known is not None:
                self._stacktraces.move_to_end(key)
                return known
            addrs = self._stacks.addresses(stack_id)
        if addrs is None:
            self.stacks_lost += 1
            return None
        # maps read now unless this very program's are kept (an exec since the last span
        # of this pid replaces them)
        self._symbolizer.remember(tgid)
        stacktrace = format_stacktrace(self._symbolizer.user_frames(tgid, addrs))
        with self._stacks_lock:
            self._stacktraces[key] = stacktrace
            while len(self._stacktraces) > STACKTRACE_CACHE:
                self._stacktraces.popitem(last=False)
        return stacktrace
