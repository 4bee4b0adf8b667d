"""What the benchmark suites share: machine facts, building the C helpers, process and
BPF hygiene, the agent as a process, a local OTLP sink, and the report helpers.

Importing this module imports no BCC and starts nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import queue
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from otel_ebpf.kernel.engine import Engine

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
BUILD_DIR = BENCH_DIR / ".build"

TRACEFS = "/sys/kernel/tracing"
SYSCALL_HOOKS = ("sys_enter", "sys_exit")  # prefixes: also syscalls/sys_enter_<name>
# Seconds the whole run may spend waiting for someone else's syscall hooks to go away,
# and how often one sample is retried when they overlapped it.
FOREIGN_WAIT_BUDGET = 60.0
FOREIGN_RETRIES = 2


class BenchError(Exception):
    """The bench could not measure; the message says what is missing or what failed."""


# -- machine facts -----------------------------------------------------------------------


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


def machine_lines(bcc: Any) -> list[str]:
    """kernel, cpu, clocksource, Spectre v2 mitigation, BCC: what moves every number."""
    return [
        f"kernel:  {platform.release()} {platform.machine()}",
        f"cpu:     {cpu_model()}, nproc {os.cpu_count()}"
        f"{', virtual machine' if is_virtual() else ''}",
        f"clock:   {_read('/sys/devices/system/clocksource/clocksource0/current_clocksource')}"
        " (clocksource; bpf_ktime_get_ns reads it)",
        f"spectre: {_read('/sys/devices/system/cpu/vulnerabilities/spectre_v2')}",
        f"bcc:     {getattr(bcc, '__version__', '?')}",
    ]


def import_bcc() -> Any:
    try:
        import bcc
    except ImportError as exc:
        raise BenchError("the BCC Python module is not importable. Fix: install python3-bpfcc"
                         " and use a venv made with --system-site-packages") from exc
    return bcc


def require(*tools: str) -> None:
    if os.geteuid() != 0:
        raise BenchError("needs root: loading BPF programs takes CAP_BPF and CAP_PERFMON")
    for tool in tools:
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found on PATH")


def all_cpus() -> list[int]:
    """Every CPU this machine has online (not only those this process may use now: an
    earlier suite may have pinned us)."""
    text = _read("/sys/devices/system/cpu/online")
    cpus: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit():
            cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus or list(range(os.cpu_count() or 1))


def choose_cpus() -> tuple[int, set[int]]:
    """The measured program's CPU (the last we may use) and the rest, for everything else."""
    allowed = sorted(os.sched_getaffinity(0))
    storm_cpu = allowed[-1]
    rest = set(allowed[:-1])
    return storm_cpu, rest


def cpu_list(cpus: Iterable[int]) -> str:
    return ",".join(map(str, sorted(cpus)))


# -- building the C helpers --------------------------------------------------------------


def build_c(source: Path, binary: Path, *extra_flags: str) -> None:
    BUILD_DIR.mkdir(exist_ok=True)
    cmd = ["gcc", "-O2", "-Wall", "-Wextra", *extra_flags, "-o", str(binary), str(source)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BenchError(f"compiling {source.name} failed: {shlex.join(cmd)}\n{result.stderr}")


# -- the floor: empty programs on the syscall hooks --------------------------------------


class BareTracepoints:
    """A reference program on the syscall hooks (empty_tracepoints.bpf.c, the floor of any
    program there; clock_floor.bpf.c, the floor of any latency probe), loaded and attached
    by the engine like the probes."""

    def __init__(self, engine: Engine, key: str, label: str, source: Path) -> None:
        self._engine = engine
        self.key, self.label, self._source = key, label, source

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        program = self._engine.load(self._source.name.removesuffix(".bpf.c"),
                                    source=self._source)
        try:
            program.attach_raw_tracepoint("sys_enter", "on_sys_enter")
            program.attach_raw_tracepoint("sys_exit", "on_sys_exit")
            yield
        finally:
            program.close()


# -- processes and BPF objects -----------------------------------------------------------


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


def _stop_process(proc: subprocess.Popen[Any], timeout: float = 10) -> None:
    """SIGTERM (a BPF tool dies and the kernel detaches its programs when its file
    descriptors close); SIGKILL if it does not go."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    # SIGTERM becomes SystemExit so the finally blocks detach programs and stop children.
    raise SystemExit(128 + signum)


def bpftool_json(*args: str) -> list[dict[str, Any]]:
    if shutil.which("bpftool") is None:
        return []
    result = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        return []
    try:
        parsed = json.loads(result.stdout or "[]")
    except ValueError:
        return []
    return parsed if isinstance(parsed, list) else []


def prog_ids_of(pid: int) -> set[int]:
    """Ids of the BPF programs a process holds open (its /proc fdinfo: this bpftool may
    lack the pids column)."""
    ids: set[int] = set()
    with contextlib.suppress(OSError):
        for fdinfo in Path(f"/proc/{pid}/fdinfo").iterdir():
            for line in _read(str(fdinfo)).splitlines():
                if line.startswith("prog_id:"):
                    ids.add(int(line.split()[1]))
    return ids


def foreign_perf_event_programs(own_ids: Iterable[int]) -> list[str]:
    """perf_event programs that are not ours (another profiler, a test suite running the
    agent's profiler): they would sample our CPU loop too."""
    own = set(own_ids)
    return [f"another perf_event BPF program ({p.get('name')}, id {p.get('id')})"
            for p in bpftool_json("prog", "show")
            if p.get("type") == "perf_event" and int(p.get("id", -1)) not in own]


def wait_programs_gone(ids: set[int], timeout: float = 3.0) -> set[int]:
    """Programs of an exited process are freed once its last reference goes (RCU): wait a
    moment, then return those still loaded."""
    deadline = time.monotonic() + timeout
    while True:
        left = ids & {int(p.get("id", -1)) for p in bpftool_json("prog", "show")}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


_NR_BPF = {"x86_64": 321, "aarch64": 280}
_BPF_ENABLE_STATS = 32


@contextlib.contextmanager
def bpf_run_time_stats() -> Iterator[bool]:
    """Turn on the kernel's run-time accounting of BPF programs (run_cnt, run_time_ns in
    `bpftool prog show`) for the block: BPF_ENABLE_STATS hands out a file descriptor and
    the accounting stays on only while it is open, so it is restored even if we crash.
    Yields False where it is unavailable. It adds two clock reads to every BPF program run
    machine-wide while on, so only use it where that does not skew what is measured."""
    import ctypes

    nr = _NR_BPF.get(platform.machine())
    fd = -1
    if nr is not None:
        libc = ctypes.CDLL(None, use_errno=True)
        attr = (ctypes.c_uint8 * 16)()  # enable_stats.type = BPF_STATS_RUN_TIME (0)
        fd = int(libc.syscall(nr, _BPF_ENABLE_STATS, ctypes.byref(attr), len(attr)))
    try:
        yield fd >= 0
    finally:
        if fd >= 0:
            os.close(fd)


def prog_run_stats(ids: Iterable[int]) -> tuple[int, int]:
    """(runs, ns) summed over these programs, from bpftool."""
    wanted = set(ids)
    runs = ns = 0
    for p in bpftool_json("prog", "show"):
        if int(p.get("id", -1)) in wanted:
            runs += int(p.get("run_cnt", 0))
            ns += int(p.get("run_time_ns", 0))
    return runs, ns


class HookWatch:
    """Finds BPF programs on the syscall hooks that are not this bench's.

    Anything on sys_enter/sys_exit (a test suite loading the agent, another tracer) puts
    every task on the syscall slow path and runs its program on every storm syscall: the
    storm it overlaps measures that tool, not ours. Any syscall tracepoint counts, the
    per-syscall syscalls/sys_enter_* ones included, since they switch on the same slow path.
    Needs bpftool; without it the bench cannot tell and says so. `hooks` (name prefixes)
    widens the watch, e.g. to the socket tracepoints a network server's traffic crosses.
    """

    def __init__(self, own_pids: Iterable[int] = (),
                 hooks: tuple[str, ...] = SYSCALL_HOOKS) -> None:
        self.available = shutil.which("bpftool") is not None
        self.wait_budget = FOREIGN_WAIT_BUDGET
        self.own_pids = set(own_pids)  # e.g. the agent process a suite started
        self.hooks = hooks

    def _bpftool(self, *args: str) -> list[dict[str, Any]]:
        return bpftool_json(*args)

    def foreign(self) -> list[str]:
        if not self.available:
            return []
        own_pids = {os.getpid()} | _children() | self.own_pids  # syscount runs as our child
        # bpftool perf names the process holding each tracepoint or raw tracepoint fd; the
        # link list adds links no process holds (pinned), which perf cannot see.
        holders: dict[int, set[str]] = {}  # pid (0: none) -> hooks
        seen_progs: set[int] = set()
        for perf in self._bpftool("perf", "show"):
            hook = str(perf.get("tracepoint", ""))
            if hook.startswith(self.hooks):
                seen_progs.add(int(perf.get("prog_id", -1)))
                if perf.get("pid") not in own_pids:
                    holders.setdefault(int(perf.get("pid", 0)), set()).add(hook)
        own_links = _own_links()
        for link in self._bpftool("link", "show"):
            hook = str(link.get("tp_name", ""))
            if (link.get("type") == "raw_tracepoint" and hook.startswith(self.hooks)
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


# -- CPU accounting ----------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after "pid (comm) ": field 3 is [0]."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2:].split()


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all its threads, dead ones included), seconds."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def reaped_children_cpu_seconds(pid: int) -> float:
    """cutime + cstime: the CPU of the process's children it has waited for, seconds."""
    fields = _stat_fields(pid)
    return (int(fields[13]) + int(fields[14])) / CLK_TCK


def threads_run_seconds(pid: int) -> float:
    """The run time of every live thread of the process (schedstat, ns): short bursts
    counted as they ran, not as the 10 ms ticks /proc/PID/stat samples."""
    return sum(run for _, run in threads_run(pid).values())


def threads_run(pid: int) -> dict[int, tuple[str, float]]:
    """Each live thread's name (comm) and run time in seconds (schedstat), by tid; a
    thread that ends meanwhile is left out."""
    out: dict[int, tuple[str, float]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            run = int((task / "schedstat").read_text().split()[0]) / 1e9
            out[int(task.name)] = ((task / "comm").read_text().strip(), run)
    return out


def task_schedstat(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of a single-threaded task:
    the wait is the time other tasks took from it on its CPU."""
    run_ns, wait_ns, _ = Path(f"/proc/{pid}/schedstat").read_text().split()
    return int(run_ns) / 1e9, int(wait_ns) / 1e9


# -- the agent as a process --------------------------------------------------------------

AGENT_READY = " running: probes "  # the daemon's log line once every probe is attached


def agent_executable() -> Path:
    exe = Path(sys.executable).parent / "otel-ebpf"
    if exe.is_file():
        return exe
    found = shutil.which("otel-ebpf")
    if found is None:
        raise BenchError("the otel-ebpf command is not installed. Fix: make venv")
    return Path(found)


def agent_config(probe: str, settings: Mapping[str, Any], *, endpoint: str | None,
                 export_interval: str = "10s") -> str:
    """YAML for an agent running only `probe` (every other probe the config knows is
    disabled, so a probe added later cannot creep into the measurement), no summary, and
    OTLP/gRPC to `endpoint` (None: exporter disabled)."""
    import yaml

    from otel_ebpf.config import ProbesConfig

    probes: dict[str, Any] = {name: {"enabled": False} for name in ProbesConfig.model_fields}
    if probe not in probes:
        raise BenchError(f"the agent has no probe named {probe}")
    probes[probe] = {"enabled": True, **settings}
    exporter: dict[str, Any] = {"enabled": endpoint is not None}
    if endpoint is not None:
        exporter.update(endpoint=endpoint, protocol="grpc", insecure=True,
                        interval=export_interval)
    return yaml.safe_dump({"log_level": "info", "summary": {"enabled": False},
                           "exporter": exporter, "probes": probes}, sort_keys=False)


class AgentProcess:
    """`otel-ebpf run --config FILE` in its own session, on every CPU (whatever this process
    is pinned to), its log kept. --duration bounds its life even if the bench is killed."""

    def __init__(self, config_text: str, workdir: Path, name: str, max_seconds: float,
                 executable: Path | None = None, extra_env: Mapping[str, str] | None = None
                 ) -> None:
        config = workdir / f"{name}.yaml"
        config.write_text(config_text)
        exe = executable or agent_executable()
        self.command = ["taskset", "-c", cpu_list(all_cpus()), str(exe), "run",
                        "--config", str(config), "--duration", f"{max_seconds:.0f}s"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env.update(extra_env or {})
        self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env=env, cwd=workdir, start_new_session=True)
        self.pid = self.proc.pid
        self.log: list[str] = []
        self._lines: queue.Queue[str] = queue.Queue()
        self._pump = threading.Thread(target=self._read_log, name="agent-log", daemon=True)
        self._pump.start()

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line.rstrip("\n"))
            self._lines.put(line)

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join("    " + line for line in self.log[-lines:])

    def wait_ready(self, timeout: float = 90.0) -> float:
        """Block until the agent logged that its probes are attached; seconds it took."""
        began = time.monotonic()
        deadline = began + timeout
        while not any(AGENT_READY in line for line in self.log):
            if self.proc.poll() is not None:
                self._pump.join(timeout=2)
                raise BenchError(f"the agent exited ({self.proc.returncode}) before its "
                                 f"probes were attached: {shlex.join(self.command)}\n"
                                 + self.log_tail())
            if time.monotonic() > deadline:
                raise BenchError(f"the agent did not attach within {timeout:.0f}s\n"
                                 + self.log_tail())
            with contextlib.suppress(queue.Empty):
                self._lines.get(timeout=0.1)
        return time.monotonic() - began

    def cpu_seconds(self) -> float:
        """The agent's CPU time: the run time of all its threads (schedstat, ns), so short
        bursts are counted as they ran, not as the 10 ms ticks /proc/PID/stat samples (on
        CPUs kept busy by loops, ticks charge whole ticks to whoever runs at the tick).
        Threads that ended are not included; the agent's threads live as long as it."""
        try:
            return threads_run_seconds(self.pid)
        except (OSError, ValueError, IndexError) as exc:
            raise BenchError(f"the agent exited early ({self.proc.poll()})\n"
                             + self.log_tail()) from exc

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM (the agent flushes and detaches), SIGKILL if it does not exit."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._pump.join(timeout=5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return self.proc.returncode

    def errors(self) -> list[str]:
        return [line for line in self.log if " ERROR " in line or "Traceback" in line]

    def __enter__(self) -> AgentProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def agent_command_for_report(agent: AgentProcess) -> str:
    return shlex.join(agent.command[3:])  # without the taskset prefix


# -- the OTLP sink -----------------------------------------------------------------------


@contextlib.contextmanager
def otlp_sink() -> Iterator[Any]:
    """tests/peers/otlp_sink.py's in-process OTLP/gRPC server on a loopback port."""
    if str(REPO_DIR) not in sys.path:
        sys.path.insert(0, str(REPO_DIR))
    from tests.peers.otlp_sink import OtlpSink

    sink = OtlpSink(max_workers=4)
    sink.start()
    try:
        yield sink
    finally:
        sink.stop(grace=0.5)


def last_counter_values(sink: Any, name: str) -> dict[tuple[tuple[str, Any], ...], float]:
    """The latest cumulative value of every series of counter `name` the sink received,
    keyed by its attributes (sorted key, value pairs; identity attributes left out)."""
    from tests.peers.otlp_sink import attrs_to_dict

    out: dict[tuple[tuple[str, Any], ...], float] = {}
    for _, point in sink.metrics_points(name):
        attrs = {k: v for k, v in attrs_to_dict(point.attributes).items()
                 if not k.startswith("process.")}
        value = point.as_int if point.WhichOneof("value") == "as_int" else point.as_double
        out[tuple(sorted(attrs.items()))] = float(value)
    return out


# -- the report --------------------------------------------------------------------------


def ratio(num: float, den: float) -> float | None:
    # An "added" of zero or less means the mode is inside the noise: no meaningful ratio.
    return num / den if den > 0 else None


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def verdict(passed: bool | None, detail: str) -> str:
    if passed is None:
        return f"n/a ({detail})"
    return ("PASS" if passed else "MISS") + f"  ({detail})"


def heading(title: str) -> None:
    print()
    print(f"== {title} " + "=" * max(0, 86 - len(title)))


def suite_heading(title: str, bcc: Any, machine_shown: bool) -> None:
    """A suite's heading, the command that ran it and, once per run, the machine."""
    heading(title)
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    if not machine_shown:
        for line in machine_lines(bcc):
            print(line)


def run_standalone(name: str, run_suite: Callable[[Any, bool], int], args: Any) -> int:
    """A suite run as a script (`python bench/<name>.py`): its exit code, after checking
    it left no BPF object or child process behind."""
    signal.signal(signal.SIGTERM, _raise_exit)
    from otel_ebpf.kernel.engine import EngineError

    try:
        run_suite(args, False)
    except (BenchError, EngineError) as exc:
        print(f"bench: {name}: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # SIGTERM (_raise_exit): say so, or the log just stops
        print(f"bench: stopped by a signal (exit {exc.code}); everything it started is "
              "stopped", file=sys.stderr, flush=True)
        raise
    leaked = open_bpf_fds()
    if leaked or _children():
        print(f"bench: {name}: left behind: BPF fds {leaked}, children {sorted(_children())}",
              file=sys.stderr)
        return 1
    return 0
