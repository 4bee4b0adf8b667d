"""`make bench` offcpu suite (issue #13): what the off-CPU probe costs per context switch.

Load: bench/pingpong.c, two threads handing a byte back and forth over two pipes, pinned
to one CPU (taskset), so every hand-over is a context switch of a thread that blocks in
read: the worst case for a probe on sched_switch, which runs on every switch and records
every blocked thread. Its switches a second (getrusage of the process) are timed in four
modes, every round running each mode once in a rotated order, medians over rounds:

  baseline   nothing attached by us
  empty      bench/empty_switch.bpf.c: a program that returns 0 on sched_switch, the floor
             of any probe on that hook (the tracepoint call and the BPF dispatch)
  off_cpu    the probe (OffCpu through the project's Engine) on its defaults: the capture
             rate limit (1000 stacks a second for the machine) refuses almost every
             switch-out of the storm, so this is the cost of a switch it does not walk
  all        the probe with the limit out of the way (rate 10^6/s, burst 10^6): two stack
             walks at every switch-out, the cost of a switch it does record

Its map is drained every second by a thread, as the agent does (pinned beside the storm).
"added ns/switch" is 1e9 / switches-per-second of a mode less the baseline's: with the
CPU saturated by the two threads, a switch's share of the CPU is the inverse of the rate.
Then, once per probe mode, the kernel's BPF run-time statistics (BPF_ENABLE_STATS, on only
for that storm: it adds two clock reads to every BPF run) give the program's own time per
run, which is per context switch.

Caveats: a VM's steal time and timer noise land on the storm CPU; another session's load
shares the other CPU(s) and takes tokens of the machine-wide limit (off_cpu mode). It needs
root, gcc and taskset; it exits 0 whether or not anything is cheap (a measurement).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

if __name__ == "__main__":
    _BENCH = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
    sys.path.insert(0, str(_BENCH.parent))

from bench.common import (
    BENCH_DIR,
    BUILD_DIR,
    REPO_DIR,
    bpf_run_time_stats,
    build_c,
    choose_cpus,
    cpu_list,
    fmt,
    import_bcc,
    median,
    prog_run_stats,
    require,
    run_standalone,
    suite_heading,
)

if str(REPO_DIR) not in sys.path:
    sys.path.insert(0, str(REPO_DIR))

from otel_ebpf.kernel import headers
from otel_ebpf.kernel.engine import Engine, Program
from otel_ebpf.probes.off_cpu import OffCpu, OffCpuConfig

MODES = ("baseline", "empty", "off_cpu", "all")
SETTLE = 0.3  # s between attaching and the storm


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--offcpu-rounds", type=int, default=7,
                        help="offcpu: rounds, each times every mode once (default: %(default)s)")
    parser.add_argument("--offcpu-seconds", type=float, default=2.0,
                        help="offcpu: seconds per storm (default: %(default)s)")


def check_arguments(args: argparse.Namespace) -> str | None:
    if args.offcpu_rounds < 1 or args.offcpu_seconds <= 0:
        return "--offcpu-rounds must be >= 1 and --offcpu-seconds > 0"
    return None


def storm(binary: Path, cpu: int, seconds: float) -> float:
    """Context switches a second of one ping-pong run on `cpu`."""
    out = subprocess.run(["taskset", "-c", str(cpu), str(binary), str(seconds)],
                         capture_output=True, text=True, check=True, timeout=seconds + 30)
    fields = out.stdout.split()
    return int(fields[3]) / float(fields[5])


class Attached:
    """A mode's programs, attached for a block; the probe drained every second."""

    def __init__(self, engine: Engine, mode: str, rest: set[int]) -> None:
        self.engine, self.mode, self.rest = engine, mode, rest
        self.prog_ids: list[int] = []

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        if self.mode == "baseline":
            yield
            return
        if self.mode == "empty":
            program: Program = self.engine.load("empty_switch",
                                                source=BENCH_DIR / "empty_switch.bpf.c")
            try:
                program.attach_raw_tracepoint("sched_switch", "on_switch")
                self.prog_ids = program.program_ids()
                yield
            finally:
                program.close()
            return
        config = (OffCpuConfig(enabled=True) if self.mode == "off_cpu" else
                  OffCpuConfig(enabled=True, rate_per_second=1_000_000, burst=1_000_000))
        probe = OffCpu(config)
        probe.start(self.engine)
        stop = threading.Event()

        def drain() -> None:
            if self.rest:
                os.sched_setaffinity(0, self.rest)
            while not stop.wait(1.0):
                probe.collect()

        thread = threading.Thread(target=drain, daemon=True)
        thread.start()
        try:
            self.prog_ids = probe.program_ids()
            yield
        finally:
            stop.set()
            thread.join()
            probe.stop()


def run_suite(args: argparse.Namespace, machine_shown: bool) -> int:
    require("gcc", "taskset", "bpftool")
    bcc = import_bcc()
    suite_heading("offcpu: the off-CPU probe's cost per context switch", bcc, machine_shown)
    binary = BUILD_DIR / "pingpong"
    build_c(BENCH_DIR / "pingpong.c", binary, "-pthread")
    cpu, rest = choose_cpus()
    print(f"load:    bench/pingpong.c on CPU {cpu} for {args.offcpu_seconds}s per storm, "
          f"{args.offcpu_rounds} rounds x {len(MODES)} modes; drains on CPU(s) "
          f"{cpu_list(rest) or '-'}; load average {os.getloadavg()[0]:.2f} at start")
    engine = Engine(headers.discover())
    modes = {m: Attached(engine, m, rest) for m in MODES}
    rates: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(args.offcpu_rounds):
        order = MODES[r % len(MODES):] + MODES[:r % len(MODES)]
        for m in order:
            with modes[m].attached():
                time.sleep(SETTLE)
                rates[m].append(storm(binary, cpu, args.offcpu_seconds))
    per_run: dict[str, tuple[int, int]] = {}
    for m in ("empty", "off_cpu", "all"):
        with bpf_run_time_stats() as on, modes[m].attached():
            if not on:
                break
            time.sleep(SETTLE)
            before = prog_run_stats(modes[m].prog_ids)
            storm(binary, cpu, args.offcpu_seconds)
            after = prog_run_stats(modes[m].prog_ids)
            per_run[m] = (after[0] - before[0], after[1] - before[1])
    base = median(rates["baseline"])
    print(f"\n{'mode':<10}{'switches/s':>12}{'min..max':>22}{'added ns/switch':>18}"
          f"{'BPF ns/run':>12}")
    for m in MODES:
        med = median(rates[m])
        added = 1e9 / med - 1e9 / base if m != "baseline" else None
        runs, ns = per_run.get(m, (0, 0))
        print(f"{m:<10}{med:>12,.0f}{f'{min(rates[m]):,.0f}..{max(rates[m]):,.0f}':>22}"
              f"{fmt(added, '.0f'):>18}{fmt(ns / runs if runs else None, '.0f'):>12}")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args()
    problem = check_arguments(args)
    if problem:
        parser.error(problem)
    return run_standalone("offcpu", run_suite, args)


if __name__ == "__main__":
    sys.exit(main())
