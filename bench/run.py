"""`make bench`: what the syscall_latency probe costs per syscall, next to its references.

Method
------
A C program (bench/getppid_storm.c) makes N raw getppid syscalls in a tight loop and prints
the mean ns per call. getppid does almost nothing in the kernel, so its time is the syscall
entry/exit path, where the sys_enter/sys_exit hooks add their cost, and nothing else
dilutes it. The storm is timed in four modes:

  baseline        nothing attached by us
  empty           bench/empty_tracepoints.bpf.c: two raw tracepoint programs that return 0,
                  the floor for any program on these hooks (the syscall slow path, the
                  tracepoint call, the BPF dispatch)
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
import json
import os
import platform
import selectors
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

# None of these import bcc; the engine imports it when it first loads a program.
from otel_ebpf.config import SyscallLatencyConfig
from otel_ebpf.kernel import headers, syscalls
from otel_ebpf.kernel.engine import Engine, EngineError, Program
from otel_ebpf.kernel.syscalls import SyscallTable
from otel_ebpf.model import Collection, ExpHistogramDelta
from otel_ebpf.probes.syscall_latency import SyscallLatency

BENCH_DIR = Path(__file__).resolve().parent
BUILD_DIR = BENCH_DIR / ".build"
STORM_SRC = BENCH_DIR / "getppid_storm.c"
STORM_BIN = BUILD_DIR / "getppid_storm"
STORM_COMM = "getppid_storm"  # the kernel's comm of the storm: how the probe's records name it
EMPTY_SRC = BENCH_DIR / "empty_tracepoints.bpf.c"

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

TRACEFS = "/sys/kernel/tracing"
SYSCALL_HOOKS = ("sys_enter", "sys_exit")  # prefixes: also syscalls/sys_enter_<name>
# Seconds the whole run may spend waiting for someone else's syscall hooks to go away,
# and how often one sample is retried when they overlapped it.
FOREIGN_WAIT_BUDGET = 60.0
FOREIGN_RETRIES = 2


class BenchError(Exception):
    """The bench could not measure; the message says what is missing or what failed."""


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


class EmptyTracepoints:
    """The floor. Compiled with BCC directly because Engine.load only reads probes/, but
    wrapped in the engine's Program so it is attached and detached by the same code."""

    key = "empty"
    label = "empty raw tracepoints"

    def __init__(self, bcc: Any) -> None:
        self._bcc = bcc

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        program = Program(self._bcc.BPF(src_file=str(EMPTY_SRC).encode()), self._bcc,
                          "empty_tracepoints")
        try:
            program.attach_raw_tracepoint("sys_enter", "on_sys_enter")
            program.attach_raw_tracepoint("sys_exit", "on_sys_exit")
            yield
        finally:
            program.close()


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


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM: syscount dies without printing, the kernel detaches its programs when its
    file descriptors close. SIGKILL if it does not go."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


# -- the storm ---------------------------------------------------------------------------


def build_storm() -> None:
    BUILD_DIR.mkdir(exist_ok=True)
    cmd = ["gcc", "-O2", "-Wall", "-Wextra", "-o", str(STORM_BIN), str(STORM_SRC)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BenchError(f"compiling the storm failed: {shlex.join(cmd)}\n{result.stderr}")


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


# -- machine facts and sanity checks -----------------------------------------------------


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return "?"


def cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def is_virtual() -> bool:
    # The CPUID hypervisor bit, as the kernel reports it.
    return any(line.startswith("flags") and " hypervisor" in line
               for line in _read("/proc/cpuinfo").splitlines())


def _children() -> set[int]:
    pids: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        pids.update(int(p) for p in _read(str(task / "children")).split() if p.isdigit())
    return pids


def _own_links() -> set[int]:
    """Ids of the BPF links this process holds open (the empty program's, the probe's)."""
    ids: set[int] = set()
    for fdinfo in Path("/proc/self/fdinfo").iterdir():
        for line in _read(str(fdinfo)).splitlines():
            if line.startswith("link_id:"):
                ids.add(int(line.split()[1]))
    return ids


def open_bpf_fds() -> list[str]:
    """BPF objects this process still holds: after the run there must be none, or a
    program would stay attached for as long as whoever imported us lives."""
    leaks = []
    for fdinfo in Path("/proc/self/fdinfo").iterdir():
        for line in _read(str(fdinfo)).splitlines():
            if line.startswith(("prog_type:", "link_type:", "map_type:")):
                leaks.append(f"fd {fdinfo.name} ({line.replace(chr(9), ' ')})")
                break
    return leaks


class HookWatch:
    """Finds BPF programs on the syscall hooks that are not this bench's.

    Anything on sys_enter/sys_exit (a test suite loading the agent, another tracer) puts
    every task on the syscall slow path and runs its program on every storm syscall: the
    storm it overlaps measures that tool, not ours. Any syscall tracepoint counts, the
    per-syscall syscalls/sys_enter_* ones included, since they switch on the same slow path.
    Needs bpftool; without it the bench cannot tell and says so.
    """

    def __init__(self) -> None:
        self.available = shutil.which("bpftool") is not None
        self.wait_budget = FOREIGN_WAIT_BUDGET

    def _bpftool(self, *args: str) -> list[dict[str, Any]]:
        result = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True,
                                check=False)
        if result.returncode != 0:
            return []
        try:
            parsed = json.loads(result.stdout or "[]")
        except ValueError:
            return []
        return parsed if isinstance(parsed, list) else []

    def foreign(self) -> list[str]:
        if not self.available:
            return []
        own_pids = {os.getpid()} | _children()  # syscount runs as our child
        # bpftool perf names the process holding each tracepoint or raw tracepoint fd; the
        # link list adds links no process holds (pinned), which perf cannot see.
        holders: dict[int, set[str]] = {}  # pid (0: none) -> hooks
        seen_progs: set[int] = set()
        for perf in self._bpftool("perf", "show"):
            hook = str(perf.get("tracepoint", ""))
            if hook.startswith(SYSCALL_HOOKS):
                seen_progs.add(int(perf.get("prog_id", -1)))
                if perf.get("pid") not in own_pids:
                    holders.setdefault(int(perf.get("pid", 0)), set()).add(hook)
        own_links = _own_links()
        for link in self._bpftool("link", "show"):
            hook = str(link.get("tp_name", ""))
            if (link.get("type") == "raw_tracepoint" and hook.startswith(SYSCALL_HOOKS)
                    and link.get("id") not in own_links
                    and int(link.get("prog_id", -1)) not in seen_progs):
                holders.setdefault(0, set()).add(hook)
        found = [
            f"{'pinned link' if pid == 0 else _read(f'/proc/{pid}/comm') + f'[{pid}]'} on "
            + "+".join(sorted(hooks))
            for pid, hooks in sorted(holders.items())
        ]
        for event in ("sys_enter", "sys_exit"):
            if _read(f"{TRACEFS}/events/raw_syscalls/{event}/enable") == "1":
                found.append(f"ftrace raw_syscalls/{event}")
        return found

    def wait_clean(self) -> list[str]:
        """Wait, out of a budget for the whole run, until no foreign hook is left."""
        found = self.foreign()
        if found and self.wait_budget > 0:
            print(f"  waiting (up to {self.wait_budget:.0f}s more) for foreign syscall hooks "
                  f"to go: {', '.join(found)}", flush=True)
        while found and self.wait_budget > 0:
            time.sleep(1.0)
            self.wait_budget -= 1.0
            found = self.foreign()
        return found


# -- the report --------------------------------------------------------------------------


def ratio(num: float, den: float) -> float | None:
    # An "added" of zero or less means the mode is inside the noise: no meaningful ratio.
    return num / den if den > 0 else None


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


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


# -- main --------------------------------------------------------------------------------


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    # SIGTERM becomes SystemExit so the finally blocks detach programs and stop syscount.
    raise SystemExit(128 + signum)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure the syscall_latency probe's cost per syscall on a getppid "
                    "storm, next to empty raw tracepoints and syscount-bpfcc -L.")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds; each times every mode once (default: %(default)s)")
    parser.add_argument("--calls", type=int, default=3_000_000,
                        help="getppid calls per storm (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.calls < 1000:
        parser.error("--rounds must be >= 1 and --calls >= 1000")
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


def choose_cpus() -> tuple[int, set[int]]:
    """The storm's CPU (the last we may use) and the rest, for everything else."""
    allowed = sorted(os.sched_getaffinity(0))
    storm_cpu = allowed[-1]
    rest = set(allowed[:-1])
    return storm_cpu, rest


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise BenchError("needs root: loading BPF programs takes CAP_BPF and CAP_PERFMON")
    for tool in ("gcc", "taskset"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found on PATH")
    syscount = shutil.which(SYSCOUNT)
    if syscount is None:
        raise BenchError(f"{SYSCOUNT} not found. Fix: apt-get install bpfcc-tools")
    try:
        import bcc
    except ImportError as exc:
        raise BenchError("the BCC Python module is not importable. Fix: install python3-bpfcc"
                         " and use a venv made with --system-site-packages") from exc
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
    print(f"kernel:  {platform.release()} {platform.machine()}")
    print(f"cpu:     {cpu_model()}, nproc {os.cpu_count()}"
          f"{', virtual machine' if is_virtual() else ''}")
    print(f"clock:   {_read('/sys/devices/system/clocksource/clocksource0/current_clocksource')}"
          f" (clocksource; bpf_ktime_get_ns reads it)")
    print(f"spectre: {_read('/sys/devices/system/cpu/vulnerabilities/spectre_v2')}")
    print(f"bcc:     {getattr(bcc, '__version__', '?')}")
    if not rest:
        print("warning: one CPU only: the drain thread and syscount share the storm's CPU")

    watch = HookWatch()
    if not watch.available:
        print("note: bpftool not found: cannot tell whether other tools' programs on the "
              "syscall hooks overlap the storms")

    probe = SyscallLatencyProbe(engine, syscalls.load())
    modes: list[Mode] = [Baseline(), EmptyTracepoints(bcc), probe, Syscount(syscount)]
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

    # Every mode detaches on exit; these would be bugs in this file, so fail loudly.
    leaked = open_bpf_fds()
    if leaked:
        raise BenchError("BPF objects still open after the run: " + ", ".join(leaked))
    if _children():
        raise BenchError(f"child processes left running: {sorted(_children())}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_exit)
    try:
        return run(args)
    except (BenchError, EngineError) as exc:  # the message already says what to fix
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
