"""`make bench` unwind suite (issue #13): what unwinding user stacks without frame pointers
costs, on bench/cpu_loop.c built with -O2 -fomit-frame-pointer (its 1..32-deep call chain
then has no frame-pointer chain at all: every frame is found through .eh_frame rows).

The machinery is bench/profile.py's (see its docstring): the real agent with only
cpu_profile enabled, exporting to an in-process OTLP sink.

Slowdown at 99 Hz (target <= 1.01)
    The loop without frame pointers on one pinned CPU, the agent's sampling toggled off
    and on in alternating windows; plus the calibration at 2999 Hz, whose slowdown gives
    the loop's time per sample (interrupt + BPF program + cache) and a linear prediction
    for 99 Hz.

Per-sample unwinding cost, agent CPU (target <= 1 % of one core), kernel memory
    One loop per CPU, a fresh agent at 99 Hz: the BPF program's run time per sample from
    the kernel's BPF run-time statistics (run_time_ns / run_cnt; the whole program: both
    stacks, interning, counting), the agent's utime+stime over the window (after the
    start-up, whose table compiles are reported apart by the agent's own figures), the
    unwinder's maps as the kernel accounts them (bpftool: memlock of unwind_rows,
    unwind_tables, unwind_procs), the lost-event reasons of the unwinder, and the median
    number of frames of the samples received: unwound, the loop's samples are 3..36 deep.

64-CPU projection
    The in-kernel cost is per sample: each CPU spends (time per sample x 99) of its time
    whatever the CPU count. The agent's cost grows with samples (decoding, symbolizing new
    stacks), so its CPU per received sample is scaled to 99 Hz x 64 CPUs (linear, an upper
    bound: hot stacks recur and are decoded from the cache).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    BUILD_DIR,
    AgentProcess,
    bpftool_json,
    cpu_list,
    otlp_sink,
    verdict,
)
from bench.profile import (
    CALIBRATION_HZ,
    SLOWDOWN_TARGET,
    CpuLoop,
    CpuPhase,
    cpu_phase,
    loop_setup,
    slowdown_of,
    slowdown_phase,
)

NOFP_BIN = BUILD_DIR / "cpu_loop_nofp"
AGENT_CPU_TARGET = 1.0  # % of one core at 99 Hz (issue #13)
UNWIND_MAPS = ("unwind_rows", "unwind_tables", "unwind_procs")
NODE_CPUS = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # shares --profile-pairs, --profile-window, --profile-cpu-seconds with the profile suite
    del parser


def unwind_map_bytes(prog_ids: set[int]) -> dict[str, int]:
    """bytes_memlock of the unwinder's maps of these programs, as the kernel counts them."""
    map_ids = {int(i) for p in bpftool_json("prog", "show") if int(p.get("id", -1)) in prog_ids
               for i in p.get("map_ids", [])}
    return {str(m["name"]): int(m.get("bytes_memlock", 0)) for m in bpftool_json("map", "show")
            if int(m.get("id", -1)) in map_ids and str(m.get("name")) in UNWIND_MAPS}


def sample_depths(sink: Any) -> list[int]:
    """Frames per sample (each sample counted once per its value) in the profiles received."""
    depths: list[int] = []
    for request in sink.profiles_requests:
        stacks = request.dictionary.stack_table
        for rp in request.resource_profiles:
            for sp in rp.scope_profiles:
                for profile in sp.profiles:
                    for sample in profile.samples:
                        if sample.stack_index < len(stacks):
                            n = len(stacks[sample.stack_index].location_indices)
                            depths += [n] * (int(sample.values[0]) if sample.values else 0)
    return depths


def report(slowdown: dict[int, Any], cpu: CpuPhase, cpus: int, maps: dict[str, int],
           depths: list[int]) -> None:
    results = {hz: slowdown_of(windows) for hz, windows in slowdown.items()}
    print()
    for hz, r in results.items():
        print(f"slowdown at {hz} Hz: {r.median:.4f} (min..max {min(r.ratios):.4f}.."
              f"{max(r.ratios):.4f}; null {statistics.median(r.null) if r.null else 0:.4f})")
    calibration = results.get(CALIBRATION_HZ)
    if calibration is not None:
        loop_us = (calibration.median - 1) / CALIBRATION_HZ * 1e6
        print(f"calibration: {calibration.median:.4f} at {CALIBRATION_HZ} Hz = {loop_us:.1f} "
              f"us of the loop's time per sample; predicts {1 + loop_us * 99 / 1e6:.4f} at "
              "99 Hz")
    cpu_pct = cpu.agent_cpu_s / cpu.seconds * 100
    per_sample_ns = cpu.bpf_ns / cpu.bpf_runs if cpu.bpf_runs else None
    print(f"\nagent CPU at 99 Hz, {cpus} CPUs busy: {cpu.agent_cpu_s:.3f} s in "
          f"{cpu.seconds:.1f} s = {cpu_pct:.3f} % of one core")
    if per_sample_ns is not None:
        print(f"in-kernel: {per_sample_ns / 1000:.2f} us per sample (BPF program, "
              f"{cpu.bpf_runs} runs) = {per_sample_ns * 99 / 1e7:.3f} % of each CPU at 99 Hz")
    unwind_lost = {k: v for k, v in cpu.lost.items() if k.startswith("unwind_")}
    print(f"samples received {cpu.samples}; unwinder's lost events {unwind_lost or 'none'}; "
          f"lost stacks {cpu.lost.get('user_stack_lost', 0):.0f}")
    if depths:
        print(f"frames per sample: median {statistics.median(depths):.0f}, "
              f"p10 {sorted(depths)[len(depths) // 10]}, max {max(depths)}")
    total = sum(maps.values())
    print("kernel memory of the unwind maps: " + ", ".join(
        f"{name} {size / 2**20:.2f} MiB" for name, size in sorted(maps.items()))
          + f" = {total / 2**20:.2f} MiB")
    print(f"\n{NODE_CPUS}-CPU node at 99 Hz, projected from the figures above:")
    if per_sample_ns is not None:
        node = per_sample_ns * 99 * NODE_CPUS / 1e9
        print(f"  in kernel: {per_sample_ns * 99 / 1e7:.3f} % of each CPU = {node:.3f} "
              f"CPU-seconds a second over the node")
    if cpu.samples:
        per_received = cpu.agent_cpu_s / cpu.samples
        print(f"  agent: {per_received * 1e6:.1f} us per received sample x 99 x "
              f"{NODE_CPUS} = {per_received * 99 * NODE_CPUS * 100:.1f} % of one core "
              "(linear upper bound)")
    print()
    slow99 = results[99].median
    print(f"target: {'slowdown at 99 Hz <= 1.01':<40} "
          f"{verdict(slow99 <= SLOWDOWN_TARGET, f'{slow99:.4f}')}")
    print(f"target: {'agent CPU at 99 Hz <= 1 % of a core':<40} "
          f"{verdict(cpu_pct <= AGENT_CPU_TARGET, f'{cpu_pct:.3f} %')}")


def run_suite(args: argparse.Namespace, machine_shown: bool) -> int:
    loop_cpu, rest = loop_setup("unwind: user stacks without frame pointers (issue #13)",
                                machine_shown, NOFP_BIN, "-fomit-frame-pointer")
    print(f"loop:    taskset -c {loop_cpu} {NOFP_BIN} COUNTER MAX_S  (gcc -O2 "
          f"-fomit-frame-pointer; bench and sink on CPUs {cpu_list(rest)})")
    started = time.monotonic()
    maps: dict[str, int] = {}

    def read_maps(agent: AgentProcess, prog_ids: set[int]) -> None:
        maps.update(unwind_map_bytes(prog_ids))

    loop_life = 3 * (2 * args.profile_pairs + 1) * (args.profile_window + 1) + 600
    with tempfile.TemporaryDirectory(prefix="otel-ebpf-bench-") as tmp, otlp_sink() as sink:
        workdir = Path(tmp)
        loop = CpuLoop(loop_cpu, workdir, loop_life, NOFP_BIN)
        try:
            slowdown = slowdown_phase(args, loop, workdir, sink.endpoint,
                                      (99, CALIBRATION_HZ))
            cpu = cpu_phase(args, loop_cpu, rest, workdir, sink, NOFP_BIN, read_maps)
            depths = sample_depths(sink)
        finally:
            loop.stop()
    print(f"agent:   {cpu.command}")
    report(slowdown, cpu, 1 + len(rest), maps, depths)
    print(f"took {time.monotonic() - started:.0f}s")
    return 0
