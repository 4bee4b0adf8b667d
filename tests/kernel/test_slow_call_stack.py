"""The stack of a slow call: a slow `read` span carries the user stack that made it, as
code.stacktrace, symbolized. The helper (tests/helpers/off_cpu_target.c) reads stdin from
main -> read_config -> read_once -> libc read; the test writes the byte 300 ms after the
helper blocked, so the call is slower than the 10 ms threshold."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from otel_ebpf.kernel import syscalls
from otel_ebpf.kernel.engine import Engine
from otel_ebpf.model import SpanRecord
from otel_ebpf.probes.slow_syscalls import SlowSpansConfig
from otel_ebpf.probes.syscall_latency import SyscallFilter, SyscallLatency, SyscallLatencyConfig
from tests.conftest import build_helper
from tests.helpers.processes import sleeping

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def off_cpu_target() -> Path:
    return build_helper("off_cpu_target")


@pytest.fixture
def probe(engine: Engine, table: syscalls.SyscallTable) -> Iterator[SyscallLatency]:
    config = SyscallLatencyConfig(aggregation="process",
                                  filter=SyscallFilter(comms=["off_cpu_target"]),
                                  slow_spans=SlowSpansConfig())
    probe = SyscallLatency(config, table)
    probe.start(engine)
    try:
        yield probe
    finally:
        probe.stop()


def slow_read(probe: SyscallLatency, binary: Path) -> tuple[int, SpanRecord]:
    proc = subprocess.Popen([str(binary), "read"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    assert proc.stdin is not None
    try:
        deadline = time.monotonic() + 10
        while not sleeping(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # blocked in read: now it is a slow one
        proc.stdin.write(b"x")
        proc.stdin.flush()
        spans: list[SpanRecord] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the helper lives on until stdin closes
            spans += [s for s in probe.poll_spans()
                      if s.name == "syscall read" and s.workload.pid == proc.pid]
            if spans:
                break
            time.sleep(0.05)
    finally:
        proc.stdin.close()
        out = proc.stdout.read() if proc.stdout else b""
        proc.wait(timeout=10)
    assert out.strip() == b"done" and proc.returncode == 0
    assert len(spans) == 1, spans
    return proc.pid, spans[0]


def test_slow_read_span_carries_the_stack_that_made_the_call(probe: SyscallLatency,
                                                             off_cpu_target: Path) -> None:
    _, span = slow_read(probe, off_cpu_target)
    assert span.end_unix_ns - span.start_unix_ns >= 10_000_000  # slow: a span at all
    trace = span.attributes["code.stacktrace"]
    assert isinstance(trace, str)
    lines = trace.splitlines()
    assert all(line.startswith("at ") for line in lines), lines
    functions = [line.split()[1].split("+")[0] for line in lines]
    # innermost first: libc's read on top, then the caller's callers down to main (libc
    # keeps no frame pointer, so read_once, its direct caller, is not in a frame-pointer
    # walk; see tests/helpers/off_cpu_target.c)
    assert "read_config" in functions and "main" in functions, lines
    assert functions.index("read_config") < functions.index("main"), lines
    assert "read" in functions[0], lines
    (config_line,) = [line for line in lines if line.split()[1].startswith("read_config+")]
    assert "/off_cpu_target+0x" in config_line, config_line
    assert not probe.take_stats()["slow_stack_lost"]


def test_no_stack_when_turned_off(engine: Engine, table: syscalls.SyscallTable,
                                  off_cpu_target: Path) -> None:
    config = SyscallLatencyConfig(aggregation="process",
                                  filter=SyscallFilter(comms=["off_cpu_target"]),
                                  slow_spans=SlowSpansConfig(stacks=False))
    probe = SyscallLatency(config, table)
    probe.start(engine)
    try:
        _, span = slow_read(probe, off_cpu_target)
        assert "code.stacktrace" not in span.attributes
    finally:
        probe.stop()
