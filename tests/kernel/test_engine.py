"""The engine keeps the compiler out of the agent: BCC runs in a short-lived child, the
agent holds only file descriptors; a compiled program can come from the cache; compiler and
verifier failures stay actionable."""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from otel_ebpf.kernel import headers, syscalls
from otel_ebpf.kernel.cache import ImageCache
from otel_ebpf.kernel.engine import Engine, EngineError
from otel_ebpf.model import ExpHistogramDelta
from otel_ebpf.probes.syscall_latency import SyscallFilter, SyscallLatency, SyscallLatencyConfig
from otel_ebpf.symbolize.unwind import worker

pytestmark = pytest.mark.kernel

COMPILER_LIBS = ("libLLVM", "libclang", "libbcc")
READY = " running: probes "
N_GETPPID = 4321


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(p) for p in (task / "children").read_text().split()]
    return kids


def _compiler_rss_kb(pid: int) -> int:
    rss, path = 0, ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and not head[0].endswith(":"):
            path = head[5] if len(head) > 5 else ""
        elif head[0] == "Rss:" and any(lib in path for lib in COMPILER_LIBS):
            rss += int(head[1])
    return rss


def test_the_running_agent_maps_no_compiler(tmp_path: Path) -> None:
    # every default probe, compiled for real (no cache): the agent must hold none of
    # LLVM, clang or BCC once attached, and no compiler process may be left (the unwind
    # tables' one only while it compiles)
    config = tmp_path / "agent.yaml"
    config.write_text("exporter:\n  enabled: false\nsummary:\n  enabled: false\n")
    env = dict(os.environ, OTEL_EBPF_COMPILE_CACHE="off")
    proc = subprocess.Popen([sys.executable, "-m", "otel_ebpf", "run", "--config", str(config),
                             "--duration", "120s"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env)
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stderr is not None
    stderr = proc.stderr
    threading.Thread(target=lambda: [lines.put(line) for line in stderr], daemon=True).start()
    log: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while not any(READY in line for line in log):
            assert proc.poll() is None, "the agent exited:\n" + "".join(log)
            assert time.monotonic() < deadline, "not attached in 120 s:\n" + "".join(log)
            with contextlib.suppress(queue.Empty):
                log.append(lines.get(timeout=0.5))
        mapped = [line for line in Path(f"/proc/{proc.pid}/maps").read_text().splitlines()
                  if any(lib in line for lib in COMPILER_LIBS)]
        assert mapped == [], mapped
        assert _compiler_rss_kb(proc.pid) == 0
        # its threads carry their names in the kernel (top -H tells them apart)
        comms = {(task / "comm").read_text().strip()
                 for task in Path(f"/proc/{proc.pid}/task").iterdir()}
        assert {"collect-cpu_pro", "collect-syscall", "events", "unwind-loader"} <= comms, comms
        # no BCC compiler left; the unwind tables' compiler process, which maps none of
        # LLVM either, exits once idle
        for kid in _children(proc.pid):
            with contextlib.suppress(OSError):
                assert "kernel.loader" not in Path(f"/proc/{kid}/cmdline").read_text()
                assert _compiler_rss_kb(kid) == 0
        deadline = time.monotonic() + worker.IDLE_S + 30
        while _children(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _children(proc.pid) == []
        assert "probe cpu_profile attached" in "".join(log)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0, "".join(log)


def test_a_cached_program_counts_like_a_compiled_one(
        tmp_path: Path, table: syscalls.SyscallTable, syscall_workload: Path) -> None:
    source = headers.discover()
    assert source is not None
    images = ImageCache(tmp_path / "cache", source.bcc_kernel_source or source.path)
    engine = Engine(source, cache=images)
    config = SyscallLatencyConfig(filter=SyscallFilter(comms=["syscall_workloa"]))
    probe = SyscallLatency(config, table)
    probe.start(engine)  # compiles, and stores
    probe.stop()
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1

    def no_compiler(*_: object) -> None:
        raise AssertionError("compiled although the cache holds the program")

    engine.compiler._run = no_compiler  # type: ignore[assignment,method-assign]
    probe = SyscallLatency(config, table)
    probe.start(engine)  # maps recreated from the entry (task storage needs its BTF)
    try:
        proc = subprocess.run([str(syscall_workload), str(N_GETPPID), "1", "1"],
                              capture_output=True, text=True, timeout=60, check=True)
        assert proc.stdout.strip() == "done"
        records = [r for r in probe.collect().records if isinstance(r, ExpHistogramDelta)]
    finally:
        probe.stop()
    getppid = [r for r in records if r.attributes["linux.syscall.name"] == "getppid"]
    assert sum(r.count for r in getppid) == N_GETPPID


def test_a_compile_error_keeps_its_message_and_output(tmp_path: Path,
                                                      capfd: pytest.CaptureFixture[str]
                                                      ) -> None:
    bad = tmp_path / "broken.bpf.c"
    bad.write_text("int on_sys_enter(struct bpf_raw_tracepoint_args *ctx) { return x; }\n")
    engine = Engine(headers.discover())
    with pytest.raises(EngineError) as caught:
        engine.load("broken", source=bad)
    message = str(caught.value)
    assert message.startswith("broken: BPF program failed to compile or load: ")
    assert "The compiler or verifier output is above" in message
    assert "use of undeclared identifier 'x'" in capfd.readouterr().err


def test_a_verifier_refusal_names_the_function_and_prints_the_log(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    refused = tmp_path / "refused.bpf.c"
    # a raw tracepoint's context is its arguments: reading far past them is refused
    refused.write_text("int on_sys_enter(struct bpf_raw_tracepoint_args *ctx) {\n"
                       "    return ((u64 *)ctx)[4096];\n}\n")
    program = Engine(headers.discover()).load("refused", source=refused)
    try:
        with pytest.raises(EngineError, match="refused: the verifier refused on_sys_enter"):
            program.attach_raw_tracepoint("sys_enter", "on_sys_enter")
    finally:
        program.close()
    assert "dereference of modified ctx ptr" in capfd.readouterr().err
