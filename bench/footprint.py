"""`make bench` footprint suite: what the agent costs a node at rest, all default probes on.

Targets (issue "Bounded on a busy node", point 4): steady RSS 40 s after start <= 80 MB,
peak RSS <= 300 MB, steady CPU <= 0.5 % of one core, every default probe attached <= 3 s.

Method
------
The real agent (`otel-ebpf run` as a process) runs on its embedded defaults except the
exporter, which points at a real collector on loopback: rotel (tests/peers/rotel.py) in
front of the in-process OTLP sink (tests/peers/otlp_sink.py). rotel answers profiles with
UNIMPLEMENTED, a real "collector without profiles" that the agent reports once.

  attached   seconds from the agent's exec to its log line "running: probes ..." (every
             probe compiled, loaded and attached); the probes' own "attached in" lines
             follow it. Measured cold (an empty compile cache: every program compiled) and
             on a restart (the caches a first start filled: programs and unwind tables),
             each in a short run of its own that nothing samples: the peak sampler below
             reads /proc of every process of the tree 20 times a second, and took enough
             of two CPUs to add 0.5-2 s to the start-up it was sampling. The agent's
             caches live in a private directory of the run
  peak       VmHWM of the agent process; the loader processes' VmHWM (compilers in child
             processes, where the engine uses them); and the sampled peak of the whole
             tree's RSS (agent + children, every PEAK_SAMPLE_S), the figure a container
             memory limit meets (an upper bound: pages shared by two processes count twice)
  steady     /proc/PID/smaps of the agent --footprint-seconds after its start: RSS split
             into anonymous, file-backed, and the part in LLVM/clang/BCC mappings; plus
             the RSS of any child alive then (the unwind tables' compiler process while it
             has work; it exits once idle), which the verdict counts
  CPU        the agent's run time (schedstat, every thread) over --footprint-cpu-window
             seconds after that point, as a percentage of one core, with its children's
             (those reaped in the window: cutime + cstime; those alive: schedstat)
  floor      the same agent and exporter with every probe disabled, at the same point: what
             Python, the OpenTelemetry SDK, pydantic, the endpoints server and the
             agent's own modules hold before any probe or data (skip it with --footprint-no-floor)

RSS right after attaching is printed too: what the agent holds once the engine is done,
before the probes' data (series, symbol tables, export buffers) grows with the node's
activity. On a shared machine that activity is whatever the neighbours run.

--footprint-agent runs another build's otel-ebpf (say, a checkout of main in its own venv)
for a before/after comparison on the same machine, minutes apart.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bench.common import (
    REPO_DIR,
    AgentProcess,
    BenchError,
    import_bcc,
    otlp_sink,
    reaped_children_cpu_seconds,
    require,
    suite_heading,
    threads_run,
    threads_run_seconds,
    verdict,
)

STEADY_TARGET_MB = 80.0
PEAK_TARGET_MB = 300.0
CPU_TARGET_PCT = 0.5
ATTACH_TARGET_S = 3.0
PEAK_SAMPLE_S = 0.05
COMPILER_LIBS = ("libLLVM", "libclang", "libbcc", "libz3")  # what BCC's compiler maps
PAGE = 4096


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--footprint-seconds", type=float, default=40.0,
                        help="footprint: steady-state point, seconds after the agent's start "
                             "(default: %(default)s)")
    parser.add_argument("--footprint-cpu-window", type=float, default=60.0,
                        help="footprint: seconds of steady CPU measured after that point "
                             "(default: %(default)s)")
    parser.add_argument("--footprint-jobs", type=int, default=None,
                        help="footprint: compiles at once (OTEL_EBPF_COMPILE_JOBS; default: "
                             "the agent's)")
    parser.add_argument("--footprint-no-floor", action="store_true",
                        help="footprint: skip the run with every probe disabled")
    parser.add_argument("--footprint-agent", type=Path, default=None,
                        help="footprint: the otel-ebpf executable to measure (default: this "
                             "venv's)")


def check_arguments(args: argparse.Namespace) -> str | None:
    if args.footprint_seconds < 5 or args.footprint_cpu_window < 1:
        return "--footprint-seconds must be >= 5 and --footprint-cpu-window >= 1"
    if args.footprint_agent is not None and not args.footprint_agent.is_file():
        return f"--footprint-agent {args.footprint_agent}: no such file"
    return None


# -- /proc readers -------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """pid's children, grandchildren, ... (those alive now)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                kids = [int(p) for p in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
            out += kids
            todo += kids
    return out


def rss_kb(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE // 1024
    except (OSError, ValueError, IndexError):
        return 0


def pss_kb(pid: int) -> int:
    """Proportional set size: a page shared by n processes counts 1/n in each, so a tree's
    sum counts LLVM's code, mapped by every compiler process, once."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def children_cpu_seconds(pid: int) -> float:
    """CPU time of pid's children: those reaped (cutime + cstime of /proc/PID/stat) and
    those alive (every thread's schedstat)."""
    total = reaped_children_cpu_seconds(pid)
    for kid in descendants(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):  # gone meanwhile
            total += threads_run_seconds(kid)
    return total


def status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


@dataclass
class Smaps:
    rss_kb: int = 0
    anon_kb: int = 0
    file_kb: int = 0
    compiler_kb: int = 0
    top_files: list[tuple[int, str]] = field(default_factory=list)


def smaps(pid: int) -> Smaps:
    """The agent's resident memory by kind, from every mapping of /proc/PID/smaps."""
    out = Smaps()
    per_file: dict[str, int] = {}
    path = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if head and "-" in head[0] and not head[0].endswith(":"):
            path = head[5] if len(head) > 5 else ""
        elif head[0] == "Rss:":
            kb = int(head[1])
            out.rss_kb += kb
            if path.startswith("/"):
                out.file_kb += kb
                per_file[path] = per_file.get(path, 0) + kb
                if any(lib in path for lib in COMPILER_LIBS):
                    out.compiler_kb += kb
        elif head[0] == "Anonymous:":
            out.anon_kb += int(head[1])
    out.top_files = sorted(((kb, p) for p, kb in per_file.items()), reverse=True)[:6]
    return out


class PeakSampler:
    """Samples the memory of the agent and its children until stopped: the tree's peak RSS
    sum (pages shared between the processes, such as LLVM's code in two compilers, count
    once per process: an upper bound), its peak PSS sum (each page once: what a container's
    memory limit meets), and each child's VmHWM (a child that lives shorter than a sample
    period is missed)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.tree_peak_kb = 0
        self.tree_peak_pss_kb = 0
        self.child_peak_kb = 0
        self.children_seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak", daemon=True)

    def _run(self) -> None:
        # the lowest priority: what it samples needs the CPUs more than it does
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        while not self._stop.wait(PEAK_SAMPLE_S):
            tree = [self.pid, *descendants(self.pid)]
            self.children_seen.update(tree[1:])
            self.tree_peak_kb = max(self.tree_peak_kb, sum(map(rss_kb, tree)))
            if len(tree) > 1:  # the agent alone: its VmHWM says more
                self.tree_peak_pss_kb = max(self.tree_peak_pss_kb, sum(map(pss_kb, tree)))
            for kid in tree[1:]:
                self.child_peak_kb = max(self.child_peak_kb, status_kb(kid, "VmHWM"))

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Figures:
    attached_s: float
    attached_rss_kb: int
    probe_lines: list[str]
    agent_peak_kb: int
    child_peak_kb: int
    children: int
    tree_peak_kb: int
    tree_peak_pss_kb: int
    steady: Smaps
    children_kb: int  # RSS of the agent's children alive at the steady point
    cpu_pct: float
    cpu_by_thread: dict[str, float]  # % of one core by thread name, and "children"

    @property
    def steady_kb(self) -> int:
        return self.steady.rss_kb + self.children_kb


def busiest(by_thread: dict[str, float], n: int = 6) -> str:
    """The threads (kernel names, see otel_ebpf/kernel/threads.py) that used the most."""
    top = sorted(by_thread.items(), key=lambda kv: -kv[1])[:n]
    return "by thread " + ", ".join(f"{name} {pct:.2f}" for name, pct in top)


def defaults_config(endpoint: str, probes: bool = True) -> str:
    """The embedded defaults, but for where to export (and the log level the bench reads);
    without probes: every probe the config knows disabled."""
    from otel_ebpf.config import ProbesConfig

    config: dict[str, object] = {"log_level": "info",
                                 "exporter": {"endpoint": endpoint}}
    if not probes:
        config["probes"] = {name: {"enabled": False} for name in ProbesConfig.model_fields}
    return yaml.safe_dump(config)


@contextlib.contextmanager
def collector() -> Iterator[str]:
    """rotel on loopback, forwarding to the in-process sink: its OTLP/HTTP endpoint (the
    agent's default protocol)."""
    if str(REPO_DIR) not in sys.path:
        sys.path.insert(0, str(REPO_DIR))
    from tests.peers.rotel import RotelCollector

    with otlp_sink() as sink, RotelCollector(sink.endpoint) as rotel:
        yield rotel.http_endpoint


def measure(args: argparse.Namespace, endpoint: str, workdir: Path,
            env: dict[str, str]) -> tuple[Figures, str]:
    life = args.footprint_seconds + args.footprint_cpu_window + 60
    with AgentProcess(defaults_config(endpoint), workdir, "agent-footprint", life,
                      executable=args.footprint_agent, extra_env=env) as agent:
        started = time.monotonic()
        with PeakSampler(agent.pid) as sampler:
            attached = agent.wait_ready(timeout=120)
            attached_rss = rss_kb(agent.pid)
            time.sleep(max(0.0, started + args.footprint_seconds - time.monotonic()))
        agent_peak = status_kb(agent.pid, "VmHWM")
        steady = smaps(agent.pid)
        children_kb = sum(map(rss_kb, descendants(agent.pid)))

        threads0, kids0 = threads_run(agent.pid), children_cpu_seconds(agent.pid)
        t0 = time.monotonic()
        time.sleep(args.footprint_cpu_window)
        if not agent.alive():
            raise BenchError(f"the agent died\n{agent.log_tail()}")
        threads1, kids1 = threads_run(agent.pid), children_cpu_seconds(agent.pid)
        window = time.monotonic() - t0
        by_thread = {"children": (kids1 - kids0) / window * 100}
        for tid, (name, run) in threads1.items():
            ran = run - threads0.get(tid, (name, 0.0))[1]
            by_thread[name] = by_thread.get(name, 0.0) + ran / window * 100
        cpu_pct = sum(by_thread.values())
        _stop(agent)
        lines = [line.split(": ", 1)[-1] for line in agent.log if " attached (" in line]
        command = shlex.join(agent.command[3:])
    return Figures(attached, attached_rss, lines, agent_peak, sampler.child_peak_kb,
                   len(sampler.children_seen), sampler.tree_peak_kb, sampler.tree_peak_pss_kb,
                   steady, children_kb, cpu_pct, by_thread), command


def attach_seconds(args: argparse.Namespace, endpoint: str, workdir: Path,
                   env: dict[str, str]) -> float:
    """Seconds until every default probe is attached, in a run of its own (nothing else
    sampling it); the caches in env are used and filled."""
    with AgentProcess(defaults_config(endpoint), workdir, "agent-attach", 180,
                      executable=args.footprint_agent, extra_env=env) as agent:
        attached = agent.wait_ready(timeout=120)
        _stop(agent)
    return attached


def measure_floor(args: argparse.Namespace, endpoint: str, workdir: Path) -> Smaps:
    """The agent with no probe, at the steady-state point."""
    with AgentProcess(defaults_config(endpoint, probes=False), workdir, "agent-floor",
                      args.footprint_seconds + 60, executable=args.footprint_agent) as agent:
        started = time.monotonic()
        agent.wait_ready(timeout=120)
        time.sleep(max(0.0, started + args.footprint_seconds - time.monotonic()))
        floor = smaps(agent.pid)
        _stop(agent)
    return floor


def _stop(agent: AgentProcess) -> None:
    code = agent.stop()
    if code != 0:
        raise BenchError(f"the agent exited with {code}\n{agent.log_tail()}")


def mb(kb: int) -> str:
    return f"{kb / 1024:.1f} MB"


def report(f: Figures, warm: Figures, floor: Smaps | None) -> None:
    s = f.steady
    print(f"\nattached:   {f.attached_s:.2f} s until every default probe was attached (cold: "
          "empty compile cache; a run of its own); the first start's probes, sampled:")
    for line in f.probe_lines:
        took = re.search(r"probe (\S+) attached .* in ([0-9.]+s)", line)
        print(f"            probe {took.group(1)} attached in {took.group(2)}" if took
              else f"            {line[:100]}")
    print(f"            {warm.attached_s:.2f} s on a restart (the caches filled), peak: agent "
          f"{mb(warm.agent_peak_kb)}, agent + children {mb(warm.tree_peak_kb)} RSS")
    print(f"peak:       agent {mb(f.agent_peak_kb)} (VmHWM); loader children {f.children}, "
          f"largest {mb(f.child_peak_kb)}; agent + children sampled: {mb(f.tree_peak_kb)} RSS "
          f"(shared pages once per process), {mb(f.tree_peak_pss_kb)} PSS (once)")
    print(f"attach RSS: {mb(f.attached_rss_kb)} when every probe was attached")
    print(f"steady:     {mb(s.rss_kb)} RSS = {mb(s.anon_kb)} anonymous + "
          f"{mb(s.rss_kb - s.anon_kb)} file-backed and other; LLVM/clang/BCC mappings "
          f"{mb(s.compiler_kb)}")
    for kb, path in s.top_files:
        print(f"            {kb / 1024:6.1f} MB  {path}")
    print(f"children:   {mb(f.children_kb)} RSS alive at that point (counted in the verdict)")
    if floor is not None:
        print(f"floor:      {mb(floor.rss_kb)} RSS = {mb(floor.anon_kb)} anonymous + "
              f"{mb(floor.rss_kb - floor.anon_kb)} file-backed and other, with every probe "
              "disabled (Python, the SDK, pydantic, the endpoints server, the agent's modules)")
    print(f"cpu:        {f.cpu_pct:.2f} % of one core at rest; {busiest(f.cpu_by_thread)}")
    w = warm.steady
    print(f"restart:    steady {mb(w.rss_kb)} RSS = {mb(w.anon_kb)} anonymous + "
          f"{mb(w.rss_kb - w.anon_kb)} file-backed and other, children {mb(warm.children_kb)}"
          f"; cpu {warm.cpu_pct:.2f} % of one core at rest")
    print(f"            restart's cpu: {busiest(warm.cpu_by_thread)}")
    print()
    for label, run in (("first start", f), ("restart", warm)):
        print(f"steady RSS  {label} " + verdict(
            run.steady_kb / 1024 <= STEADY_TARGET_MB,
            f"{mb(run.steady_kb)}, target <= {STEADY_TARGET_MB:g} MB"))
    peak = max(f.agent_peak_kb, f.tree_peak_pss_kb)
    print("peak memory " + verdict(peak / 1024 <= PEAK_TARGET_MB,
                                   f"{mb(peak)} (agent + compilers, PSS; RSS sum "
                                   f"{mb(f.tree_peak_kb)}), target <= {PEAK_TARGET_MB:g} MB"))
    for label, cpu in (("first start", f.cpu_pct), ("restart", warm.cpu_pct)):
        print(f"steady CPU  {label} " + verdict(cpu <= CPU_TARGET_PCT,
                                                f"{cpu:.2f} %, target <= {CPU_TARGET_PCT:g} %"))
    for label, seconds in (("cold", f.attached_s), ("warm", warm.attached_s)):
        print(f"attached    {label} " + verdict(seconds <= ATTACH_TARGET_S,
                                                f"{seconds:.2f} s, target <= "
                                                f"{ATTACH_TARGET_S:g} s"))


def run_suite(args: argparse.Namespace, machine_shown: bool) -> int:
    require()
    suite_heading("footprint: memory, CPU and start-up at rest, default probes", import_bcc(),
                  machine_shown)
    print("method:  the agent on its defaults exporting to rotel -> sink on loopback; "
          f"smaps at {args.footprint_seconds:g} s, CPU over the next "
          f"{args.footprint_cpu_window:g} s; see bench/footprint.py")
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="otel-ebpf-bench-") as tmp, \
            collector() as endpoint:
        env = {"OTEL_EBPF_CACHE_DIR": str(Path(tmp) / "cache")}
        if args.footprint_jobs is not None:
            env["OTEL_EBPF_COMPILE_JOBS"] = str(args.footprint_jobs)
        cache = Path(env["OTEL_EBPF_CACHE_DIR"])
        cold_s = attach_seconds(args, endpoint, Path(tmp), env)
        shutil.rmtree(cache)  # the first start below compiles everything again
        figures, command = measure(args, endpoint, Path(tmp), env)
        warm_s = attach_seconds(args, endpoint, Path(tmp), env)
        warm, _ = measure(args, endpoint, Path(tmp), env)
        figures.attached_s, warm.attached_s = cold_s, warm_s
        floor = None if args.footprint_no_floor else measure_floor(args, endpoint, Path(tmp))
    print(f"agent:   {command}  (OTEL_EBPF_CACHE_DIR in a private directory)")
    report(figures, warm, floor)
    print(f"took {time.monotonic() - began:.0f}s")
    return 0


if __name__ == "__main__":  # pragma: no cover - run through bench/run.py
    raise SystemExit("run it as: .venv/bin/python bench/run.py --suite footprint")
