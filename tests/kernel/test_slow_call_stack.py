"""The stack of a slow call: a slow `read` span carries the user stack that made it, as
code.stacktrace, symbolized, unwound whole with the DWARF tables the profilers share. The
helper (tests/helpers/off_cpu_target.c) reads stdin from main -> read_config -> read_once
-> libc read, then from main -> libc read until the end of stdin; the test writes each
byte 300 ms after the helper blocked, so each call is slower than the 10 ms threshold.
libc keeps no frame pointer: a frame-pointer walk loses the direct caller of read
(read_once, then main)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from otel_ebpf.kernel import syscalls
from otel_ebpf.kernel.engine import Engine
from otel_ebpf.model import SpanRecord
from otel_ebpf.probes.cpu_profile import CpuProfile, CpuProfileConfig
from otel_ebpf.probes.slow_syscalls import SlowSpansConfig
from otel_ebpf.probes.syscall_latency import SyscallFilter, SyscallLatency, SyscallLatencyConfig
from otel_ebpf.symbolize.unwind.shared import SharedUnwinder
from tests.conftest import build_helper
from tests.helpers.processes import sleeping

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def off_cpu_target() -> Path:
    return build_helper("off_cpu_target")


@pytest.fixture
def unwinder() -> SharedUnwinder:
    return SharedUnwinder()


@pytest.fixture
def probe(engine: Engine, table: syscalls.SyscallTable, unwinder: SharedUnwinder
          ) -> Iterator[SyscallLatency]:
    config = SyscallLatencyConfig(aggregation="process",
                                  filter=SyscallFilter(comms=["off_cpu_target"]),
                                  slow_spans=SlowSpansConfig())
    probe = SyscallLatency(config, table, unwinder=unwinder)
    probe.start(engine)
    try:
        yield probe
    finally:
        probe.stop()


class Target:
    """The helper in `read` mode, blocked in its reads until the test writes a byte."""

    def __init__(self, binary: Path, *args: str) -> None:
        self.proc = subprocess.Popen([str(binary), "read", *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
        self.pid = self.proc.pid

    def slow_read(self, probe: SyscallLatency) -> SpanRecord:
        """Let it block 300 ms in a read, then feed it a byte: that read's span."""
        assert self.proc.stdin is not None
        deadline = time.monotonic() + 10
        while not sleeping(self.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # blocked in read: now it is a slow one
        self.proc.stdin.write(b"x")
        self.proc.stdin.flush()
        spans: list[SpanRecord] = []
        deadline = time.monotonic() + 10
        while not spans and time.monotonic() < deadline:
            spans += [s for s in probe.poll_spans()
                      if s.name == "syscall read" and s.workload.pid == self.pid]
            time.sleep(0.05)
        assert len(spans) == 1, spans
        return spans[0]

    def finish(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        out = self.proc.stdout.read() if self.proc.stdout else b""
        self.proc.wait(timeout=10)
        assert out.strip() == b"done" and self.proc.returncode == 0


def functions(span: SpanRecord) -> list[str]:
    """code.stacktrace's functions, innermost first."""
    trace = span.attributes["code.stacktrace"]
    assert isinstance(trace, str)
    lines = trace.splitlines()
    assert all(line.startswith("at ") for line in lines), lines
    return [line.split()[1].split("+")[0] for line in lines]


def loaded(unwinder: SharedUnwinder, pid: int) -> None:
    """Wait until the shared unwinder has the process's tables in the kernel."""
    loader = unwinder.loader
    assert loader is not None
    deadline = time.monotonic() + 15
    while not loader.tables.complete(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert loader.tables.complete(pid), "the unwinder never loaded the process"


def test_slow_read_span_carries_the_stack_that_made_the_call(
        engine: Engine, probe: SyscallLatency, unwinder: SharedUnwinder,
        off_cpu_target: Path) -> None:
    # as in the agent: the profiler samples the helper's 300 ms of CPU, which loads its
    # tables into the unwinder the slow-call stacks share
    profiler = CpuProfile(CpuProfileConfig(frequency=99), unwinder=unwinder)
    profiler.start(engine)
    try:
        target = Target(off_cpu_target, "300")
        try:
            deadline = time.monotonic() + 10
            while not sleeping(target.pid) and time.monotonic() < deadline:
                profiler.poll_spans()  # its new-process announcements
                time.sleep(0.01)
            loaded(unwinder, target.pid)
            span = target.slow_read(probe)
        finally:
            target.finish()
    finally:
        profiler.stop()
    assert span.end_unix_ns - span.start_unix_ns >= 10_000_000  # slow: a span at all
    names = functions(span)
    # innermost first: libc's read on top, then every caller down to main
    assert "read" in names[0], names
    assert names[1:4] == ["read_once", "read_config", "main"], names
    (config_line,) = [line for line in str(span.attributes["code.stacktrace"]).splitlines()
                      if line.split()[1].startswith("read_config+")]
    assert "/off_cpu_target+0x" in config_line, config_line
    lost = probe.take_stats()
    assert not lost["slow_stack_lost"] and not lost["unwind_not_ready"], lost


def test_a_slow_call_loads_its_process_for_the_next_one(
        probe: SyscallLatency, unwinder: SharedUnwinder, off_cpu_target: Path) -> None:
    # no profiler: the first slow call finds the process unknown (frame pointers only:
    # read_once is lost) and has it loaded; the next one, made from main, is whole
    target = Target(off_cpu_target)
    try:
        first = target.slow_read(probe)
        loaded(unwinder, target.pid)
        second = target.slow_read(probe)
    finally:
        target.finish()
    names = functions(first)
    assert "read_once" not in names and "main" in names, names
    names = functions(second)
    assert "read" in names[0] and names[1] == "main", names
    assert probe.take_stats()["unwind_not_ready"] == 1


def test_no_stack_when_turned_off(engine: Engine, table: syscalls.SyscallTable,
                                  off_cpu_target: Path) -> None:
    config = SyscallLatencyConfig(aggregation="process",
                                  filter=SyscallFilter(comms=["off_cpu_target"]),
                                  slow_spans=SlowSpansConfig(stacks=False))
    probe = SyscallLatency(config, table)
    probe.start(engine)
    try:
        target = Target(off_cpu_target)
        try:
            span = target.slow_read(probe)
        finally:
            target.finish()
        assert "code.stacktrace" not in span.attributes
    finally:
        probe.stop()
