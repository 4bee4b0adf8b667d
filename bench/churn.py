"""`make bench` churn suite ("Bounded on a busy node"): the agent on its defaults while
short-lived processes come and go, its memory, its CPU, the size of its exports, and
whether the counts stay exact.

    .venv/bin/python bench/run.py --suite churn [--churn-rate N] [--churn-seconds S]

Method
------
The real agent (`otel-ebpf run` as a process) on its embedded defaults - every probe on,
per-workload syscall series, export every 10 s, the summary on - with one key set: the
exporter's endpoint, an in-process OTLP/gRPC sink on loopback (tests/peers/otlp_sink.py)
that records every request. Nothing leaves the machine.

Once its probes are attached the agent idles for --churn-idle seconds (its CPU then, with
whatever else runs on the machine, is printed for scale). Then bench/churn_spawn.c, a small
C driver in a cgroup of its own, starts /bin/true --churn-rate times a second for
--churn-seconds seconds (posix_spawn, on an absolute schedule; it reaps every child and
reports how many it spawned and how many exited 0, and its own and its children's CPU,
which are not the agent's). After the driver's last child exited, the bench waits two
export intervals, notes the last periodic export, and stops the agent with SIGTERM, on
which it drains its maps and exports once more.

Measured, all from outside the agent:
  * RSS (/proc/PID/status VmRSS) at the middle of the churn (60 s by default) and at its
    end: the growth over the second half; the smaps_rollup breakdown (anonymous vs file)
    and the largest mappings. Peak RSS is VmHWM, which a thread reads with VmRSS every
    0.2 s from the agent's launch until it exited (the final flush included), so the
    phase it was reached in is known (start-up: BCC's compile; idle; churn; drain;
    shutdown), with the highest VmRSS sampled in each phase. The engine compiles in
    short-lived child processes: until the probes are attached the RSS of the agent and
    its children is summed every 20 ms (bench/footprint.py's sampler; an upper bound, as
    shared pages count twice) and the children's VmHWM kept. The verdict takes the larger
    of the agent's VmHWM and that sum. The agent gets a compile cache of its own
    (OTEL_EBPF_CACHE_DIR in the run's directory): a cold start, every program compiled.
  * CPU, % of one core over the churn: utime+stime (/proc/PID/stat, every thread, ended
    ones included, 10 ms ticks) and the sum of the threads' schedstat run time (ns); the
    verdict takes the larger. For scale: the first --churn-idle seconds after attach
    (start-up work, first export) and the drain after the churn (the same machine without
    our churn). The busiest threads are listed. The probes' in-kernel cost is not in it:
    it runs in the churned processes' time (the driver's children's CPU).
  * The metrics requests the sink received: data points per request, per export (the
    requests of one export share their points' time stamp), series (resource, metric,
    point attributes) in the final export and over the run; points of one export that
    share their identity with another (workloads the export does not tell apart); series
    whose value no delta changed for a minute but which are still exported.
  * Exactness: the driver runs in a cgroup v2 directory made for the run, so its children
    count in workload series of their own (resource linux.cgroup.path), new and theirs
    alone whatever else runs "true" on the machine. The final export's
    linux.syscall.duration count of its series with process.executable.name "true" and
    linux.syscall.name "set_tid_address" (cumulative: the latest value) against the
    driver's spawned processes times the set_tid_address calls one /bin/true makes (strace
    counts them once per run: 1 with glibc's dynamic loader); shown for the last periodic
    export too (exact without the final flush?), and the sum over every "true" series of
    the machine beside it. bench/churn_execs.bpf.c (sched_process_fork/exec tracepoints)
    counts the processes named "true" exec'd from attach to SIGTERM, the driver's children
    (a check of the driver's count) and anyone else's (what the machine-wide sum holds
    beyond ours).
    With strace available, every syscall kind of /bin/true is checked the same way
    (strace's count per process x spawned; execve counts in the series of the image that
    made it, and exit_group never returns, so neither is expected in "true").
  * The agent's self-metric otel_ebpf.probe.lost_events (every probe and reason, latest
    value), and the other self-metrics of drops, splits and overflows.
Targets (the issue's): RSS growth over the second half <= 5 %, peak RSS <= 300 MB, CPU <=
5 % of one core, <= 5,000 data points per export, exported set_tid_address == spawned.

Caveats
  * The agent watches the whole machine: whatever else runs (another session's test suite)
    adds its processes, series and CPU to the agent's; the machine's forks during the churn
    (/proc/stat processes) and its load are printed beside ours. RSS growth is the most
    exposed: the CPU profiler keeps the symbol table of every ELF file it has sampled in
    (checked here: the first BCC compile it samples, libLLVM and libclang-cpp mapped, adds
    ~11 MB that stay; the next adds nothing), so a neighbour starting new large binaries
    during the second half shows up as growth that the churn of /bin/true did not cause.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    BENCH_DIR,
    BUILD_DIR,
    AgentProcess,
    BenchError,
    agent_command_for_report,
    build_c,
    fmt,
    import_bcc,
    last_counter_values,
    otlp_sink,
    process_cpu_seconds,
    prog_ids_of,
    require,
    suite_heading,
    verdict,
    wait_programs_gone,
)

DRIVER_SRC = BENCH_DIR / "churn_spawn.c"
DRIVER_BIN = BUILD_DIR / "churn_spawn"
EXECS_SRC = BENCH_DIR / "churn_execs.bpf.c"
PROGRAM = "/bin/true"
EXE_NAME = "true"  # its process.executable.name
SYSCALL = "set_tid_address"  # once per process, from the dynamic loader (strace checks)
DURATION_METRIC = "linux.syscall.duration"
EXPORT_INTERVAL_S = 10.0  # the product's default (exporter.interval); not set here
SAMPLE_S = 1.0  # how often RSS and CPU are read during the churn
TIMELINE_S = 0.2  # how often VmRSS and VmHWM are read, launch to exit
PROGRESS_S = 10.0  # how often a line is printed
QUIET_EXPORTS = 6  # a series unchanged over this many exports (60 s) is "quiet"
SELF_METRICS = ("otel_ebpf.spans.dropped", "otel_ebpf.profiles.dropped",
                "otel_ebpf.metrics.overflowed", "otel_ebpf.metrics.dropped",
                "otel_ebpf.metrics.requests.split")

RSS_GROWTH_TARGET = 5.0  # %, over the second half of the churn
PEAK_RSS_TARGET_MB = 300.0
CPU_TARGET = 5.0  # % of one core
POINTS_TARGET = 5000  # per export


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--churn-rate", type=float, default=200.0,
                        help="churn: /bin/true processes started a second "
                             "(default: %(default)g)")
    parser.add_argument("--churn-seconds", type=float, default=120.0,
                        help="churn: seconds of churn; RSS growth is measured over the "
                             "second half (default: %(default)g)")
    parser.add_argument("--churn-idle", type=float, default=15.0,
                        help="churn: seconds the agent idles before the churn, past its "
                             "first export (default: %(default)g)")


def check_arguments(args: argparse.Namespace) -> str | None:
    if args.churn_rate <= 0 or args.churn_seconds < 4 or args.churn_idle < 0:
        return "--churn-rate must be > 0, --churn-seconds >= 4 and --churn-idle >= 0"
    return None


# -- reading the agent from outside ----------------------------------------------------


def status_kb(pid: int, *fields: str) -> dict[str, int]:
    """Fields of /proc/PID/status given in kB (VmRSS, VmHWM, ...)."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in fields:
            out[key] = int(value.split()[0])
    return out


def smaps_rollup(pid: int) -> dict[str, int]:
    """/proc/PID/smaps_rollup, kB."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                out[key] = int(value.split()[0])
    return out


_MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$")


def smaps_by_file(pid: int) -> Counter[str]:
    """Rss (kB) per mapped file from /proc/PID/smaps; anonymous mappings as [anon]."""
    rss: Counter[str] = Counter()
    current = "[anon]"
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            m = _MAPPING.match(line)
            if m:
                current = m[1].strip() or "[anon]"
            elif line.startswith("Rss:"):
                rss[current] += int(line.split()[1])
    return rss


def thread_times(pid: int) -> dict[int, tuple[str, float]]:
    """tid -> (comm, seconds on a CPU) of every live thread."""
    out: dict[int, tuple[str, float]] = {}
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                run_ns = int((task / "schedstat").read_text().split()[0])
                out[int(task.name)] = ((task / "comm").read_text().strip(), run_ns / 1e9)
    return out


def machine_forks() -> int:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("processes "):
            return int(line.split()[1])
    return 0


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class MemoryTimeline:
    """VmRSS and VmHWM of the agent every TIMELINE_S from its launch to its exit, on a
    thread, with the phases the main thread marks: where the peak happened."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.began = time.monotonic()
        self.samples: list[tuple[float, int, int]] = []  # (s since launch, rss, hwm) kB
        self.phases: list[tuple[float, str]] = [(0.0, "start-up")]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                mem = status_kb(self.pid, "VmRSS", "VmHWM")
            except (OSError, ValueError):
                return  # gone
            if "VmRSS" in mem:  # a zombie has none
                self.samples.append((time.monotonic() - self.began, mem["VmRSS"],
                                     mem["VmHWM"]))
            self._stop.wait(TIMELINE_S)

    def mark(self, phase: str) -> None:
        self.phases.append((time.monotonic() - self.began, phase))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def phase_at(self, t: float) -> str:
        return [name for at, name in self.phases if at <= t][-1]

    def peak(self) -> tuple[int, float, str]:
        """(VmHWM kB, seconds after launch it was first seen, the phase then)."""
        if not self.samples:
            return 0, 0.0, "?"
        hwm = max(h for _, _, h in self.samples)
        t = next(t for t, _, h in self.samples if h == hwm)
        return hwm, t, self.phase_at(t)

    def per_phase(self) -> list[tuple[str, float, int]]:
        """(phase, its start, the highest VmRSS sampled in it)."""
        out = []
        bounds = [*self.phases, (float("inf"), "")]
        for (at, name), (until, _) in itertools.pairwise(bounds):
            rss = [r for t, r, _ in self.samples if at <= t < until]
            out.append((name, at, max(rss, default=0)))
        return out


@dataclass
class Reading:
    at: float  # monotonic
    rss_kb: int
    hwm_kb: int
    stat_s: float  # utime + stime
    run_s: float  # schedstat, live threads
    threads: dict[int, tuple[str, float]]
    forks: int

    @classmethod
    def of(cls, agent: AgentProcess) -> Reading:
        try:
            mem = status_kb(agent.pid, "VmRSS", "VmHWM")
            stat = process_cpu_seconds(agent.pid)
        except (OSError, ValueError) as exc:
            raise BenchError(f"the agent exited early ({agent.proc.poll()})\n"
                             + agent.log_tail()) from exc
        threads = thread_times(agent.pid)
        return cls(time.monotonic(), mem["VmRSS"], mem["VmHWM"], stat,
                   sum(t for _, t in threads.values()), threads, machine_forks())


def cpu_pct(a: Reading, b: Reading) -> tuple[float, float]:
    """(utime+stime, schedstat) between two readings, % of one core."""
    wall = b.at - a.at
    return (b.stat_s - a.stat_s) / wall * 100, (b.run_s - a.run_s) / wall * 100


# -- what the sink received --------------------------------------------------------------


def _attrs(kvs: Any) -> dict[str, Any]:
    from tests.peers.otlp_sink import attrs_to_dict

    return attrs_to_dict(kvs)


def _key(attrs: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    # scalars as they are; arrays and maps (unhashable) as text
    return tuple(sorted((k, v if isinstance(v, str | int | float | bool) else repr(v))
                        for k, v in attrs.items()))


@dataclass
class Export:
    """The metrics requests of one export: their points share a time stamp (the series
    gauge aside, which may travel alone in a last request)."""

    time_ns: int
    requests: list[int] = field(default_factory=list)  # points per request
    series: Counter[tuple[Any, ...]] = field(default_factory=Counter)  # identity -> points
    # the linux.syscall.duration points of "true": identity -> (linux.cgroup.path, syscall,
    # point)
    exact: dict[str, tuple[str | None, str, Any]] = field(default_factory=dict)
    values: dict[tuple[Any, ...], float] = field(default_factory=dict)  # identity -> value

    @property
    def points(self) -> int:
        return sum(self.requests)

    @property
    def duplicated(self) -> int:
        """Points whose identity (resource, metric, attributes) another point of the same
        export has too: series a backend cannot tell apart."""
        return sum(n for n in self.series.values() if n > 1)

    def syscall_count(self, cgroup: str | None = None) -> int:
        """set_tid_address of "true" in the workload series of `cgroup` (a path below the
        cgroup2 root), or in every one."""
        return self.syscalls(cgroup)[SYSCALL]

    def syscalls(self, cgroup: str | None = None) -> Counter[str]:
        """Every syscall of "true" in the series of `cgroup` (None: every cgroup)."""
        out: Counter[str] = Counter()
        for path, name, point in self.exact.values():
            if cgroup is None or path == cgroup:
                out[name] += int(point.count)
        return out


def _value(point: Any) -> float:
    """A point's cumulative value: a histogram's count, a number's value."""
    if hasattr(point, "count"):
        return float(point.count)
    return float(point.as_int if point.WhichOneof("value") == "as_int" else point.as_double)


def exports_of(requests: list[Any]) -> list[Export]:
    exports: list[Export] = []
    for request in requests:
        points = 0
        stamp = None
        found: list[tuple[tuple[Any, ...], Any, str, dict[str, Any]]] = []
        for rm in request.resource_metrics:
            resource = _key(_attrs(rm.resource.attributes))
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    kind = metric.WhichOneof("data")
                    if kind is None:
                        continue
                    for point in getattr(metric, kind).data_points:
                        points += 1
                        attrs = _attrs(point.attributes)
                        found.append(((resource, metric.name, _key(attrs)), point,
                                      metric.name, attrs))
                        if kind != "gauge" and stamp is None:
                            stamp = int(point.time_unix_nano)
        if exports and (stamp is None or exports[-1].time_ns == stamp):
            export = exports[-1]  # a part of the export before (or only its gauge)
        else:
            export = Export(stamp or 0)
            exports.append(export)
        export.requests.append(points)
        for key, point, name, attrs in found:
            export.series[key] += 1
            export.values[key] = _value(point)
            if name == DURATION_METRIC and attrs.get("process.executable.name") == EXE_NAME:
                export.exact[repr(key)] = (dict(key[0]).get("linux.cgroup.path"),
                                           str(attrs.get("linux.syscall.name")), point)
    return exports


MAP_FILL = "otel_ebpf.probe.map.fill"  # a gauge per probe and map, where main has it


def map_fill_peaks(sink: Any) -> dict[str, float]:
    """The highest value of each series of the agent's map-fill gauge over the run
    (attributes as text -> value): how full the kernel maps got at their drains."""
    from tests.peers.otlp_sink import attrs_to_dict

    out: dict[str, float] = {}
    for _, point in sink.metrics_points(MAP_FILL):
        attrs = ",".join(f"{k}={v}" for k, v in sorted(attrs_to_dict(point.attributes).items()))
        value = point.as_int if point.WhichOneof("value") == "as_int" else point.as_double
        out[attrs] = max(out.get(attrs, value), value)
    return out


def self_metric_values(sink: Any) -> dict[str, dict[str, float]]:
    """metric -> attributes (as text) -> latest value, for the agent's drop counters."""
    out: dict[str, dict[str, float]] = {}
    for name in ("otel_ebpf.probe.lost_events", *SELF_METRICS):
        values = last_counter_values(sink, name)
        if values:
            out[name] = {",".join(f"{k}={v}" for k, v in key): v for key, v in values.items()}
    return out


# -- the run -----------------------------------------------------------------------------


# syscalls that never return: the kernel's sys_exit never sees them, so nothing counts them
NO_RETURN = frozenset({"exit", "exit_group"})
_STRACE_LINE = re.compile(r"^(?:\d+\s+)?(\w+)\(")


def syscalls_per_process() -> tuple[Counter[str], str]:
    """The syscalls one /bin/true makes (those that return), by strace. Without strace:
    one set_tid_address (glibc's dynamic loader makes one) and nothing else known."""
    if shutil.which("strace") is None:
        return (Counter({SYSCALL: 1}),
                f"strace not found: assumed 1 {SYSCALL} (glibc's dynamic loader makes one)")
    with tempfile.NamedTemporaryFile(prefix="otel-ebpf-churn-strace-") as out:
        cmd = ["strace", "-f", "-qq", "-o", out.name, PROGRAM]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise BenchError(f"{shlex.join(cmd)} failed ({result.returncode}): "
                             f"{result.stderr.strip()}")
        calls: Counter[str] = Counter()
        for line in Path(out.name).read_text().splitlines():
            m = _STRACE_LINE.match(line)
            if m and m[1] not in NO_RETURN:
                calls[m[1]] += 1
    return calls, (f"strace -f {PROGRAM}: {calls[SYSCALL]} {SYSCALL} call(s) per process "
                   f"({sum(calls.values())} syscalls that return, {len(calls)} kinds)")


@dataclass
class Driver:
    spawned: int
    exited_ok: int
    failed: int
    elapsed_s: float
    max_lag_ms: float
    self_cpu_s: float
    children_cpu_s: float


def start_driver(rate: float, seconds: float, cgroup: Path) -> subprocess.Popen[str]:
    cmd = [str(DRIVER_BIN), f"{rate:g}", f"{seconds:g}", PROGRAM, str(cgroup)]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish_driver(proc: subprocess.Popen[str], timeout: float) -> Driver:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        proc.communicate()
        raise BenchError("the churn driver did not finish in time") from exc
    fields = out.split()
    if len(fields) != 7:
        raise BenchError(f"the churn driver failed ({proc.returncode}): {out!r} {err!r}")
    if proc.returncode != 0:
        print(f"warning: the churn driver reported failures: {err.strip()[:300]}")
    return Driver(int(fields[0]), int(fields[1]), int(fields[2]), float(fields[3]),
                  float(fields[4]), float(fields[5]), float(fields[6]))


@contextlib.contextmanager
def driver_cgroup() -> Iterator[Path]:
    """A cgroup v2 directory of this run for the driver and its children, removed after:
    their workload series is then theirs alone (its resource names the cgroup), whatever
    else runs "true" on the machine."""
    from otel_ebpf.kernel.cgroupfs import cgroup2_root

    path = cgroup2_root() / f"otel-ebpf-churn-{os.getpid()}"
    try:
        path.mkdir()
    except OSError as exc:
        raise BenchError(f"cannot create the driver's cgroup {path}: {exc.strerror}") from exc
    try:
        yield path
    finally:
        for _ in range(50):  # the last children may still be leaving it
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def cgroup_path(cgroup: Path) -> str:
    """How the agent names a cgroup: its path below the cgroup2 mount."""
    from otel_ebpf.kernel.cgroupfs import cgroup2_root

    return "/" + str(cgroup.relative_to(cgroup2_root()))


class ExecCounter:
    """bench/churn_execs.bpf.c: the processes named "true" exec'd machine-wide, the
    driver's and anyone else's, so that another /bin/true on a shared machine is not
    blamed on the agent. On sched_process_fork/exec only, not on the syscall path."""

    def __init__(self, bcc: Any) -> None:
        from otel_ebpf.kernel import headers
        from otel_ebpf.kernel.engine import Engine

        Engine(headers.discover())  # sets BCC_KERNEL_SOURCE where discovery needs it
        self._bpf = bcc.BPF(src_file=str(EXECS_SRC).encode())  # attaches as it loads

    def read(self) -> tuple[int, int]:
        """(the driver's, anyone else's) since loading."""
        import ctypes as ct

        counts = self._bpf["counts"]
        return counts[ct.c_int(0)].value, counts[ct.c_int(1)].value

    def close(self) -> None:
        self._bpf.cleanup()


class ChurnRun:
    """One agent through its phases - start-up, idle, churn, drain, shutdown - and what
    was read from outside along the way."""

    def __init__(self, args: argparse.Namespace, agent: AgentProcess, sink: Any,
                 execs: ExecCounter, cgroup: Path) -> None:
        self.args, self.agent, self.sink, self.execs = args, agent, sink, execs
        self.cgroup = cgroup  # the driver's, created for the run
        self.timeline = MemoryTimeline(agent.pid)
        self.ready_s = 0.0
        self.per_process = 1
        self.strace_calls: Counter[str] = Counter()

    def attach(self) -> None:
        # the engine compiles in short-lived child processes: their memory counts against
        # a node's limit as much as the agent's own
        from bench.footprint import PeakSampler

        with PeakSampler(self.agent.pid) as sampler:
            self.ready_s = self.agent.wait_ready()
        self.tree_peak_kb = sampler.tree_peak_kb
        self.tree_peak_pss_kb = sampler.tree_peak_pss_kb
        self.child_peak_kb = sampler.child_peak_kb
        self.children = len(sampler.children_seen)
        self.prog_ids = prog_ids_of(self.agent.pid)
        self.ready = Reading.of(self.agent)
        self.execs_start = self.execs.read()

    def idle(self) -> None:
        self.timeline.mark("idle")
        idle0 = Reading.of(self.agent)
        time.sleep(self.args.churn_idle)
        self.idle_window = (idle0, Reading.of(self.agent))
        self.requests_before = len(self.sink.metrics_requests)
        self.self_before = self_metric_values(self.sink)
        print(f"idle:    the first {self.args.churn_idle:g}s after attach, before the churn: "
              f"agent CPU {cpu_pct(*self.idle_window)[1]:.2f} % of one core (start-up work "
              f"and the first export), RSS {_mb(self.idle_window[1].rss_kb)}; "
              f"load {loadavg()}", flush=True)

    def churn(self) -> None:
        agent, seconds = self.agent, self.args.churn_seconds
        self.timeline.mark("churn")
        self.start = last = progress = Reading.of(agent)
        proc = start_driver(self.args.churn_rate, seconds, self.cgroup)
        mid: Reading | None = None
        try:
            while proc.poll() is None:
                time.sleep(SAMPLE_S)
                if not agent.alive():
                    raise BenchError(f"the agent died during the churn\n{agent.log_tail()}")
                now = Reading.of(agent)
                if mid is None and now.at - self.start.at >= seconds / 2:
                    mid = now
                    self.smaps_mid = smaps_rollup(agent.pid)
                if now.at - progress.at >= PROGRESS_S - 0.05:
                    stat, run = cpu_pct(progress, now)
                    forks = (now.forks - progress.forks) / (now.at - progress.at)
                    print(f"  t={now.at - self.start.at:4.0f}s  RSS {now.rss_kb / 1024:6.1f} MB"
                          f"  VmHWM {now.hwm_kb / 1024:6.1f} MB  CPU {run:5.2f} % (schedstat)"
                          f" {stat:5.2f} % (stat)  machine forks {forks:4.0f}/s  metrics "
                          f"requests {len(self.sink.metrics_requests)}", flush=True)
                    progress = now
                last = now
        finally:
            if proc.poll() is None:
                proc.terminate()
            self.driver = finish_driver(proc, 30)
        self.end = Reading.of(agent)
        if mid is None:  # a churn shorter than one sample
            mid = last
            self.smaps_mid = smaps_rollup(agent.pid)
        self.mid = mid
        self.smaps_end = smaps_rollup(agent.pid)
        self.files_end = smaps_by_file(agent.pid)

    def drain(self) -> None:
        """Two export intervals after the last child exited: the periodic exports have it
        all; then SIGTERM, on which the agent drains and exports once more."""
        self.timeline.mark("drain")
        drain = 2 * EXPORT_INTERVAL_S + 2
        print(f"churn over: {self.driver.spawned} spawned; waiting {drain:g}s (two export "
              "intervals) before SIGTERM", flush=True)
        drain0 = Reading.of(self.agent)
        time.sleep(drain)
        self.drain_window = (drain0, Reading.of(self.agent))
        self.requests_periodic = len(self.sink.metrics_requests)
        ours, others = self.execs.read()
        self.execs_ours = ours - self.execs_start[0]
        self.execs_others = others - self.execs_start[1]
        self.timeline.mark("shutdown")
        self.exit_code = self.agent.stop()
        self.timeline.stop()
        self.log = list(self.agent.log)
        left = wait_programs_gone(self.prog_ids)
        if left:
            raise BenchError(f"BPF programs {sorted(left)} of the agent outlived it")

    def received(self) -> None:
        sink = self.sink
        requests = sink.metrics_requests
        self.exports = exports_of(requests)
        self.exports_periodic = len(exports_of(requests[:self.requests_periodic]))
        self.exports_before = len(exports_of(requests[:self.requests_before]))
        self.self_metrics = self_metric_values(sink)
        self.map_fill = map_fill_peaks(sink)
        self.spans = sum(len(ss.spans) for r in sink.trace_requests
                         for rs in r.resource_spans for ss in rs.scope_spans)
        self.profiles = len(sink.profiles_requests)


def run_suite(args: argparse.Namespace, machine_shown: bool) -> int:
    require("gcc", "taskset")
    bcc = import_bcc()
    build_c(DRIVER_SRC, DRIVER_BIN)
    suite_heading("churn: the agent on its defaults under process churn (bounded on a busy node)",
                  bcc, machine_shown)
    strace_calls, strace_note = syscalls_per_process()
    per_process = strace_calls[SYSCALL]
    if per_process < 1:
        raise BenchError(f"{PROGRAM} made no {SYSCALL} call under strace: {strace_note}")
    print(f"load:    {DRIVER_BIN} {args.churn_rate:g} {args.churn_seconds:g} {PROGRAM}  "
          f"({args.churn_rate:g} {PROGRAM} a second for {args.churn_seconds:g}s, posix_spawn)")
    print(f"truth:   {strace_note}")
    print("method:  RSS/VmHWM from /proc/PID/status, CPU from /proc/PID/stat and the threads' "
          "schedstat, exports as the sink received them; see bench/churn.py")
    started = time.monotonic()
    life = args.churn_idle + args.churn_seconds + 2 * EXPORT_INTERVAL_S + 240
    execs = ExecCounter(bcc)
    with contextlib.ExitStack() as stack:
        stack.callback(execs.close)
        cgroup = stack.enter_context(driver_cgroup())
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="otel-ebpf-bench-"))
        sink = stack.enter_context(otlp_sink())
        # the embedded defaults, but for where to export; a cold compile cache of its own,
        # so that the start-up peak is a first start's, whatever ran before
        config = f"exporter:\n  endpoint: {sink.endpoint}\n  protocol: grpc\n"
        env = {"OTEL_EBPF_CACHE_DIR": str(Path(tmp) / "cache")}
        with AgentProcess(config, Path(tmp), "agent-churn", life, extra_env=env) as agent:
            run = ChurnRun(args, agent, sink, execs, cgroup)
            run.per_process, run.strace_calls = per_process, strace_calls
            try:
                run.attach()
                print(f"agent:   {agent_command_for_report(agent)}  (attached in "
                      f"{run.ready_s:.1f}s)")
                print(f"config:  the embedded defaults; exporter.endpoint {sink.endpoint} "
                      "(the in-process sink); OTEL_EBPF_CACHE_DIR a new directory (a cold "
                      "start: every program compiled)")
                print(flush=True)
                run.idle()
                run.churn()
                run.drain()
            finally:
                run.timeline.stop()
        run.received()
    report(run)
    print(f"took {time.monotonic() - started:.0f}s")
    return 0


# -- the report --------------------------------------------------------------------------


def _mb(kb: float) -> str:
    return f"{kb / 1024:.1f} MB"


def report(run: ChurnRun) -> None:
    args = run.args
    d = run.driver
    print()
    if run.exit_code != 0:
        print(f"warning: the agent exited with {run.exit_code}")
    errors = [line for line in run.log if " ERROR " in line or "Traceback" in line]
    warnings = [line for line in run.log if " WARNING " in line]
    if errors or warnings:
        print(f"agent log: {len(errors)} error(s), {len(warnings)} warning(s); first ones:")
        for line in (errors + warnings)[:6]:
            print(f"  {line[:200]}")
    print(f"driver:  {d.spawned} spawned, {d.exited_ok} exited 0, {d.failed} failed, in "
          f"{d.elapsed_s:.1f}s ({d.spawned / d.elapsed_s:.1f}/s); at most {d.max_lag_ms:.1f} "
          f"ms behind schedule; its CPU {d.self_cpu_s:.2f}s, its children's "
          f"{d.children_cpu_s:.2f}s (neither counted as the agent's)")
    wall = run.end.at - run.start.at
    forks = run.end.forks - run.start.forks
    print(f"machine: {forks} processes started during the churn ({forks / wall:.0f}/s, ours "
          f"{d.spawned / wall:.0f}/s); load {loadavg()} at the end")

    half = (run.mid.at - run.start.at)
    growth = (run.end.rss_kb - run.mid.rss_kb) / run.mid.rss_kb * 100
    stat_pct, run_pct = cpu_pct(run.start, run.end)
    _, idle_run = cpu_pct(*run.idle_window)
    _, drain_run = cpu_pct(*run.drain_window)
    drain_s = run.drain_window[1].at - run.drain_window[0].at
    cpu = max(stat_pct, run_pct)
    peak_kb, peak_t, peak_phase = run.timeline.peak()
    peak_kb = max(peak_kb, run.end.hwm_kb)
    # the larger: what a memory limit meets (PSS: LLVM's code shared by two compilers once)
    peak = max(peak_kb, run.tree_peak_pss_kb)
    exports = run.exports
    churn_exports = exports[run.exports_before:]
    max_request = max((n for e in exports for n in e.requests), default=0)
    max_export = max((e.points for e in exports), default=0)
    all_series = set().union(*(e.series.keys() for e in exports)) if exports else set()
    # series whose value no delta changed over the last QUIET_EXPORTS periodic exports:
    # kept (and exported) however long their workload has been quiet or gone
    quiet = None
    if run.exports_periodic > QUIET_EXPORTS:
        now, then = exports[run.exports_periodic - 1], exports[run.exports_periodic - 1
                                                               - QUIET_EXPORTS]
        quiet = sum(1 for key, value in now.values.items()
                    if now.series[key] == 1 and then.series.get(key) == 1
                    and then.values.get(key) == value)
    final = exports[-1] if exports else None
    periodic = exports[run.exports_periodic - 1] if run.exports_periodic else None
    # the driver's cgroup is new: its series start at zero and hold its children alone
    ours = cgroup_path(run.cgroup)
    expected = d.spawned * run.per_process
    exported = final.syscall_count(ours) if final else 0
    periodic_count = periodic.syscall_count(ours) if periodic else 0
    everyone = final.syscall_count() if final else 0

    rows = [
        ("RSS when the probes had attached", _mb(run.ready.rss_kb), ""),
        (f"RSS after {half:.0f}s of churn", _mb(run.mid.rss_kb), ""),
        (f"RSS at the end ({wall:.0f}s)", _mb(run.end.rss_kb), ""),
        (f"RSS growth over the second {wall - half:.0f}s", f"{growth:+.2f} %",
         f"<= {RSS_GROWTH_TARGET:g} %"),
        ("peak RSS, the agent (VmHWM, launch to exit)", _mb(peak_kb),
         f"<= {PEAK_RSS_TARGET_MB:g} MB"),
        (f"  reached {peak_t:.1f}s after launch, in", peak_phase, ""),
        ("  VmHWM when the probes had attached", _mb(run.ready.hwm_kb), ""),
        (f"peak PSS, agent + {run.children} compiler process(es)",
         _mb(run.tree_peak_pss_kb), f"<= {PEAK_RSS_TARGET_MB:g} MB"),
        ("  their RSS sum (shared pages once per process)", _mb(run.tree_peak_kb), ""),
        ("  a compiler's own VmHWM, the largest", _mb(run.child_peak_kb), ""),
        ("agent CPU over the churn, utime+stime", f"{stat_pct:.2f} %", f"<= {CPU_TARGET:g} %"),
        ("  the same, threads' schedstat", f"{run_pct:.2f} %", ""),
        (f"  first {args.churn_idle:g}s after attach (schedstat)", f"{idle_run:.2f} %", ""),
        (f"  {drain_s:.0f}s after the churn (schedstat)", f"{drain_run:.2f} %", ""),
        ("most data points in one export request", str(max_request), ""),
        ("most data points in one export", str(max_export), f"<= {POINTS_TARGET}"),
        ("export requests / exports", f"{sum(len(e.requests) for e in exports)} / "
                                      f"{len(exports)}", ""),
        ("metric series in the final export", str(final.points if final else 0), ""),
        ("  of them sharing an identity with another", str(final.duplicated if final else 0),
         ""),
        ("metric series (distinct identities) over the run", str(len(all_series)), ""),
        (f"  unchanged for {QUIET_EXPORTS * EXPORT_INTERVAL_S:.0f}s, still exported",
         str(quiet) if quiet is not None else "-", ""),
        (f"{SYSCALL} of {EXE_NAME!r} in the driver's cgroup", str(exported), f"== {expected}"),
        ("  the same, last export before SIGTERM", str(periodic_count), ""),
        (f"  every {EXE_NAME!r} series of the machine", str(everyone), ""),
    ]
    print()
    print(f"{'':<48}{'value':>14}  {'target':<12}")
    print("-" * 76)
    for label, value, target in rows:
        print(f"{label:<48}{value:>14}  {target:<12}")
    if final is not None and final.duplicated:
        twins = [key for key, n in final.series.items() if n > 1]
        example = twins[0]
        print(f"({final.duplicated} points of the final export share their resource, metric "
              f"and attributes with another point: workloads the export does not tell apart, "
              f"e.g. {example[1]} "
              + ", ".join(f"{k}={v}" for k, v in example[2])
              + f" x{final.series[example]})")
    tids = sum(1 for _, name, _ in final.exact.values() if name == SYSCALL) if final else 0
    print(f"(the driver's cgroup {ours}: {d.spawned} spawned x {run.per_process} call(s) "
          f"each = {expected}; the exec tracepoints saw {run.execs_ours} {EXE_NAME!r} of the "
          f"driver's and {run.execs_others} of others' from attach to SIGTERM; "
          f"{tids} {EXE_NAME!r} {SYSCALL} point(s) in the final export)")
    if final is not None and len(run.strace_calls) > 1:
        got = final.syscalls(ours)
        # an execve counts in the series of the image that made it (the driver's child
        # before it became "true"), not of the image it started
        made = {name: n * d.spawned for name, n in run.strace_calls.items()
                if name not in ("execve", "execveat")}
        off = {name: got[name] - made.get(name, 0) for name in set(got) | set(made)
               if got[name] != made.get(name, 0)}
        print(f"(every syscall of the driver's {EXE_NAME!r}, strace's counts x {d.spawned}: "
              f"{len(made) - len(off.keys() & made.keys())} of {len(made)} kinds exact"
              + ("; off: " + ", ".join(f"{name} {n:+d}" for name, n in sorted(off.items()))
                 if off else "") + ")")
    if run.execs_ours != d.spawned:
        print(f"warning: the exec tracepoints saw {run.execs_ours} {EXE_NAME!r} of the "
              f"driver, which reported {d.spawned}: the ground truth is in doubt")

    print()
    print("smaps_rollup (kB)   " + "  ".join(f"{k} {run.smaps_mid.get(k, 0)}->"
                                              f"{run.smaps_end.get(k, 0)}"
                                              for k in ("Rss", "Anonymous", "Pss_File")))
    print("highest VmRSS per phase: " + ", ".join(
        f"{name} (from {at:.0f}s) {_mb(rss)}" for name, at, rss in run.timeline.per_phase()))
    print("largest mappings at the end (Rss): " + ", ".join(
        f"{Path(name).name or name} {kb / 1024:.1f} MB"
        for name, kb in run.files_end.most_common(6)))
    busiest = sorted(((t1 - run.start.threads.get(tid, ("", 0.0))[1], tid, comm)
                      for tid, (comm, t1) in run.end.threads.items()), reverse=True)
    print(f"busiest agent threads over the churn (of {len(run.end.threads)}): " + ", ".join(
        f"{tid} {comm} {s / wall * 100:.2f} %" for s, tid, comm in busiest[:5]))
    if final is not None:
        by_metric: Counter[str] = Counter()
        for key, n in final.series.items():
            by_metric[key[1]] += n
        print("series in the final export by metric: " + ", ".join(
            f"{name} {n}" for name, n in by_metric.most_common()))
    if churn_exports:
        print("points per export during the churn: " + " ".join(
            str(e.points) for e in churn_exports[:16]) + (" ..." if len(churn_exports) > 16
                                                           else ""))

    lost = run.self_metrics.get("otel_ebpf.probe.lost_events", {})
    lost_before = run.self_before.get("otel_ebpf.probe.lost_events", {})
    print()
    print("lost events (otel_ebpf.probe.lost_events, latest; during the churn in brackets): "
          + (", ".join(f"{k} {v:.0f} ({v - lost_before.get(k, 0):.0f})"
                       for k, v in sorted(lost.items())) or "none"))
    others = {name: values for name, values in run.self_metrics.items()
              if name != "otel_ebpf.probe.lost_events"}
    print("other drop/split/overflow self-metrics: " + ("; ".join(
        f"{name} " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(values.items()))
        for name, values in sorted(others.items())) or "none"))
    if run.map_fill:
        print(f"kernel map fill ({MAP_FILL}), the highest over the run: " + ", ".join(
            f"{k} {v:g}" for k, v in sorted(run.map_fill.items())))
    print(f"also received: {run.spans} spans, {run.profiles} profile requests")

    print()
    targets = [
        (f"RSS growth over the second half <= {RSS_GROWTH_TARGET:g} %", growth
         <= RSS_GROWTH_TARGET, f"{growth:+.2f} %, {_mb(run.mid.rss_kb)} -> "
                               f"{_mb(run.end.rss_kb)}"),
        (f"peak RSS <= {PEAK_RSS_TARGET_MB:g} MB", peak / 1024 <= PEAK_RSS_TARGET_MB,
         f"{_mb(peak)}: the agent {_mb(peak_kb)} (in {peak_phase}), with its compilers "
         f"{_mb(run.tree_peak_pss_kb)} PSS"),
        (f"CPU <= {CPU_TARGET:g} % of one core", cpu <= CPU_TARGET,
         f"{cpu:.2f} %, the larger of stat and schedstat"),
        (f"<= {POINTS_TARGET} points per export", max_export <= POINTS_TARGET,
         f"{max_export} in the largest export, {max_request} in the largest request"),
        ("counts exact", exported == expected and final is not None,
         f"{exported} {SYSCALL} exported, {expected} made"),
    ]
    for what, passed, detail in targets:
        print(f"target: {what:<40} {verdict(passed, detail)}")
    print(f"({fmt(run.ready_s, '.1f')}s from launch to attached; nothing pinned: the agent, "
          "the driver and the sink share the machine's CPUs)")


if __name__ == "__main__":  # pragma: no cover - run through bench/run.py
    raise SystemExit("run it as: .venv/bin/python bench/run.py --suite churn")
