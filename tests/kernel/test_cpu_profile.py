"""The CPU profiler against workloads whose CPU split is known."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.profiles.v1development import profiles_pb2 as pb

from otel_ebpf.enrich.process import ProcessEnricher
from otel_ebpf.export.profiles import build_profiles_request
from otel_ebpf.kernel.engine import BpfMap, Engine
from otel_ebpf.model import Identity
from otel_ebpf.probes.cpu_profile import CpuProfile, CpuProfileConfig
from otel_ebpf.probes.stacks import InternedStacks
from tests.helpers.processes import reap
from tests.helpers.profiling import Running, names, running, samples_of

pytestmark = pytest.mark.kernel

HZ = 997  # many samples in a few seconds: 75 % +- 5 points is then > 4 sigma


@pytest.fixture
def profiler(engine: Engine) -> Iterator[Running[CpuProfile]]:
    with running(engine, CpuProfile(CpuProfileConfig(frequency=HZ))) as polled:
        yield polled


def test_three_to_one_split_with_full_user_stacks(profiler: Running, cpu_hot: Path) -> None:
    proc = subprocess.Popen([str(cpu_hot), "split", "3"], stdout=subprocess.DEVNULL)
    cpu_s = reap(proc)  # its CPU time, not the 3 s it ran: a busy machine gives it less
    assert proc.returncode == 0
    # collected after the process exited: symbolized from what was captured while it ran
    mine = samples_of(proc.pid, profiler.probe.collect().samples)
    total = sum(s.count for s in mine)
    assert total > 0.7 * cpu_s * HZ, (total, cpu_s)  # the kernel may throttle the rate
    in_a = sum(s.count for s in mine if "hot_a" in names(s))
    in_b = sum(s.count for s in mine if "hot_b" in names(s))
    assert abs(in_a / total - 0.75) <= 0.05, (in_a, in_b, total)
    assert abs(in_b / total - 0.25) <= 0.05, (in_a, in_b, total)
    for s in mine:
        if "hot_a" in names(s) or "hot_b" in names(s):
            user = [f for f in s.frames if f.kind == "native"]
            assert "main" in [f.function for f in user], names(s)
            (hot,) = [f for f in user if f.function in ("hot_a", "hot_b")]
            assert hot.mapping is not None and hot.mapping.path.endswith("cpu_hot")
            assert hot.mapping.build_id


def test_syscall_heavy_workload_has_kernel_frames_under_the_syscall(
    profiler: Running, cpu_hot: Path
) -> None:
    proc = subprocess.run([str(cpu_hot), "syscalls", "1.5"], capture_output=True, text=True,
                          check=True, timeout=30)
    assert proc.stdout.strip() == "done"
    mine = [s for s in profiler.probe.collect().samples if s.thread_name == "cpu_hot"]
    with_kernel = [s for s in mine if any(f.kind == "kernel" for f in s.frames)]
    assert sum(s.count for s in with_kernel) > 0.5 * sum(s.count for s in mine)
    s = max(with_kernel, key=lambda s: s.count)
    kinds = [f.kind for f in s.frames]
    # leaf first: kernel frames on top of the user frames that made the call
    assert kinds == sorted(kinds, key=lambda k: k != "kernel"), kinds
    kernel_names = [f.function or "" for f in s.frames if f.kind == "kernel"]
    assert any("syscall" in n.lower() for n in kernel_names), kernel_names
    # libc's write() keeps no frame pointer: its caller (write_loop) is found through
    # libc's CFI once the process is loaded (tests/kernel/test_unwind.py checks that)
    assert "write" in names(s) and "main" in names(s)


def test_exported_profile_decodes_with_the_official_proto(profiler: Running,
                                                          cpu_hot: Path) -> None:
    proc = subprocess.run([str(cpu_hot), "split", "1"], capture_output=True, check=True,
                          timeout=30)
    assert proc.returncode == 0
    samples = [s for s in profiler.probe.collect().samples if s.thread_name == "cpu_hot"]
    enricher = ProcessEnricher()
    request = build_profiles_request(
        samples, lambda w: Identity(enricher.lookup(w).attributes(), {"process.pid": w.pid}),
        profiler.probe.period_ns, 1, 2, profile_type=profiler.probe.profile_type)
    decoded = type(request).FromString(request.SerializeToString())
    d = decoded.dictionary
    assert d.string_table[0] == "" and d.function_table[0] == pb.Function()
    (rp,) = decoded.resource_profiles
    (profile,) = rp.scope_profiles[0].profiles
    assert profile.period == 1_000_000_000 // HZ
    assert d.string_table[profile.sample_type.type_strindex] == "samples"
    assert d.string_table[profile.period_type.unit_strindex] == "nanoseconds"
    functions = {d.string_table[d.function_table[
        d.location_table[i].lines[0].function_index].name_strindex]
        for sample in profile.samples
        for i in d.stack_table[sample.stack_index].location_indices
        if d.location_table[i].lines}
    assert {"hot_a", "hot_b", "main"} <= functions
    assert sum(v for s in profile.samples for v in s.values) == sum(s.count for s in samples)


@contextlib.contextmanager
def stack_map(capacity: int, stacks: int) -> Iterator[tuple[Any, BpfMap]]:
    """A real hash map of the probe's stack layout holding stacks 1..`stacks` (stack i:
    0x1000 + i, then 0x2000), as BCC's table and as the engine's BpfMap."""
    from bcc import BPF

    bpf = BPF(text=b"struct stack { u64 ips[127]; };\n"
                   b"BPF_F_TABLE(\"hash\", u64, struct stack, stacks, %d, BPF_F_NO_PREALLOC);"
                   % capacity)
    try:
        table = bpf[b"stacks"]
        for stack_id in range(1, stacks + 1):
            value = table.Leaf()
            value.ips[0], value.ips[1] = 0x1000 + stack_id, 0x2000
            table[table.Key(stack_id)] = value
        yield table, BpfMap(table.map_fd, table.Key, table.Leaf)
    finally:
        bpf.cleanup()


def test_interned_stacks_leave_the_kernel_map_when_unused() -> None:
    # InternedStacks against a real hash map of the probe's layout: stacks a drain did
    # not use are deleted from the kernel (batch delete) after `retain_drains`, and their
    # addresses stay cached for a sample that still names them
    with stack_map(capacity=64, stacks=10) as (table, bpf_map):
        stacks = InternedStacks(bpf_map, capacity=64, retain_drains=1)
        for stack_id in range(1, 11):
            stacks.use(stack_id)
            assert tuple(stacks.addresses(stack_id) or ()) == (0x1000 + stack_id, 0x2000)
        assert stacks.end_drain() == 0
        for stack_id in (1, 2):  # only these recur
            stacks.use(stack_id)
        assert stacks.end_drain() == 0  # the others are one drain old: still kept
        stacks.use(1)
        assert stacks.end_drain() == 8  # 3..10 unused for two drains
        assert {int(k.value) for k in table} == {1, 2}
        assert tuple(stacks.addresses(7) or ()) == (0x1007, 0x2000)  # cached
        assert stacks.end_drain() == 1
        assert {int(k.value) for k in table} == {1}


def test_interned_stacks_keep_only_the_last_drain_when_filling_up() -> None:
    with stack_map(capacity=8, stacks=7) as (table, bpf_map):
        stacks = InternedStacks(bpf_map, capacity=8, retain_drains=100)
        for stack_id in range(1, 8):
            stacks.use(stack_id)
        stacks.end_drain()
        stacks.use(3)
        # 7 of 8 held: above FILL_LIMIT, so everything the last drain did not use goes
        assert stacks.end_drain() == 6
        assert {int(k.value) for k in table} == {3}
