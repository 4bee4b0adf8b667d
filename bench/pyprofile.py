"""`make bench` pyprofile suite (issue #12): what the CPython unwinder costs.

The same method as the profile suite (bench/profile.py: one real agent, only cpu_profile,
its sampling switched off and on in alternating windows from outside), run side by side
on two workloads at 99 Hz:

- python: two busy Python processes (bench/py_loop.py under Debian's python3, whose
  samples all walk the interpreter's frames in BPF), both pinned to one CPU;
- C: one cpu_loop (bench/cpu_loop.c, native frames only) on the same CPU.

Per workload: the slowdown (work per CPU-second of the loops, mean of the two off windows
around an on window / the on window, median; target <= 1.01), the BPF program's time
per sample from the kernel's run-time statistics over the on windows (all samples of the
machine, so mostly the loops' own), and the agent's CPU in the on windows (target <= 1 %
of one core).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import (
    BENCH_DIR,
    BenchError,
    bpf_run_time_stats,
    cpu_list,
    otlp_sink,
    task_schedstat,
    verdict,
)
from bench.profile import (
    LOOP_BIN,
    ON_SETTLE,
    TOGGLE_SETTLE,
    CpuLoop,
    Reading,
    Window,
    alternating_windows,
    loop_setup,
    running_agent,
    slowdown_of,
    stop_agent,
)

HZ = 99
PY_LOOP = BENCH_DIR / "py_loop.py"
PYTHON = "/usr/bin/python3"
SLOWDOWN_TARGET = 1.01
AGENT_CPU_TARGET = 1.0  # % of one core
# the agent exports as it does by default (exporter.interval): the CPU figure is what a
# user's agent at 99 Hz costs, and the windows see its exports at their real rate
EXPORT_INTERVAL = "10s"


class PyLoops:
    """Busy Python processes pinned to one CPU, read as one loop (summed units and CPU)."""

    def __init__(self, cpu: int, workdir: Path, count: int, max_seconds: float) -> None:
        import mmap
        import subprocess

        self.procs = []
        self._maps = []
        for i in range(count):
            counter = workdir / f"py_loop.{i}.counter"
            command = ["taskset", "-c", str(cpu), PYTHON, str(PY_LOOP), str(counter),
                       f"{max_seconds:.0f}"]
            self.procs.append(subprocess.Popen(command, stdin=subprocess.DEVNULL))
            deadline = time.monotonic() + 10
            while not (counter.exists() and counter.stat().st_size >= 8):
                if time.monotonic() > deadline:
                    self.stop()
                    raise BenchError(f"the Python loop did not start: {shlex.join(command)}")
                time.sleep(0.01)
            with counter.open("rb") as f:
                self._maps.append(mmap.mmap(f.fileno(), 4096, prot=mmap.PROT_READ))
        self.command = f"taskset -c {cpu} {PYTHON} {PY_LOOP} COUNTER MAX_S (x{count})"

    def read(self) -> Reading:
        import struct

        units = run = wait = 0.0
        for proc, counter in zip(self.procs, self._maps, strict=True):
            if proc.poll() is not None:
                raise BenchError(f"a Python loop exited ({proc.returncode})")
            r, w = task_schedstat(proc.pid)
            units += struct.unpack_from("Q", counter)[0]
            run, wait = run + r, wait + w
        return Reading(int(units), time.monotonic(), run, wait)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for counter in self._maps:
            counter.close()


def alternate(loop: CpuLoop | PyLoops, workdir: Path, name: str, endpoint: str,
              pairs: int, window: float, cpu_seconds: float
              ) -> tuple[list[Window], int, int, float]:
    """Off/on windows; the BPF program's runs and ns over the on windows; then the agent's
    CPU (% of one core) over `cpu_seconds` with sampling on, once it settled (the windows
    come first: by then its start-up work, symbolizing every process of the machine, is
    done)."""
    count = 2 * pairs + 1
    life = ON_SETTLE + count * (window + TOGGLE_SETTLE + 0.5) + cpu_seconds + 120
    with running_agent(workdir, name, HZ, endpoint, EXPORT_INTERVAL, life) as (
            agent, prog_ids), bpf_run_time_stats():
        windows, runs, ns = alternating_windows(loop, agent, prog_ids, count, window)
        cpu0, t0 = agent.cpu_seconds(), time.monotonic()  # sampling on
        time.sleep(cpu_seconds)
        cpu_pct = (agent.cpu_seconds() - cpu0) / (time.monotonic() - t0) * 100
        stop_agent(agent, prog_ids)
    return windows, runs, ns, cpu_pct


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pyprofile-pairs", type=int, default=15,
                        help="pyprofile: on windows per workload (default: %(default)s)")
    parser.add_argument("--pyprofile-window", type=float, default=1.0,
                        help="pyprofile: seconds per on/off window (default: %(default)s)")
    parser.add_argument("--pyprofile-cpu-seconds", type=float, default=30.0,
                        help="pyprofile: seconds the agent's CPU is measured over, after the "
                             "windows (default: %(default)s)")


def run_suite(args: argparse.Namespace, machine_shown: bool) -> int:
    loop_cpu, rest = loop_setup("pyprofile: the CPython unwinder of the CPU profiler "
                                "(issue #12)", machine_shown, LOOP_BIN,
                                "-fno-omit-frame-pointer", PYTHON)
    print(f"method:  as the profile suite, at {HZ} Hz, {2 * args.pyprofile_pairs + 1} windows "
          f"of {args.pyprofile_window:g}s per workload, loops on CPU {loop_cpu}, bench and "
          f"sink on {cpu_list(rest)}")
    started = time.monotonic()
    life = (4 * (2 * args.pyprofile_pairs + 1) * (args.pyprofile_window + 1)
            + 2 * args.pyprofile_cpu_seconds + 600)
    results = {}
    with tempfile.TemporaryDirectory(prefix="otel-ebpf-bench-") as tmp, otlp_sink() as sink:
        workdir = Path(tmp)
        for name in ("python", "C"):
            loop: CpuLoop | PyLoops = (PyLoops(loop_cpu, workdir, 2, life) if name == "python"
                                       else CpuLoop(loop_cpu, workdir, life))
            try:
                results[name] = alternate(loop, workdir, f"agent-{name}", sink.endpoint,
                                          args.pyprofile_pairs, args.pyprofile_window,
                                          args.pyprofile_cpu_seconds)
            finally:
                loop.stop()
    print()
    header = (f"{'workload':<10}{'slowdown off/on':>16}{'null':>9}{'BPF us/sample':>15}"
              f"{'agent CPU %':>13}")
    print(header)
    print("-" * len(header))
    python_slowdown = python_cpu = 0.0
    for name, (windows, runs, ns, cpu_pct) in results.items():
        s = slowdown_of(windows)
        null = statistics.median(s.null) if s.null else float("nan")
        per_sample = ns / runs / 1000 if runs else float("nan")
        print(f"{name:<10}{s.median:>16.4f}{null:>9.4f}{per_sample:>15.2f}{cpu_pct:>13.3f}")
        if name == "python":
            python_slowdown, python_cpu = s.median, cpu_pct
    print("(BPF us/sample: every sample of the machine over the on windows, kernel BPF "
          "run-time stats; agent CPU: utime+stime per second over "
          f"{args.pyprofile_cpu_seconds:g}s after the windows, sampling on, exporting every "
          f"{EXPORT_INTERVAL}, the default)")
    print()
    print(f"target: {'python slowdown at 99 Hz <= 1.01':<40} "
          f"{verdict(python_slowdown <= SLOWDOWN_TARGET, f'{python_slowdown:.4f}')}")
    print(f"target: {'agent CPU (python) <= 1 % of a core':<40} "
          f"{verdict(python_cpu <= AGENT_CPU_TARGET, f'{python_cpu:.3f} %')}")
    print(f"took {time.monotonic() - started:.0f}s")
    return 0
