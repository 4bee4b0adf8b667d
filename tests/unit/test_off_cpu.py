"""The off-CPU probe's flags and the slow-call stack's text, without a kernel."""

from __future__ import annotations

import os

import pytest

from otel_ebpf.export.profiles import ProfileWindow, folded_lines
from otel_ebpf.model import StackSample, Workload
from otel_ebpf.probes.off_cpu import OFF_CPU, OffCpu, OffCpuConfig
from otel_ebpf.probes.slow_syscalls import format_stacktrace
from otel_ebpf.symbolize.frames import Frame, Mapping


def flags(config: OffCpuConfig) -> dict[str, str]:
    return dict(f[2:].partition("=")[::2] for f in OffCpu(config).program_flags())


def test_rate_and_burst_are_shared_between_the_cpus() -> None:
    cpus = os.cpu_count() or 1
    f = flags(OffCpuConfig(enabled=True, rate_per_second=1000, burst=200, min_block=0.002))
    assert f["RATE_INTERVAL_NS"] == f"{int(1e9 * cpus / 1000)}ULL"
    assert f["RATE_BURST"] == f"{-(-200 // cpus)}ULL"
    assert f["MIN_BLOCK_NS"] == "2000000ULL"
    assert "KEEP_KERNEL_THREADS" not in f and int(f["TASK_MM_OFF"]) > 0


def test_kernel_threads_kept_on_request() -> None:
    f = flags(OffCpuConfig(enabled=True, keep_kernel_threads=True))
    assert "KEEP_KERNEL_THREADS" in f and int(f["TASK_MM_OFF"]) > 0  # exec announcements


def test_opt_in_and_named_as_the_opentelemetry_ebpf_profiler_names_it() -> None:
    assert OffCpuConfig().enabled is False
    assert (OFF_CPU.sample_type, OFF_CPU.sample_unit) == ("off_cpu", "nanoseconds")


@pytest.mark.parametrize("frames,text", [
    ((Frame(0x401234, "read_config", "native",
            Mapping(0x401000, 0x402000, 0x1000, "/usr/bin/app", None), 0x1a),
      Frame(0x7f0000001000, None, "native", None, 0)),
     "at read_config+0x1a (/usr/bin/app+0x1234)\nat 0x7f0000001000"),
    ((), ""),
])
def test_code_stacktrace_is_one_frame_a_line_innermost_first(frames: tuple[Frame, ...],
                                                              text: str) -> None:
    assert format_stacktrace(frames) == text


def test_folded_off_cpu_stacks_sit_under_a_root_of_their_own() -> None:
    main = Frame(0x401000, "main", "native", None, 0)
    sample = StackSample(Workload(7, "app", 1), 7, "app", (main,), 2_000_000_000)
    on, off = ProfileWindow(0, True), ProfileWindow(0, True)
    on.fold([StackSample(Workload(7, "app", 1), 7, "app", (main,), 3)], lambda w: w.comm)
    off.fold([sample], lambda w: w.comm, OFF_CPU.sample_type)
    assert folded_lines(on.folded) == ["app;main 3"]
    assert folded_lines(off.folded) == ["off_cpu;app;main 2000000000"]


def test_a_span_with_a_stack_is_counted_at_its_size_in_the_queue() -> None:
    from otel_ebpf.export.traces import span_bytes
    from otel_ebpf.model import SpanRecord

    plain = SpanRecord("syscall read", Workload(7, "app", 1), 0, 1, {"thread.id": 7})
    trace = "\n".join(f"at f{i}+0x10 (/usr/lib/libfoo.so+0x{i:x})" for i in range(40))
    with_stack = SpanRecord("syscall read", Workload(7, "app", 1), 0, 1,
                            {"thread.id": 7, "code.stacktrace": trace})
    assert span_bytes(with_stack) >= span_bytes(plain) + len(trace)
