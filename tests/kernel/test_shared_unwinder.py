"""One set of unwind maps for every program that unwinds user stacks
(otel_ebpf/symbolize/unwind/shared.py): the CPU and off-CPU profilers and the slow-call
stacks walk with the same maps, filled by one loader; the maps live until the last of
them stops, and a map of another shape is refused, not adopted."""

from __future__ import annotations

import ctypes as ct
import os

import pytest

from otel_ebpf.kernel import bpfsys
from otel_ebpf.kernel.engine import Engine, EngineError
from otel_ebpf.kernel.syscalls import SyscallTable
from otel_ebpf.probes.cpu_profile import CpuProfile, CpuProfileConfig
from otel_ebpf.probes.off_cpu import OffCpu, OffCpuConfig
from otel_ebpf.probes.slow_syscalls import SlowSpansConfig
from otel_ebpf.probes.syscall_latency import SyscallFilter, SyscallLatency, SyscallLatencyConfig
from otel_ebpf.symbolize.unwind.shared import SharedUnwinder, create_maps

pytestmark = pytest.mark.kernel

MAPS = ("unwind_rows", "unwind_tables", "unwind_procs")


def map_ids(probe: CpuProfile | OffCpu | SyscallLatency) -> list[int]:
    program = probe._program
    assert program is not None
    return [bpfsys.map_info(program.map(name).fd)["id"] for name in MAPS]


def test_the_stack_probes_walk_with_one_set_of_maps(engine: Engine,
                                                    table: SyscallTable) -> None:
    unwinder = SharedUnwinder(rows=1 << 12, processes=128)
    probes = [
        CpuProfile(CpuProfileConfig(), unwinder=unwinder),
        OffCpu(OffCpuConfig(enabled=True), unwinder=unwinder),
        SyscallLatency(SyscallLatencyConfig(filter=SyscallFilter(comms=["nothing-here"]),
                                            slow_spans=SlowSpansConfig()),
                       table, unwinder=unwinder),
    ]
    started = []
    try:
        for probe in probes:
            probe.start(engine)
            started.append(probe)
        ids = [map_ids(p) for p in probes]
        assert ids[0] == ids[1] == ids[2], ids
        # sized by the unwinder, not by the one-entry placeholders the programs declare
        program = probes[0]._program
        assert program is not None
        assert program.map("unwind_rows").max_entries == 1 << 12
        assert program.map("unwind_procs").max_entries == 128
        loader = unwinder.loader
        assert loader is not None
        # one probe reports the maps' fill: the first to join, then the next one
        assert set(unwinder.fill(program)) == {"unwind_rows", "unwind_processes"}
        assert not unwinder.fill(probes[1]._program)  # type: ignore[arg-type]
        probes[0].stop()
        assert unwinder.loader is loader  # the others still walk with it
        assert set(unwinder.fill(probes[1]._program))  # type: ignore[arg-type]
        loader.add(os.getpid())  # still served
        probes[1].stop()
        probes[2].stop()
        assert unwinder.loader is None  # the last one closed it
    finally:
        for probe in started:
            probe.stop()


def test_a_map_of_another_shape_is_refused(engine: Engine) -> None:
    probe = CpuProfile(CpuProfileConfig())
    program = engine.load(probe.name, probe.cflags())
    rows, tables, procs = create_maps(1 << 10, 64)
    try:
        with pytest.raises(EngineError, match="cannot share unwind_rows: its type, value_size"):
            program.adopt_map("unwind_rows", procs.fd)
        program.adopt_map("unwind_rows", rows.fd)  # the same shape, another size: taken
        assert program.map("unwind_rows").max_entries == 1 << 10
        assert bpfsys.map_info(program.map("unwind_rows").fd)["id"] == \
            bpfsys.map_info(rows.fd)["id"]
        program.load_function("on_cpu_sample", "perf_event")
        with pytest.raises(EngineError, match="after a function was loaded"):
            program.adopt_map("unwind_tables", tables.fd)
        assert program.map("unwind_rows").get(ct.c_uint32(0)) is not None
    finally:
        program.close()
        for m in (rows, tables, procs):
            os.close(m.fd)
