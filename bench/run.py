"""`make bench`: the agent's overhead, one suite after another (`--suite`, default all).

  syscalls  what the syscall_latency probe costs per syscall (this file; method below)
  profile   the CPU profiler: slowdown of a CPU loop at 19 and 99 Hz, the agent's own CPU
            at 99 Hz with every CPU busy, lost stacks (bench/profile.py)
  pyprofile the CPython unwinder: slowdown of two busy Python processes at 99 Hz, the BPF
            time per sample and the agent's CPU, next to a C loop (bench/pyprofile.py)
  unwind    the same on a loop built without frame pointers: slowdown at 99 Hz, the BPF
            program's time per sample, agent CPU, the unwind maps' kernel memory, the
            64-CPU projection (bench/unwind.py)
  spans     slow-syscall spans exported per second without loss, and the agent's CPU per
            span (bench/spans.py)
  tcp       the retransmit probe's kernel cost per event and the agent's CPU during a lossy
            50 MB transfer (bench/tcp.py)
  footprint the agent at rest on its defaults: seconds until attached, peak and steady RSS
            (smaps: anonymous, file-backed, LLVM/clang), steady CPU (bench/footprint.py)
  redis     a real server's throughput: Debian's redis-server driven by redis-benchmark on
            loopback, with nothing, the empty floor, the agent's defaults and each probe
            alone (bench/redis.py; `--suite redis --modes nothing,empty,agent` for a quick one)
  churn     the agent on its defaults while 200 /bin/true a second come and go: its RSS and
            its growth, peak RSS, CPU, points per export, series, and exact counts
            (bench/churn.py)
  offcpu    the off-CPU probe's cost per context switch on a two-thread pipe ping-pong:
            switches/s with nothing, an empty sched_switch program and the probe (rate
            limited, and recording every switch), and its BPF run time (bench/offcpu.py)

Each suite prints the machine, the commands, its method in brief, a table and PASS/MISS
per target. Shared helpers live in bench/common.py.

The syscalls suite: what the syscall_latency probe costs per syscall, next to its
references.

Method
------
A C program (bench/getppid_storm.c) makes N raw getppid syscalls in a tight loop and prints
the mean ns per call. getppid does almost nothing in the kernel, so its time is the syscall
entry/exit path, where the sys_enter/sys_exit hooks add their cost, and nothing else
dilutes it. The storm is timed in five modes:

  baseline        nothing attached by us
  empty           bench/empty_tracepoints.bpf.c: two raw tracepoint programs that return 0,
                  the floor for any program on these hooks (the syscall slow path, the
                  tracepoint call, the BPF dispatch)
  clock           bench/clock_floor.bpf.c: the empty programs plus one bpf_ktime_get_ns()
                  on each hook, the floor of any latency probe (it keeps no per-task state,
                  so it is a cost reference, not a probe)
  syscall_latency the real probe (SyscallLatency with the default config, started and
                  stopped through the project's Engine), its map drained every second by a
                  background thread as the agent does
  syscount        `syscount-bpfcc -L` running in a subprocess: the BCC tool that measures
                  the same thing (classic raw_syscalls tracepoints, a hash keyed by thread)

"added" is a mode's median minus the baseline median. The two targets from the issue are
probe added <= 0.45 x syscount added, and probe added <= 2 x empty added.

Noise control:
  * Alternation: every round runs every mode once, the order rotated each round, so a
    slow drift of the machine (frequency, a neighbour VM, page cache) spreads over all modes
    instead of landing on whichever ran last.
  * Medians over rounds, not means: one disturbed storm moves a mean, not a median. The
    min..max column shows how far the rounds disagreed.
  * Pinning: the storm runs under `taskset` on one CPU; this script, its drain thread and
    syscount's Python process are pinned to the other CPUs, so the user-space side (map
    drains, decoding) runs beside the storm rather than in its time slices, and the storm
    measures what the programs cost in the kernel, on the syscall path.
  * Every BPF program is loaded and attached afresh per round and detached before the next
    mode, and each storm starts only once its mode is attached (syscount: once it printed
    "Tracing syscalls", which it does after attaching).

Caveats, read before trusting a number:
  * On a VM the steal time of the host and the hypervisor's timer and IPI handling are
    noise we cannot pin away; rerun with more --rounds when the min..max ranges overlap.
  * With 2 CPUs "the other CPUs" is one CPU, shared by this script, syscount, the kernel's
    own threads and anything else running: interrupts still land on the storm CPU.
  * The cost of bpf_ktime_get_ns depends on the clocksource (tsc cheapest, kvm-clock more,
    hpet/acpi_pm very expensive) and on the Spectre v2 mitigation (retpolines make the
    clocksource's indirect call, and the BPF dispatch itself, dearer); both are printed.
    The probe and syscount each read the clock twice per syscall.
  * A getppid storm is the worst case on purpose: the relative overhead on real syscalls
    (read, futex, epoll_wait...) is far smaller because they do real work.
  * Another tool's programs on the syscall hooks (a test suite starting the agent, a tracer)
    slow every storm they overlap. With bpftool the script looks before and after each
    storm, waits for them to go (up to a minute per run), retries the storm, and marks with
    "!" any sample it could not get clean. A program that comes and goes within one storm
    is not seen, nor is CPU load on the other CPU(s): the min..max column is the tell.

It needs root, gcc, taskset and syscount-bpfcc (Debian: bpfcc-tools). It exits 0 whether or
not the targets are met (it is a measurement, not a test) and nonzero only when it could not
measure.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

# bench/profile.py must not shadow the standard library's profile module (cProfile imports
# it), so bench/ leaves sys.path and the suites are imported as bench.* from the repository.
_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.insert(0, str(_BENCH.parent))

from bench.common import (  # noqa: E402
    BUILD_DIR,
    FOREIGN_RETRIES,
    BareTracepoints,
    BenchError,
    HookWatch,
    _children,
    _raise_exit,
    _stop_process,
    build_c,
    choose_cpus,
    fmt,
    import_bcc,
    machine_lines,
    open_bpf_fds,
    ratio,
    require,
)
from otel_ebpf.kernel import headers, syscalls  # noqa: E402
from otel_ebpf.kernel.engine import Engine, EngineError  # noqa: E402
from otel_ebpf.kernel.syscalls import SyscallTable  # noqa: E402
from otel_ebpf.model import Collection, ExpHistogramDelta  # noqa: E402

# None of these import bcc; the engine imports it when it first loads a program.
from otel_ebpf.probes.syscall_latency import SyscallLatency, SyscallLatencyConfig  # noqa: E402

BENCH_DIR = _BENCH
STORM_SRC = BENCH_DIR / "getppid_storm.c"
STORM_BIN = BUILD_DIR / "getppid_storm"
STORM_COMM = "getppid_storm"  # the kernel's comm of the storm: how the probe's records name it
EMPTY_SRC = BENCH_DIR / "empty_tracepoints.bpf.c"
CLOCK_SRC = BENCH_DIR / "clock_floor.bpf.c"

SYSCOUNT = "syscount-bpfcc"
SYSCOUNT_READY = b"Tracing syscalls"
SYSCOUNT_START_TIMEOUT = 60.0  # compiling with clang on a loaded VM can take a while
# Seconds between drains: more often than the agent's default 5 s, so if anything the
# probe is charged for more draining than it would do in production.
DRAIN_INTERVAL = 1.0
SETTLE = 0.3  # seconds after attaching, so the loader's own work is over before timing
STORM_TIMEOUT = 300.0

SYSCOUNT_RATIO_TARGET = 0.45
FLOOR_RATIO_TARGET = 2.0


class Mode(Protocol):
    key: str
    label: str

    def attached(self) -> contextlib.AbstractContextManager[None]: ...


# -- modes -------------------------------------------------------------------------------


class Baseline:
    key = "baseline"
    label = "baseline"

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        yield


class SyscallLatencyProbe:
    """The real probe, started and stopped as the agent does, with a drain thread."""

    key = "probe"
    label = "syscall_latency probe"

    def __init__(self, engine: Engine, syscall_table: SyscallTable) -> None:
        self._engine = engine
        self._syscalls = syscall_table
        # Sanity counters over all rounds: proof that the probe saw the storm.
        self.storm_syscalls = 0
        self.lost_events = 0
        self.storms = 0  # storms it was attached for, retries included

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        probe = SyscallLatency(SyscallLatencyConfig(), self._syscalls)
        probe.start(self._engine)
        self.storms += 1
        stop = threading.Event()
        errors: list[BaseException] = []
        thread = threading.Thread(target=self._drain_loop, args=(probe, stop, errors),
                                  name="drain", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            try:
                # The storm's last partial second is still in the map.
                self._account(probe.collect())
            finally:
                probe.stop()
        if errors:
            raise BenchError(f"draining the probe's map failed: {errors[0]!r}") from errors[0]

    def _drain_loop(self, probe: SyscallLatency, stop: threading.Event,
                    errors: list[BaseException]) -> None:
        try:
            while not stop.wait(DRAIN_INTERVAL):
                self._account(probe.collect())
        except Exception as exc:  # reported by the main thread after the storm
            errors.append(exc)

    def _account(self, collection: Collection) -> None:
        for record in collection.records:
            if isinstance(record, ExpHistogramDelta) and record.workload.comm == STORM_COMM:
                self.storm_syscalls += record.count
        self.lost_events += sum(collection.lost_events.values())


class Syscount:
    """`syscount-bpfcc -L` in its own session, so a Ctrl-C on the bench does not reach it
    (we stop it ourselves) and it cannot print its summary over our table."""

    key = "syscount"
    label = "syscount-bpfcc -L"

    def __init__(self, exe: str) -> None:
        self._exe = exe

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        # Unbuffered, or the "Tracing syscalls" line sits in its stdout buffer forever.
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen([self._exe, "-L"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            self._wait_ready(proc)
            yield
        finally:
            _stop_process(proc)

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        output = b""
        deadline = time.monotonic() + SYSCOUNT_START_TIMEOUT
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while SYSCOUNT_READY not in output:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BenchError(f"{self._exe} -L did not report attaching within "
                                     f"{SYSCOUNT_START_TIMEOUT:.0f}s; it printed:\n"
                                     + output.decode(errors="replace"))
                if not sel.select(remaining):
                    continue
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    proc.wait()
                    raise BenchError(f"{self._exe} -L exited ({proc.returncode}) before "
                                     "attaching; it printed:\n"
                                     + output.decode(errors="replace"))
                output += chunk


# -- the storm ---------------------------------------------------------------------------


def build_storm() -> None:
    build_c(STORM_SRC, STORM_BIN)


def storm_command(cpu: int, calls: int) -> list[str]:
    return ["taskset", "-c", str(cpu), str(STORM_BIN), str(calls)]


def run_storm(cpu: int, calls: int) -> float:
    cmd = storm_command(cpu, calls)
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, check=False,
                                timeout=STORM_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"the storm took over {STORM_TIMEOUT:.0f}s: {shlex.join(cmd)}") from exc
    if result.returncode != 0:
        raise BenchError(f"the storm failed ({result.returncode}): {shlex.join(cmd)}\n"
                         f"{result.stderr}")
    try:
        return float(result.stdout.strip())
    except ValueError as exc:
        raise BenchError(f"the storm printed {result.stdout!r}, not a number") from exc


# -- the report --------------------------------------------------------------------------


def report(modes: Sequence[Mode], samples: dict[str, list[float]]) -> None:
    median = {key: statistics.median(values) for key, values in samples.items()}
    base = median["baseline"]
    added = {key: median[key] - base for key in median}
    syscount_added, floor_added = added["syscount"], added["empty"]

    print()
    header = (f"{'mode':<24}{'ns/syscall':>11}{'min..max':>17}{'added ns':>10}"
              f"{'vs syscount':>13}{'vs empty':>10}")
    print(header)
    print("-" * len(header))
    for mode in modes:
        values = samples[mode.key]
        spread = f"{min(values):.1f}..{max(values):.1f}"
        is_base = mode.key == "baseline"
        print(f"{mode.label:<24}{median[mode.key]:>11.1f}{spread:>17}"
              f"{fmt(None if is_base else added[mode.key], '.1f'):>10}"
              f"{fmt(None if is_base else ratio(added[mode.key], syscount_added)):>13}"
              f"{fmt(None if is_base else ratio(added[mode.key], floor_added)):>10}")

    print()
    for what, measured, limit in (
        ("probe added <= 0.45 x syscount added", ratio(added["probe"], syscount_added),
         SYSCOUNT_RATIO_TARGET),
        ("probe added <= 2 x empty added", ratio(added["probe"], floor_added),
         FLOOR_RATIO_TARGET),
    ):
        if measured is None:
            verdict = "n/a (reference added cost within noise)"
        else:
            verdict = ("PASS" if measured <= limit else "MISS") + f"  ({measured:.2f}x)"
        print(f"target: {what:<40} {verdict}")
    clock = added["clock"]
    clock_vs_floor, clock_vs_syscount = ratio(clock, floor_added), ratio(clock, syscount_added)
    if clock_vs_floor is not None and clock_vs_syscount is not None:
        print(f"clock:  two clock reads alone add {clock:.1f} ns = {clock_vs_floor:.2f}x the "
              f"empty floor, {clock_vs_syscount:.2f}x syscount's; the probe, which reads no "
              f"clock on most calls, adds {added['probe'] - clock:+.1f} ns against them")


# -- main --------------------------------------------------------------------------------


SUITES = ("syscalls", "profile", "pyprofile", "unwind", "spans", "tcp", "footprint", "redis",
          "churn", "offcpu")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from bench import churn, footprint, offcpu, profile, pyprofile, redis, spans, tcp

    parser = argparse.ArgumentParser(
        description="Overhead benchmarks. syscalls: the syscall_latency probe's cost per "
                    "syscall on a getppid storm, next to empty raw tracepoints and "
                    "syscount-bpfcc -L. profile: the CPU profiler's slowdown of a CPU loop, "
                    "its own CPU and lost stacks. unwind: the same on a loop built without "
                    "frame pointers, with the unwinder's cost per sample and memory. spans: "
                    "slow-syscall spans exported per second without loss, and the agent's "
                    "CPU per span. redis: a real "
                    "server's requests/s with nothing, the empty floor, the agent and each "
                    "probe alone. churn: the agent on its defaults under process churn: RSS, "
                    "CPU, points per export, exact counts. offcpu: the off-CPU probe's cost "
                    "per context switch.")
    parser.add_argument("--suite", choices=(*SUITES, "all"), default="all",
                        help="which benchmark to run (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="syscalls, redis: rounds; each times every mode once "
                             "(default: %(default)s)")
    parser.add_argument("--calls", type=int, default=3_000_000,
                        help="syscalls: getppid calls per storm (default: %(default)s)")
    profile.add_arguments(parser)
    pyprofile.add_arguments(parser)
    spans.add_arguments(parser)
    tcp.add_arguments(parser)
    footprint.add_arguments(parser)
    redis.add_arguments(parser)
    churn.add_arguments(parser)
    offcpu.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.calls < 1000:
        parser.error("--rounds must be >= 1 and --calls >= 1000")
    problem = (profile.check_arguments(args) or spans.check_arguments(args)
               or tcp.check_arguments(args) or footprint.check_arguments(args)
               or redis.check_arguments(args) or churn.check_arguments(args)
               or offcpu.check_arguments(args))
    if problem:
        parser.error(problem)
    return args


def measure(mode: Mode, watch: HookWatch, cpu: int, calls: int) -> tuple[float, list[str]]:
    """One storm under `mode`: ns per syscall, and the foreign hooks that overlapped it
    (empty unless even the retries could not find a quiet moment)."""
    foreign: list[str] = []
    ns = 0.0
    for _ in range(1 + FOREIGN_RETRIES):
        with mode.attached():
            time.sleep(SETTLE)
            foreign = watch.wait_clean()
            ns = run_storm(cpu, calls)
            # Checked while still attached: our own programs must not count as foreign.
            foreign = sorted(set(foreign) | set(watch.foreign()))
        if not foreign:
            break
        print(f"  {mode.key}: the storm overlapped {', '.join(foreign)}; measuring again",
              flush=True)
    return ns, foreign


def run(args: argparse.Namespace) -> int:
    """The syscalls suite."""
    require("gcc", "taskset")
    syscount = shutil.which(SYSCOUNT)
    if syscount is None:
        raise BenchError(f"{SYSCOUNT} not found. Fix: apt-get install bpfcc-tools")
    bcc = import_bcc()
    # Created first: it may set BCC_KERNEL_SOURCE, which the empty program's compile and
    # the syscount subprocess then pick up, so all three compile against the same headers.
    engine = Engine(headers.discover())
    build_storm()

    storm_cpu, rest = choose_cpus()
    if rest:
        os.sched_setaffinity(0, rest)  # inherited by the drain thread and by syscount

    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"storm:   {shlex.join(storm_command(storm_cpu, args.calls))}"
          f"  (others on CPUs {','.join(map(str, sorted(rest))) or 'the same CPU'})")
    for fact in machine_lines(bcc):
        print(fact)
    if not rest:
        print("warning: one CPU only: the drain thread and syscount share the storm's CPU")

    watch = HookWatch()
    if not watch.available:
        print("note: bpftool not found: cannot tell whether other tools' programs on the "
              "syscall hooks overlap the storms")

    probe = SyscallLatencyProbe(engine, syscalls.load())
    modes: list[Mode] = [
        Baseline(),
        BareTracepoints(engine, "empty", "empty raw tracepoints", EMPTY_SRC),
        BareTracepoints(engine, "clock", "+ two clock reads", CLOCK_SRC),
        probe,
        Syscount(syscount),
    ]
    samples: dict[str, list[float]] = {m.key: [] for m in modes}
    disturbed = 0
    started = time.monotonic()
    print()
    for r in range(args.rounds):
        order = modes[r % len(modes):] + modes[:r % len(modes)]
        line = []
        for mode in order:
            ns, foreign = measure(mode, watch, storm_cpu, args.calls)
            samples[mode.key].append(ns)
            line.append(f"{mode.key} {ns:.1f}{'!' if foreign else ''}")
            if foreign:
                disturbed += 1
                print(f"  ! {mode.key} overlapped foreign syscall hooks: {', '.join(foreign)}")
        print(f"round {r + 1}/{args.rounds} (ns/syscall): " + "  ".join(line), flush=True)

    report(modes, samples)
    if disturbed:
        print(f"\nwarning: {disturbed} storm(s) marked ! ran while another tool had programs "
              "on the syscall hooks: those numbers include its cost")
    expected = probe.storms * (args.calls + args.calls // 10)  # timed calls plus warm-up
    print(f"\nsanity: the probe recorded {probe.storm_syscalls} syscalls of {STORM_COMM} "
          f"(its {probe.storms} storms made {expected} getppid calls), "
          f"{probe.lost_events} lost events")
    if probe.storm_syscalls < expected:
        # Fewer than the storms made means the probe was not on the path being timed.
        print("warning: the probe recorded fewer syscalls than the storms made: its row "
              "may not measure what it claims")
    print(f"took {time.monotonic() - started:.0f}s")
    # Every mode detaches on exit; main() checks nothing is left (check_clean).
    return 0


def check_clean() -> None:
    """Every suite detaches and stops what it started; anything left is a bug here."""
    leaked = open_bpf_fds()
    if leaked:
        raise BenchError("BPF objects still open after the run: " + ", ".join(leaked))
    if _children():
        raise BenchError(f"child processes left running: {sorted(_children())}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_exit)
    from bench import churn, footprint, offcpu, profile, pyprofile, redis, spans, tcp, unwind

    suites: dict[str, Callable[[argparse.Namespace, bool], int]] = {
        "syscalls": lambda a, _: run(a),
        "profile": profile.run_suite,
        "pyprofile": pyprofile.run_suite,
        "unwind": unwind.run_suite,
        "spans": spans.run_suite,
        "tcp": tcp.run_suite,
        "footprint": footprint.run_suite,
        "redis": redis.run_suite,
        "churn": churn.run_suite,
        "offcpu": offcpu.run_suite,
    }
    chosen = SUITES if args.suite == "all" else (args.suite,)
    affinity = os.sched_getaffinity(0)
    failed = []
    machine_shown = False
    started = time.monotonic()
    for name in chosen:
        try:
            suites[name](args, machine_shown)
            machine_shown = True
        except (BenchError, EngineError) as exc:  # the message already says what to fix
            print(f"bench: {name}: {exc}", file=sys.stderr, flush=True)
            failed.append(name)
        except KeyboardInterrupt:
            print("bench: interrupted", file=sys.stderr)
            return 130
        except SystemExit as exc:  # SIGTERM (_raise_exit): say so, or the log just stops
            print(f"bench: stopped by a signal (exit {exc.code}); everything it started is "
                  "stopped", file=sys.stderr, flush=True)
            raise
        finally:
            os.sched_setaffinity(0, affinity)  # the syscalls suite pins us
        try:
            check_clean()
        except BenchError as exc:
            print(f"bench: {name}: {exc}", file=sys.stderr, flush=True)
            failed.append(name)
    if len(chosen) > 1:
        print(f"\nall suites took {time.monotonic() - started:.0f}s"
              + (f"; could not measure: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
