"""`make bench` redis suite: what the agent costs a real server, in requests per second.

    .venv/bin/python bench/run.py --suite redis [--rounds N] [--requests N] [--clients N]
                                                [--modes nothing,empty,agent] [--redis-perf]

The yardstick of DESIGN.md's "Per-call cost": Debian's redis-server on loopback, driven by
redis-benchmark, with nothing attached, with the least any syscall observer can cost, and
with the agent.

Method
------
One private redis-server for the whole run (a free loopback port, its own directory, no
persistence: --save '' --appendonly no, no config file), pinned to one CPU; redis-benchmark
pinned to another, `-t set,get -c CLIENTS -n REQUESTS --csv` (SET then GET, 3-byte values,
one key). A short warm-up run first fills the key and the caches and times the machine,
which gives the run-time estimate printed before the rounds. Modes:

  nothing            nothing attached by us (a collector peer idles beside, as in every mode)
  empty floor        bench/empty_tracepoints.bpf.c: two raw tracepoint programs that return 0
                     on raw_syscalls sys_enter/sys_exit, loaded in this process through the
                     project's Engine/Program. Every syscall of every task then takes the
                     traced slow path and runs a BPF program twice: the least that observing
                     every syscall can cost.
  agent defaults     the real agent process, `otel-ebpf run` with the embedded defaults (every
                     probe, the summary on stdout) except the exporter endpoint: OTLP/gRPC to
                     rotel-agent (a real collector, tests/peers/rotel.py) on loopback, which
                     forwards to the OTLP sink in this process (tests/peers/otlp_sink.py).
                     Profiles are answered UNIMPLEMENTED by rotel, which the agent handles as
                     in production.
  syscall_latency,   the same agent with only that probe enabled (the others `enabled: false`
  cpu_profile,       in its config file): what each probe costs alone.
  tcp_retransmit

Each agent is started afresh for its measurement, and the benchmark starts only once the
agent logged that its probes are attached, plus AGENT_SETTLE s for its start-up work (first
drains, symbolization of what it sees). The empty programs are compiled, attached and
detached per measurement too.

Noise control (as bench/run.py's syscalls suite):
  * Alternation: every round measures every mode once, the order rotated each round, so a
    drift of the machine spreads over all modes. Medians over rounds (--rounds, >= 5 for
    the headline); min..max shows how far the rounds disagreed. "paired" is the median over
    rounds of the mode's rate divided by the same round's "nothing": less sensitive to slow
    drift than the ratio of medians.
  * Pinning: server and client on one CPU each. On a 2-CPU machine that is every CPU, so
    the agent's user-space threads (drains, export), rotel and this script share them with
    the server and the client, as they would on a busy 2-CPU node: the agent's rows include
    its user-space CPU as well as its in-kernel cost per syscall. The server's run-queue
    wait (schedstat) shows how much CPU others took from it.
  * Foreign hooks: anything else on the syscall or socket hooks (another session's tests
    loading the agent, a tracer) slows every mode it overlaps, "nothing" included. With
    bpftool the script looks before and after each benchmark, waits for them to go (a
    budget of a minute per run), measures again once, and marks with "!" a sample it could
    not get clean.
  * Other sessions' CPU: before each benchmark the script waits (a budget of
    QUIET_WAIT_BUDGET s per run) until the rest of the machine uses at most QUIET_OTHERS
    CPU; during it, /proc/stat's busy time minus the server's, the client's and the agent's
    is what every other task used ("others", in CPUs). A sample with no foreign hook and
    others <= QUIET_OTHERS is "quiet"; others are marked "~". With >= 3 quiet samples per
    mode the tables and the headline are printed again over those alone.
  * CPU per request (server, client, agent) is printed beside requests/s: the cost ratio
    it gives is what a CPU-bound machine would lose, and is moved less by CPU that other
    sessions take than requests/s is (though a contended server batches more requests per
    loop, so it moves too).

The target (the issue "A fifth of a busy server's throughput"): the agent's loss (1 - its
ratio) <= LOSS_FACTOR x the empty floor's loss measured in the same run, or the agent's
ratio >= RATIO_TARGET; judged per operation.

Breakdowns: the server's CPU per request from /proc/PID/stat (user, system) always;
with --redis-perf, one more (untimed) benchmark per mode under `perf record -e cpu-clock
-p SERVER` (the server's own time on a CPU, its syscalls' BPF programs included), its samples
split into BPF programs, BPF helpers and maps, tracepoint and syscall-tracing dispatch, the
rest of the kernel and user space, in us per request. A software clock, so it works where
the VM exposes no hardware counters (`perf stat -e instructions` tells; printed), at the
price of sampling: the interrupt lands where interrupts are enabled, so a short BPF program
is under-sampled and its cost partly shows in the code after it.

It needs root, taskset, redis-server, redis-benchmark (make host-bench installs them) and
the rotel wheel (make test-deps). It exits 0 whatever the numbers (a measurement, not a
test) and nonzero only when it could not measure.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from otel_ebpf.kernel.engine import Engine

if __name__ == "__main__":
    # run as a script: bench/ must not shadow the standard library's profile module (see
    # bench/run.py), and bench.* / tests.* are imported from the repository
    _BENCH = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
    sys.path.insert(0, str(_BENCH.parent))

from bench.common import (
    BENCH_DIR,
    CLK_TCK,
    FOREIGN_RETRIES,
    REPO_DIR,
    SYSCALL_HOOKS,
    AgentProcess,
    BareTracepoints,
    BenchError,
    HookWatch,
    _children,
    fmt,
    heading,
    import_bcc,
    machine_lines,
    otlp_sink,
    require,
    run_standalone,
)

if str(REPO_DIR) not in sys.path:
    sys.path.insert(0, str(REPO_DIR))

EMPTY_SRC = BENCH_DIR / "empty_tracepoints.bpf.c"
LOOPBACK = "127.0.0.1"
OPS = ("SET", "GET")  # the order redis-benchmark runs them in
PROBES = ("syscall_latency", "cpu_profile", "tcp_retransmit")
MODES = ("nothing", "empty", "agent", *PROBES)
LABELS = {"nothing": "nothing", "empty": "empty floor", "agent": "agent defaults",
          **{p: f"only {p}" for p in PROBES}}
ALIASES = {"floor": "empty", "defaults": "agent", "probes": ",".join(PROBES),
           "all": ",".join(MODES)}
# The hooks a loopback server's traffic crosses: a foreign program on any of them slows it.
WATCHED_HOOKS = (*SYSCALL_HOOKS, "sock_send_length", "sock_recv_length", "inet_sock_set_state")

LOSS_FACTOR = 1.5  # agent loss <= 1.5 x the empty floor's loss ...
RATIO_TARGET = 0.95  # ... or agent ratio >= 0.95
WARMUP_REQUESTS = 50_000
EMPTY_SETTLE = 0.3  # s after attaching the empty programs
AGENT_SETTLE = 2.0  # s after the agent logged its probes attached
AGENT_OVERHEAD_GUESS = 9.0  # s per agent measurement outside the benchmark (start, stop)
EMPTY_OVERHEAD_GUESS = 1.5  # s to compile and attach the empty programs
SERVER_START_TIMEOUT = 10.0
MIN_RPS = 500  # for timeouts: no benchmark is allowed to run slower than this
# A benchmark is "quiet" when, besides no foreign hooks, other tasks (other sessions' work,
# kernel threads) used at most this much CPU during it, in CPUs (0.1 = 10 % of one CPU).
QUIET_OTHERS = 0.10
QUIET_WAIT_BUDGET = 90.0  # s per run spent waiting for a quiet machine before benchmarks
QUIET_WINDOW = 0.5  # s over which the machine's load is sampled before a benchmark
# A verdict is inconclusive when nothing's samples spread over more than this (max - min
# over the median): twice the 5 % that the ratio target is about.
NOISE_LIMIT = 0.10
PERF_FREQ = 997  # Hz, cpu-clock samples for --redis-perf (prime: no lockstep with timers)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The redis suite's flags (its rounds are run.py's --rounds, shared with syscalls)."""
    parser.add_argument("--redis-requests", "--requests", dest="redis_requests", type=int,
                        default=300_000,
                        help="redis: requests per operation (SET, GET) per benchmark "
                             "(default: %(default)s)")
    parser.add_argument("--redis-clients", "--clients", dest="redis_clients", type=int,
                        default=50,
                        help="redis: redis-benchmark's parallel connections "
                             "(default: %(default)s)")
    parser.add_argument("--redis-modes", "--modes", dest="redis_modes", default="all",
                        help="redis: modes to alternate, comma-separated, from "
                             f"{','.join(MODES)} (aliases: floor=empty, defaults=agent, "
                             "probes=the three probes alone, all); nothing is always "
                             "measured (default: %(default)s)")
    parser.add_argument("--redis-perf", action="store_true",
                        help="redis: after the rounds, one more benchmark per mode under "
                             "`perf record -e cpu-clock -p SERVER`: where the server's time "
                             "went (BPF programs, helpers, tracing dispatch, ...)")


def modes_of(text: str) -> list[str]:
    """The modes named in --modes, in MODES order, with nothing first; ValueError if unknown."""
    names: set[str] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        for name in ALIASES.get(part, part).split(","):
            if name not in MODES:
                raise ValueError(f"unknown mode {name!r}; known: {', '.join(MODES)} "
                                 f"and {', '.join(ALIASES)}")
            names.add(name)
    names.add("nothing")  # every ratio is against it
    return [m for m in MODES if m in names]


def check_arguments(args: argparse.Namespace) -> str | None:
    try:
        modes_of(args.redis_modes)
    except ValueError as exc:
        return f"--modes: {exc}"
    if args.redis_requests < 1000 or not 1 <= args.redis_clients <= 10_000:
        return "--requests must be >= 1000 and --clients between 1 and 10000"
    return None


# -- the server --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def ping(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@dataclass(frozen=True)
class ServerCpu:
    user_s: float  # utime of the whole process (ticks)
    sys_s: float  # stime
    run_s: float  # the main thread's time on a CPU (schedstat, ns)
    wait_s: float  # ... and runnable but waiting for its CPU: what others took from it

    def __sub__(self, other: ServerCpu) -> ServerCpu:
        return ServerCpu(self.user_s - other.user_s, self.sys_s - other.sys_s,
                         self.run_s - other.run_s, self.wait_s - other.wait_s)


class RedisServer:
    """A private redis-server: loopback only, no persistence, its own directory, pinned."""

    def __init__(self, cpu: int, workdir: Path) -> None:
        self.cpu = cpu
        self.dir = workdir / "redis"
        self.dir.mkdir()
        self.log = self.dir / "redis.log"
        self.port = 0
        self.command: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, attempts: int = 3) -> None:
        for _ in range(attempts):
            self.port = free_port()  # may be raced: then it exits and we try another
            self.command = [
                "taskset", "-c", str(self.cpu), "redis-server", "--port", str(self.port),
                "--bind", LOOPBACK, "--protected-mode", "yes", "--save", "",
                "--appendonly", "no", "--dir", str(self.dir), "--daemonize", "no",
                "--logfile", str(self.log),
            ]
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)
            deadline = time.monotonic() + SERVER_START_TIMEOUT
            while time.monotonic() < deadline and self.proc.poll() is None:
                if ping(self.port):
                    return
                time.sleep(0.05)
            self.stop()
        raise BenchError(f"redis-server did not start: {shlex.join(self.command)}\n"
                         + self.log_tail())

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid  # taskset execs redis-server: the same process

    def log_tail(self, lines: int = 10) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def cpu_now(self) -> ServerCpu:
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
            run_ns, wait_ns, _ = Path(f"/proc/{self.pid}/schedstat").read_text().split()
        except (OSError, ValueError) as exc:
            raise BenchError("redis-server exited during the run\n" + self.log_tail()) from exc
        fields = stat[stat.rindex(")") + 2:].split()
        return ServerCpu(int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK,
                         int(run_ns) / 1e9, int(wait_ns) / 1e9)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and ping(self.port)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def redis_version() -> str:
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True,
                         check=False).stdout
    return next((w.removeprefix("v=") for w in out.split() if w.startswith("v=")), "?")


def machine_busy_s() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, from /proc/stat: busy is user,
    nice, system, irq and softirq time; steal is what the hypervisor gave others."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK


class QuietGate:
    """Waits, out of a budget for the whole run, until the machine is quiet: in a window of
    QUIET_WINDOW s the CPU used by anyone but the mode's own process (an agent settling)
    stays within QUIET_OTHERS. Nothing of ours runs then, so all of it is someone else."""

    def __init__(self) -> None:
        self.budget = QUIET_WAIT_BUDGET

    def wait(self, mode_cpu: Callable[[], float]) -> None:
        announced = False
        while True:
            busy0, _ = machine_busy_s()
            own0 = mode_cpu()
            time.sleep(QUIET_WINDOW)
            busy1, _ = machine_busy_s()
            others = (busy1 - busy0 - (mode_cpu() - own0)) / QUIET_WINDOW
            if others <= QUIET_OTHERS or self.budget <= 0:
                return
            if not announced:
                print(f"  waiting (up to {self.budget:.0f}s more) for a quiet machine: others "
                      f"use {others:.2f} CPU", flush=True)
                announced = True
            self.budget -= QUIET_WINDOW


# -- the client --------------------------------------------------------------------------


def benchmark_command(cpu: int, port: int, clients: int, requests: int) -> list[str]:
    return ["taskset", "-c", str(cpu), "redis-benchmark", "-h", LOOPBACK, "-p", str(port),
            "-c", str(clients), "-n", str(requests), "-t", ",".join(OPS).lower(), "--csv"]


def parse_csv(text: str) -> dict[str, float]:
    """redis-benchmark --csv: a header row ("test","rps",...) then one row per test."""
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or rows[0][:2] != ["test", "rps"]:
        raise ValueError("no header row")
    return {row[0]: float(row[1]) for row in rows[1:] if len(row) >= 2}


def run_benchmark(cmd: Sequence[str], requests: int) -> tuple[dict[str, float], float]:
    """Requests/s per operation, and the client's CPU seconds (user + system, from the
    rusage wait4 returns: precise, unlike ticks)."""
    timeout = 60 + len(OPS) * requests / MIN_RPS
    with tempfile.TemporaryFile() as err_file:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=err_file)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            assert proc.stdout is not None
            out = proc.stdout.read().decode(errors="replace")
            proc.stdout.close()
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # interrupted: leave no client behind
            proc.kill()
            proc.wait()
            raise
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        err_file.seek(0)
        err = err_file.read().decode(errors="replace")
    if proc.returncode == -signal.SIGKILL:
        raise BenchError(f"redis-benchmark took over {timeout:.0f}s: {shlex.join(cmd)}")
    try:
        rps = parse_csv(out)
    except ValueError:
        rps = {}
    if proc.returncode != 0 or set(rps) != set(OPS):
        raise BenchError(f"redis-benchmark failed ({proc.returncode}): {shlex.join(cmd)}\n"
                         f"stdout: {out[-500:]!r}\nstderr: {err[-500:]}")
    return rps, usage.ru_utime + usage.ru_stime


# -- modes -------------------------------------------------------------------------------


class Mode(Protocol):
    key: str
    label: str
    note: str  # what the last attachment reported, for the progress line

    def attached(self) -> contextlib.AbstractContextManager[None]: ...

    def cpu_seconds(self) -> float:
        """CPU time of the mode's own user-space process so far (0: it has none)."""
        ...


class Nothing:
    key = "nothing"
    label = LABELS["nothing"]
    note = ""

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        yield

    def cpu_seconds(self) -> float:
        return 0.0


class EmptyFloor:
    key = "empty"
    label = LABELS["empty"]
    note = ""

    def cpu_seconds(self) -> float:
        return 0.0  # no user-space part: the programs only run in the observed tasks

    def __init__(self, engine: Engine) -> None:
        self._floor = BareTracepoints(engine, "empty", self.label, EMPTY_SRC)

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        with self._floor.attached():
            time.sleep(EMPTY_SETTLE)
            yield


def agent_config_text(endpoint: str, only: str | None) -> str:
    """The embedded defaults, but for the exporter's endpoint and, with `only`, every
    other probe disabled. Nothing else is written, so a default the product changes is the
    default measured."""
    import yaml

    config: dict[str, Any] = {"exporter": {"endpoint": endpoint, "protocol": "grpc"}}
    if only is not None:
        config["probes"] = {p: {"enabled": False} for p in PROBES if p != only}
    return yaml.safe_dump(config, sort_keys=False)


SERVER_EXECUTABLES = ("redis-server", "redis-check-rdb")


def server_syscalls_exported(sink: Any, pid: int) -> int:
    """Syscalls of the server's process in linux.syscall.duration as the sink holds it: the
    latest cumulative count of each series, summed (the sink is cleared before each agent).
    Matched by process.pid with aggregation: process; by default (per workload) by the
    executable: Debian's redis-server is a symlink to redis-check-rdb, the executable name
    the agent reports, and the server is the only process running it."""
    latest: dict[tuple[Any, ...], int] = {}
    for resource, point in sink.metrics_points("linux.syscall.duration"):
        exe = next((kv.value.string_value for kv in point.attributes
                    if kv.key == "process.executable.name"), None)
        if resource.get("process.pid") != pid and exe not in SERVER_EXECUTABLES:
            continue
        key = (tuple(sorted(resource.items())), tuple(sorted(
            (kv.key, str(kv.value)) for kv in point.attributes)), point.start_time_unix_nano)
        latest[key] = max(latest.get(key, 0), int(point.count))
    return sum(latest.values())


class Agent:
    """The real agent as a process, started afresh for each measurement."""

    def __init__(self, key: str, workdir: Path, endpoint: str, sink: Any, server_pid: int,
                 max_seconds: float) -> None:
        self.key = key
        self.server_pid = server_pid
        self.label = LABELS[key]
        self.only = None if key == "agent" else key
        self.workdir, self.endpoint, self.sink = workdir, endpoint, sink
        self.max_seconds = max_seconds
        self.note = ""
        self.command = ""
        self.ready_s: list[float] = []
        self.syscalls: list[int] = []
        self.errors: list[str] = []
        self._process: AgentProcess | None = None

    def cpu_seconds(self) -> float:
        assert self._process is not None, "only while attached"
        return self._process.cpu_seconds()  # its threads' schedstat run time

    def _final_count(self, timeout: float = 10.0) -> int:
        """The server's syscalls once the agent's final flush went through rotel: the sink
        may still hold only a periodic export from mid-benchmark when the agent exits, so
        wait until the count is non-zero and has not changed for two seconds."""
        deadline = time.monotonic() + timeout
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            count = server_syscalls_exported(self.sink, self.server_pid)
            if count != last:
                last, since = count, time.monotonic()
            elif count > 0 and time.monotonic() - since >= 2.0:
                break
            time.sleep(0.2)
        return last

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        self.sink.clear()
        config = agent_config_text(self.endpoint, self.only)
        with AgentProcess(config, self.workdir, f"agent-{self.key}", self.max_seconds) as agent:
            self.command = shlex.join(agent.command[3:])
            ready = agent.wait_ready()
            self.ready_s.append(ready)
            time.sleep(AGENT_SETTLE)
            self._process = agent
            try:
                yield
            finally:
                self._process = None
            if not agent.alive():
                raise BenchError(f"the agent ({self.label}) died during the benchmark\n"
                                 + agent.log_tail())
            code = agent.stop()
            if code != 0:
                raise BenchError(f"the agent ({self.label}) exited with {code}\n"
                                 + agent.log_tail())
            self.errors.extend(agent.errors())
        self.note = f"attached in {ready:.1f}s"
        if self.only in (None, "syscall_latency"):
            seen = self._final_count()
            self.syscalls.append(seen)
            self.note += f"; it counted {seen:,} redis-server syscalls"


# -- measuring ---------------------------------------------------------------------------


@dataclass
class Sample:
    round: int
    rps: dict[str, float]
    cpu: ServerCpu
    client_s: float  # redis-benchmark's CPU
    agent_s: float  # the agent's CPU over the benchmark (0 without one)
    seconds: float
    others: float  # CPU used by every other task during the benchmark, in CPUs
    steal: float  # CPU the hypervisor took, in CPUs
    foreign: list[str] = field(default_factory=list)

    @property
    def quiet(self) -> bool:
        return not self.foreign and self.others <= QUIET_OTHERS

    @property
    def mark(self) -> str:
        return "!" if self.foreign else "" if self.quiet else "~"


def measure(mode: Mode, server: RedisServer, watch: HookWatch, gate: QuietGate,
            cmd: Sequence[str], requests: int, round_: int) -> Sample:
    """One benchmark under `mode`; measured again (same attachment) once if foreign hooks
    overlapped it and the run's budget for waiting them out is not spent: a benchmark here
    is 10-20 s, and on a shared machine other sessions' tests come and go all the time, so
    more retries would mostly lengthen the run."""
    with mode.attached():
        for _ in range(1 + min(FOREIGN_RETRIES, 1)):
            foreign = watch.wait_clean()
            gate.wait(mode.cpu_seconds)
            before, agent_before = server.cpu_now(), mode.cpu_seconds()
            (busy_before, steal_before), began = machine_busy_s(), time.monotonic()
            rps, client_s = run_benchmark(cmd, requests)
            seconds = time.monotonic() - began
            busy, steal = machine_busy_s()
            cpu, agent_s = server.cpu_now() - before, mode.cpu_seconds() - agent_before
            # the rest of the machine's busy time: other sessions, kernel threads, rotel
            # and this script (both idle while the benchmark runs)
            others = busy - busy_before - (cpu.user_s + cpu.sys_s + client_s + agent_s)
            sample = Sample(round_, rps, cpu, client_s, agent_s, seconds,
                            max(0.0, others) / seconds, (steal - steal_before) / seconds)
            # checked while still attached: our own programs must not count as foreign
            sample.foreign = sorted(set(foreign) | set(watch.foreign()))
            if not sample.foreign or watch.wait_budget <= 0:
                break  # clean, or no budget left to wait for them: measuring again won't help
            print(f"  {mode.key}: the benchmark overlapped {', '.join(sample.foreign)}; "
                  "measuring again", flush=True)
    return sample


def estimate_seconds(modes: Sequence[str], rounds: int, requests: int,
                     warm: dict[str, float], perf: bool) -> float:
    """Seconds for the rounds (and the perf passes: one more round), from the warm-up's
    rates and guesses of the time to attach and detach."""
    bench = sum(requests / warm[op] for op in OPS)
    overhead = sum(AGENT_OVERHEAD_GUESS if m not in ("nothing", "empty")
                   else EMPTY_OVERHEAD_GUESS if m == "empty" else 0.0 for m in modes)
    return (rounds + perf) * (len(modes) * bench + overhead)


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f}s"


# -- perf --------------------------------------------------------------------------------


def perf_counters() -> str:
    """What `perf stat -e instructions true` says: whether the VM exposes counters."""
    if shutil.which("perf") is None:
        return "perf not installed"
    result = subprocess.run(["perf", "stat", "-x", ",", "-e", "instructions", "true"],
                            capture_output=True, text=True, check=False)
    for line in result.stderr.splitlines():
        if line.endswith((",instructions", ",instructions:u")) or ",instructions," in line:
            value = line.split(",", 1)[0]
            return ("hardware counters supported" if value.strip().isdigit()
                    else f"no hardware counters ({value.strip()}): cpu-clock sampling only")
    return f"perf stat failed: {(result.stderr or result.stdout).strip()[:120]}"


PERF_GROUPS = ("BPF programs", "BPF helpers+maps", "tracing dispatch", "other kernel", "user")
# Symbol prefixes. rcu_read_lock/unlock and migrate_disable/enable, which the dispatch
# calls, stay in "other kernel": the networking path calls them too.
_DISPATCH = ("bpf_trace_run", "__bpf_trace_", "__traceiter_", "syscall_trace_enter",
             "syscall_exit_work", "trace_sys_", "perf_syscall_")
_HELPERS = ("bpf_", "__bpf_", "htab_", "__htab_", "ktime_get_mono_fast", "bpf_task_storage",
            "bpf_local_storage", "array_map_", "percpu_array_", "ringbuf_", "__ringbuf_",
            "lookup_elem_raw", "__task_storage")
# kernel functions named bpf_* that are not BPF at work: LSM and socket-ops hook stubs
_NOT_HELPERS = ("bpf_lsm_", "bpf_skops_", "bpf_sk_", "bpf_sock_")


def perf_group(symbol: str, kernel: bool) -> str:
    if not kernel:
        return "user"
    if symbol.startswith("bpf_prog_"):
        return "BPF programs"
    if symbol.startswith(_DISPATCH):
        return "tracing dispatch"
    if symbol.startswith(_HELPERS) and not symbol.startswith(_NOT_HELPERS):
        return "BPF helpers+maps"
    return "other kernel"


@dataclass
class PerfBreakdown:
    samples: int
    share: dict[str, float]  # group -> fraction of the CPU's samples
    top_bpf: list[tuple[str, float]]  # the heaviest BPF-related symbols
    foreign: list[str] = field(default_factory=list)  # others' hooks during the pass


def perf_report(data: Path) -> PerfBreakdown:
    result = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--sort", "sym",
                             "--no-children", "-q", "-F", "overhead,sample,sym"],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BenchError(f"perf report failed: {result.stderr.strip()[:300]}")
    share = dict.fromkeys(PERF_GROUPS, 0.0)
    bpf: list[tuple[str, float]] = []
    samples = 0
    for line in result.stdout.splitlines():
        parts = line.split()
        # "  12.34%   1234  [k] symbol"
        if len(parts) < 4 or not parts[0].endswith("%") or parts[2] not in ("[k]", "[.]"):
            continue
        pct = float(parts[0].rstrip("%")) / 100
        samples += int(parts[1])
        symbol = parts[3]
        group = perf_group(symbol, parts[2] == "[k]")
        share[group] += pct
        if group in ("BPF programs", "BPF helpers+maps", "tracing dispatch"):
            bpf.append((symbol, pct))
    bpf.sort(key=lambda item: -item[1])
    return PerfBreakdown(samples, share, bpf[:6])


def perf_pass(mode: Mode, server: RedisServer, watch: HookWatch, cmd: Sequence[str],
              requests: int, workdir: Path) -> PerfBreakdown:
    data = workdir / f"perf-{mode.key}.data"
    with mode.attached():
        foreign = watch.wait_clean()
        perf = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F",
                                 str(PERF_FREQ), "-p", str(server.pid), "-o", str(data)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            time.sleep(0.5)  # perf opens its events
            run_benchmark(cmd, requests)
            foreign = sorted(set(foreign) | set(watch.foreign()))
        finally:
            perf.send_signal(signal.SIGINT)
            try:
                _, err = perf.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                perf.kill()
                _, err = perf.communicate()
    if not data.exists():
        raise BenchError(f"perf record wrote nothing: {err.decode(errors='replace')[:300]}")
    try:
        breakdown = perf_report(data)
    finally:
        data.unlink(missing_ok=True)
    breakdown.foreign = foreign
    return breakdown


# -- the report --------------------------------------------------------------------------


@dataclass
class Results:
    modes: list[str]
    samples: dict[str, list[Sample]]
    requests: int  # per operation per benchmark

    @property
    def per_request(self) -> float:
        """Requests per benchmark, in millions: CPU seconds / this = us per request."""
        return len(OPS) * self.requests / 1e6

    def cpu_total(self, mode: str) -> float:
        """Median over rounds of server run + client + agent CPU, us per request."""
        return statistics.median(s.cpu.run_s + s.client_s + s.agent_s
                                 for s in self.samples[mode]) / self.per_request

    def rps(self, mode: str, op: str) -> list[float]:
        return [s.rps[op] for s in self.samples[mode]]

    def median(self, mode: str, op: str) -> float:
        return statistics.median(self.rps(mode, op))

    def ratio(self, mode: str, op: str) -> float:
        return self.median(mode, op) / self.median("nothing", op)

    def paired(self, mode: str, op: str) -> float | None:
        """Median over the rounds that have both samples of mode / nothing."""
        base = {s.round: s.rps[op] for s in self.samples["nothing"]}
        pairs = [s.rps[op] / base[s.round] for s in self.samples[mode] if s.round in base]
        return statistics.median(pairs) if pairs else None

    def quiet(self) -> Results:
        return Results(self.modes, {m: [s for s in ss if s.quiet]
                                    for m, ss in self.samples.items()}, self.requests)

    def complete(self, least: int = 1) -> bool:
        return all(len(ss) >= least for ss in self.samples.values())


def rps_tables(results: Results, what: str) -> None:
    modes = results.modes
    floor = "empty" in modes
    print()
    print(f"requests/s, {what}: median (min..max); n: samples (of them quiet: no foreign "
          "hook, others used <= "
          f"{QUIET_OTHERS:g} CPU); ratio: median / nothing's median; paired: median over "
          "rounds of mode / nothing in the same round; loss: 1 - ratio; x floor: loss / the "
          "empty floor's loss")
    for op in OPS:
        print()
        noise = spread(results.rps("nothing", op)) * 100
        print(f"{op}: nothing's samples spread over {noise:.0f} % of their median (the noise "
              "to read the ratios against)")
        header = (f"{op:<22}{'requests/s':>11}{'min..max':>19}{'n':>6}{'ratio':>8}"
                  f"{'paired':>8}{'loss':>9}{'x floor':>9}")
        print(header)
        print("-" * len(header))
        floor_loss = 1 - results.ratio("empty", op) if floor else None
        for mode in modes:
            ss = results.samples[mode]
            values = results.rps(mode, op)
            span = f"{min(values):,.0f}..{max(values):,.0f}"
            is_base = mode == "nothing"
            loss = 1 - results.ratio(mode, op)
            x_floor = (loss / floor_loss if floor_loss and floor_loss > 0 and not is_base
                       and mode != "empty" else None)
            n = f"{len(ss)}/{sum(s.quiet for s in ss)}"
            print(f"{LABELS[mode]:<22}{results.median(mode, op):>11,.0f}{span:>19}{n:>6}"
                  f"{results.ratio(mode, op):>8.3f}{fmt(results.paired(mode, op), '.3f'):>8}"
                  f"{'-' if is_base else format(loss * 100, '.1f') + ' %':>9}"
                  f"{fmt(x_floor):>9}")


def report(results: Results, requests: int) -> None:
    modes = results.modes
    rps_tables(results, f"all {len(results.samples['nothing'])} rounds")

    print()
    print(f"CPU per request, us (medians over rounds; SET and GET together, {len(OPS)} x "
          f"{requests:,} requests per benchmark). server: redis-server's user and system time "
          "(/proc/PID/stat, 10 ms ticks) and its main thread's run time (schedstat, ns); "
          "client: redis-benchmark's user+system (rusage); agent: the agent's threads' run "
          "time over the benchmark; total = run + client + agent; cost ratio: nothing's total "
          "/ the mode's (the throughput ratio a CPU-bound machine would see, insensitive to "
          "CPU that other sessions take); waited: the server's run-queue wait, ms per "
          "benchmark; others: CPUs used by every other task meanwhile (/proc/stat busy time "
          "minus server, client and agent; other sessions, kernel threads): the noise")
    header = (f"{'mode':<22}{'user':>7}{'sys':>7}{'run':>7}{'client':>8}{'agent':>7}"
              f"{'total':>8}{'+us':>7}{'cost ratio':>11}{'waited ms':>11}{'others':>8}"
              f"{'bench s':>9}")
    print(header)
    print("-" * len(header))
    base = results.cpu_total("nothing")
    for mode in modes:
        ss = results.samples[mode]
        per = results.per_request

        def med(values: Iterator[float], per: float = per) -> float:
            return statistics.median(values) / per

        total = results.cpu_total(mode)
        print(f"{LABELS[mode]:<22}{med(s.cpu.user_s for s in ss):>7.2f}"
              f"{med(s.cpu.sys_s for s in ss):>7.2f}{med(s.cpu.run_s for s in ss):>7.2f}"
              f"{med(s.client_s for s in ss):>8.2f}{med(s.agent_s for s in ss):>7.2f}"
              f"{total:>8.2f}{'-' if mode == 'nothing' else format(total - base, '+.2f'):>7}"
              f"{base / total:>11.3f}"
              f"{statistics.median(s.cpu.wait_s for s in ss) * 1000:>11.0f}"
              f"{statistics.median(s.others for s in ss):>8.2f}"
              f"{statistics.median(s.seconds for s in ss):>9.1f}")


def spread(values: Sequence[float]) -> float:
    """(max - min) / median: how far a mode's own samples disagree."""
    return (max(values) - min(values)) / statistics.median(values)


def judge(what: str, ratio: float, floor_ratio: float, noise: float) -> tuple[bool, bool]:
    """Print the verdict; (passed, conclusive). Inconclusive when nothing's own samples
    spread over more than NOISE_LIMIT: then a ratio's error is larger than the 5 % the
    target is about, whichever way the verdict fell."""
    loss, floor_loss = 1 - ratio, 1 - floor_ratio
    passed = loss <= LOSS_FACTOR * floor_loss or ratio >= RATIO_TARGET
    conclusive = noise <= NOISE_LIMIT
    times = (f"{loss / floor_loss:.2f} x the floor's" if floor_loss > 0
             else "the floor's loss is within noise (<= 0)")
    print(f"  {what}: agent defaults loses {loss * 100:.1f} % (ratio {ratio:.3f}), the empty "
          f"floor {floor_loss * 100:.1f} % (ratio {floor_ratio:.3f}): {times}; limit "
          f"{LOSS_FACTOR * floor_loss * 100:.1f} %  {'PASS' if passed else 'MISS'}"
          + ("" if conclusive else f"  (inconclusive: nothing's samples spread "
             f"{noise * 100:.0f} %, over {NOISE_LIMIT * 100:.0f} %)"))
    return passed, conclusive


def overall(what: str, verdicts: Sequence[tuple[bool, bool]]) -> None:
    word = "PASS" if all(p for p, _ in verdicts) else "MISS"
    sure = all(c for _, c in verdicts)
    print(f"  overall, {what}: {word}"
          + ("" if sure else " - inconclusive: the machine was too noisy to tell"))


def headline(results: Results) -> None:
    print()
    print(f"target (the issue): the agent's loss <= {LOSS_FACTOR} x the empty floor's loss "
          f"in the same run, or the agent's ratio >= {RATIO_TARGET}")
    if not {"agent", "empty"} <= set(results.modes):
        print("  n/a: needs the modes nothing, empty and agent")
        return
    overall("requests/s, all rounds", [
        judge(op, results.ratio("agent", op), results.ratio("empty", op),
              spread(results.rps("nothing", op))) for op in OPS])
    quiet = results.quiet()
    if quiet.complete(3) and quiet.samples != results.samples:
        overall("requests/s, quiet samples only", [
            judge(op, quiet.ratio("agent", op), quiet.ratio("empty", op),
                  spread(quiet.rps("nothing", op))) for op in OPS])
    elif quiet.samples != results.samples:
        print("  (too few quiet samples, < 3 in some mode, for the same on quiet samples only)")
    base = results.cpu_total("nothing")
    print("the same test on the cost ratio (CPU per request, SET and GET together, all rounds; "
          "not the issue's figure: a cross-check less moved by CPU other sessions take):")
    judge("CPU", base / results.cpu_total("agent"), base / results.cpu_total("empty"),
          spread([s.cpu.run_s + s.client_s for s in results.samples["nothing"]]))


def perf_table(breakdowns: dict[str, PerfBreakdown], requests: int) -> None:
    print()
    print("where the server's own CPU time went: one more benchmark per mode under `perf "
          f"record -e cpu-clock -F {PERF_FREQ} -p SERVER` (untimed); us per request = "
          f"samples / {PERF_FREQ} Hz / ({len(OPS)} x {requests:,} requests), by symbol group")
    header = (f"{'mode':<22}{'samples':>8}" + "".join(f"{g:>18}" for g in PERF_GROUPS)
              + f"{'total':>8}")
    print(header)
    print("-" * len(header))
    per = len(OPS) * requests / 1e6
    for mode, b in breakdowns.items():
        us = b.samples / PERF_FREQ / per
        print(f"{LABELS[mode]:<22}{b.samples:>8}"
              + "".join(f"{b.share[g] * us:>18.2f}" for g in PERF_GROUPS) + f"{us:>8.2f}"
              + ("  ! others' hooks: their programs count here too" if b.foreign else ""))
    print("heaviest symbols of the BPF and tracing groups (% of the server's samples):")
    for mode, b in breakdowns.items():
        if b.top_bpf:
            print(f"  {LABELS[mode]}: " + ", ".join(f"{s} {p * 100:.1f}%" for s, p in b.top_bpf))


# -- the suite ---------------------------------------------------------------------------


def hook_holders() -> list[str]:
    """Other processes holding programs on the watched hooks now, with their age and
    whether they are orphans (parent 1: a test run that ended without stopping them, say),
    so a run whose "nothing" is not nothing says so up front."""
    from bench.common import bpftool_json

    own = {os.getpid()} | _children()
    pids = sorted({int(perf.get("pid", 0)) for perf in bpftool_json("perf", "show")
                   if str(perf.get("tracepoint", "")).startswith(WATCHED_HOOKS)} - own - {0})
    boot_ticks = time.clock_gettime(time.CLOCK_BOOTTIME) * CLK_TCK
    out = []
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        ppid, age = int(fields[1]), (boot_ticks - int(fields[19])) / CLK_TCK
        out.append(f"pid {pid}{' (orphan)' if ppid == 1 else ''}, {minutes(age)} old: "
                   f"{cmdline[:110]}")
    return out


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def run_suite(args: argparse.Namespace, machine_shown: bool) -> int:
    require("taskset", "redis-server", "redis-benchmark")
    from otel_ebpf.kernel import headers
    from otel_ebpf.kernel.engine import Engine
    from tests.peers.rotel import RotelCollector, rotel_binary

    try:
        rotel_binary()
    except RuntimeError as exc:
        raise BenchError(str(exc)) from exc
    bcc = import_bcc()
    # Created first: it may set BCC_KERNEL_SOURCE, which the agent (inherited environment)
    # then uses; it also loads the empty floor.
    engine = Engine(headers.discover())
    modes = modes_of(args.redis_modes)
    rounds, requests, clients = args.rounds, args.redis_requests, args.redis_clients
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise BenchError("needs 2 CPUs: one for redis-server, one for redis-benchmark")
    server_cpu, client_cpu, rest = cpus[-1], cpus[-2], set(cpus[:-2])
    if rest:
        os.sched_setaffinity(0, rest)  # this script and the sink, off the measured CPUs

    heading("redis: a real server's throughput under the agent")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    if not machine_shown:
        for line in machine_lines(bcc):
            print(line)
    print(f"perf:    {perf_counters()}")
    print(f"load:    {loadavg()} (1, 5, 15 min load average at the start)")
    holders = hook_holders()
    if holders:
        print(f"warning: {len(holders)} other process(es) hold BPF programs on the syscall or "
              "socket hooks now; while they do, every mode, nothing included, pays for them:")
        for line in holders:
            print(f"           {line}")
    if rounds < 5:
        print(f"note:    {rounds} rounds: the issue asks for medians of >= 5")
    started = time.monotonic()
    life = 120 + len(OPS) * requests / MIN_RPS
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="otel-ebpf-redis-")))
        server = stack.enter_context(RedisServer(server_cpu, tmp))
        sink = stack.enter_context(otlp_sink())
        rotel = stack.enter_context(RotelCollector(sink.endpoint))
        cmd = benchmark_command(client_cpu, server.port, clients, requests)
        print(f"server:  {shlex.join(server.command)}  (redis {redis_version()}, pid "
              f"{server.pid})")
        print(f"client:  {shlex.join(cmd)}")
        print(f"peer:    {shlex.join(rotel.command())}  ->  OTLP sink {sink.endpoint} in "
              "this process")
        agent_modes = [m for m in modes if m not in ("nothing", "empty")]
        if agent_modes:
            print(f"agent:   otel-ebpf run --config FILE --duration {life:.0f}s, FILE: the "
                  f"defaults but exporter.endpoint {rotel.grpc_endpoint}"
                  + ("; for a probe alone, the two others enabled: false"
                     if set(agent_modes) - {"agent"} else ""))
        print(f"method:  modes {', '.join(LABELS[m] for m in modes)}; {rounds} rounds, each "
              "measures every mode once, order rotated per round; medians. Server pinned to "
              f"CPU {server_cpu}, client to CPU {client_cpu}; "
              + (f"this script on CPUs {','.join(map(str, sorted(rest)))}, the agent, rotel "
                 "unpinned" if rest else
                 "2 CPUs: the agent's user-space threads, rotel and this script share those "
                 "two CPUs with them")
              + f". Agents start afresh per measurement; the benchmark starts {AGENT_SETTLE:g}s "
              "after the agent logged its probes attached. See bench/redis.py.")

        # The warm-up fills the key GET reads and times the machine for the estimate.
        warm_cmd = benchmark_command(client_cpu, server.port, clients,
                                     min(WARMUP_REQUESTS, requests))
        warm, _ = run_benchmark(warm_cmd, min(WARMUP_REQUESTS, requests))
        estimate = estimate_seconds(modes, rounds, requests, warm, args.redis_perf)
        print(f"warm-up: {', '.join(f'{op} {warm[op]:,.0f}/s' for op in OPS)} "
              f"({min(WARMUP_REQUESTS, requests):,} requests each, nothing attached)")
        plus = " + the perf passes" if args.redis_perf else ""
        print(f"time:    about {minutes(estimate)} for {rounds} rounds x {len(modes)} modes "
              f"x {len(OPS)} x {requests:,} requests{plus} (estimated from the warm-up; agents "
              f"~{AGENT_OVERHEAD_GUESS:.0f}s each to start and stop)", flush=True)

        workdir = tmp / "agents"
        workdir.mkdir()
        objects: dict[str, Mode] = {"nothing": Nothing()}
        if "empty" in modes:
            objects["empty"] = EmptyFloor(engine)
        for m in agent_modes:
            objects[m] = Agent(m, workdir, rotel.grpc_endpoint, sink, server.pid, life)
        order_base = [objects[m] for m in modes]
        watch = HookWatch(hooks=WATCHED_HOOKS)
        if not watch.available:
            print("note:    bpftool not found: cannot tell whether other tools' programs on "
                  "the syscall and socket hooks overlap the benchmarks")
        results = Results(modes, {m: [] for m in modes}, requests)
        print()
        round_times: list[float] = []
        gate = QuietGate()
        for r in range(rounds):
            round_began = time.monotonic()
            k = r % len(order_base)
            for mode in order_base[k:] + order_base[:k]:
                sample = measure(mode, server, watch, gate, cmd, requests, r)
                results.samples[mode.key].append(sample)
                print(f"  round {r + 1}/{rounds}  {mode.label:<22}"
                      + "  ".join(f"{op} {sample.rps[op]:>9,.0f}/s{sample.mark:1}" for op in OPS)
                      + f"  ({sample.seconds:.1f}s, others {sample.others:.2f} CPU"
                      + (f", steal {sample.steal:.2f}" if sample.steal >= 0.01 else "")
                      + ", server "
                      f"waited {sample.cpu.wait_s * 1000:.0f} ms"
                      f"{'; ' + mode.note if mode.note else ''})", flush=True)
                if sample.foreign:
                    print(f"  ! overlapped foreign hooks: {', '.join(sample.foreign)}")
                if not server.alive():
                    raise BenchError("redis-server stopped answering\n" + server.log_tail())
            round_times.append(time.monotonic() - round_began)
            left = (rounds - r - 1) * statistics.mean(round_times)
            print(f"round {r + 1}/{rounds} took {round_times[-1]:.0f}s"
                  + (f"; about {minutes(left)} to go" if left else ""), flush=True)

        breakdowns: dict[str, PerfBreakdown] = {}
        if args.redis_perf:
            if shutil.which("perf") is None:
                print("\nperf breakdown skipped: perf not installed (make host-bench)")
            else:
                print("\nperf breakdown: one more benchmark per mode ...", flush=True)
                for mode in order_base:
                    breakdowns[mode.key] = perf_pass(mode, server, watch, cmd, requests, tmp)
                    print(f"  {mode.label}: {breakdowns[mode.key].samples} samples", flush=True)

    report(results, requests)
    quiet = results.quiet()
    if quiet.complete(2) and quiet.samples != results.samples:
        rps_tables(quiet, "quiet samples only (few: read with care)" if not quiet.complete(3)
                   else "quiet samples only")
    headline(results)
    if breakdowns:
        perf_table(breakdowns, requests)
    agents = [o for o in objects.values() if isinstance(o, Agent)]
    for agent in agents:
        if agent.errors:
            print(f"warning: {agent.label}: the agent logged errors:\n  "
                  + "\n  ".join(agent.errors[:5]))
        if agent.syscalls and min(agent.syscalls) < len(OPS) * requests:
            print(f"warning: {agent.label}: in some round the agent counted fewer redis-server "
                  f"syscalls ({min(agent.syscalls):,}) than requests were made: was it "
                  "observing the server?")
    disturbed = sum(1 for ss in results.samples.values() for s in ss if s.foreign)
    if disturbed:
        print(f"warning: {disturbed} benchmark(s) marked ! ran while another tool had "
              "programs on the syscall or socket hooks: those numbers include its cost")
    busy = sum(1 for ss in results.samples.values() for s in ss if not s.quiet and not s.foreign)
    if busy:
        print(f"warning: {busy} benchmark(s) marked ~ ran while other tasks used more than "
              f"{QUIET_OTHERS:g} CPU")
    print(f"load:    {loadavg()} at the end")
    print(f"took {time.monotonic() - started:.0f}s (estimated {minutes(estimate)})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="A real server's throughput (redis-server driven by redis-benchmark on "
                    "loopback) with nothing attached, with empty programs on the syscall "
                    "hooks, with the agent's defaults and with each probe alone.")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds; each measures every mode once (default: %(default)s)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    problem = check_arguments(args) or ("--rounds must be >= 1" if args.rounds < 1 else None)
    if problem:
        parser.error(problem)
    return run_standalone("redis", run_suite, args)


if __name__ == "__main__":
    sys.exit(main())
