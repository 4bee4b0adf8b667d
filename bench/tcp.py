"""`make bench` tcp suite: what the tcp_retransmit probe costs, in the kernel per
retransmit event and in the agent's CPU during a 50 MB lossy transfer.

    .venv/bin/python bench/tcp.py [--tcp-rounds N] [--tcp-mbytes MB] [--tcp-drop PERCENT]

Method
------
The real agent (`otel-ebpf run` as a process) runs only tcp_retransmit, at the product's
defaults (aggregation peer, events off) except its drain interval, 1 s instead of 5 s, and
exports OTLP/gRPC every 1 s to an in-process sink (tests/peers/otlp_sink.py): if anything
it is charged for more draining and exporting than in production.

The load is the one the kernel tests use (tests/helpers/netns.py, tcp_transfer.py): a
private network namespace (only its loopback, MTU 1500 so that GSO packs tens of segments
per buffer as on a NIC; nothing leaves it) where nftables drops --tcp-drop % of the packets to
the server's port, and one client sending --tcp-mbytes MiB over one connection. The
namespace's RetransSegs - TCPRetransFail (/proc/net/snmp, netstat) is the number of
retransmitted segments ("segments" below; failures are 0 here in practice). Every
round runs two transfers, each in a fresh namespace on a fresh random port:

(a) stats transfer: the kernel's BPF run-time accounting is on (BPF_ENABLE_STATS: on
    while this process holds the file descriptor, so it is off again even if we crash;
    the kernel.bpf_stats_enabled sysctl as fallback, restored afterwards) only for this
    transfer. `bpftool prog show` run_cnt / run_time_ns of each of the agent's programs
    (found through /proc/AGENT/fdinfo), before and after: ns per program run. The cost
    per retransmit event is on_retransmit's ns per run (one run per tcp_retransmit_skb
    hit: one retransmitted buffer, of one or more segments); "all hooks" divides the
    time of every program of the probe during the transfer (the owner hooks on each
    send and receive, inet_sock_set_state, the SYN-ACK hook) by the namespace's
    retransmitted segments. "skipped" is bpftool's recursion_misses: runs the kernel
    skipped because the program was already running on that CPU (each would be a
    retransmit not counted).
(b) CPU transfer, accounting off: the agent's utime+stime (every thread) from just
    before the transfer until its sockets settled, as % of one core,
    and from the same start until the sink holds this round's counts (one more drain and
    export: the work the transfer caused), per 1000 retransmitted segments. Its idle CPU
    over --tcp-idle seconds beforehand is printed for scale, and subtracted in the
    "above idle" column. A 50 MB transfer takes 0.1..2 s here, where /proc/AGENT/stat's
    10 ms ticks are 0.5..10 % of a core: the figures use the same quantity at ns
    resolution, the sum of the agent's threads' /proc/AGENT/task/TID/schedstat run time
    (the kernel scales utime and stime so that they add up to it), and show the ticks
    beside.
Sanity, both transfers: the count the agent exported for the transfer's port equals the
namespace's; a difference is printed as a warning (the count is exact by design: a
difference is a retransmit the probe missed).

Caveats
  * run_time_ns covers the program body only (plus the accounting's own clock reads): not
    the raw tracepoint dispatch (a few ns a call) nor the cache lines the programs touch
    for the code they interrupt. What the program time costs the transfer's processes and
    softirqs is not in the agent's CPU: that is user-space only.
  * run_cnt counts every run machine-wide while the accounting is on: the send/receive
    hooks also run for the sink's and the agent's own gRPC, and on_retransmit for any other
    retransmitting socket (a test suite running lossy transfers beside the bench). The
    latter would inflate the "all hooks per segment" figure; retransmits the agent exported
    for other ports during a round are counted and flagged with "!".
  * schedstat covers the threads alive at both ends of a window (a window where one came
    or went is marked ~); utime+stime in ticks covers dead threads too. The total row sums
    the rounds.
  * 2 CPUs: the client, the server, the softirqs and the agent share them. Nothing is
    pinned.

It needs root, ip, nft and bpftool. It exits 0 whatever the numbers (a measurement, not a
test) and nonzero only when it could not measure.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    # run as a script: bench/ must not shadow the standard library's profile module (see
    # bench/run.py), and bench.* / tests.* are imported from the repository
    _BENCH = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
    sys.path.insert(0, str(_BENCH.parent))

from bench.common import (
    REPO_DIR,
    AgentProcess,
    BenchError,
    agent_command_for_report,
    agent_config,
    bpf_run_time_stats,
    bpftool_json,
    fmt,
    import_bcc,
    otlp_sink,
    prog_ids_of,
    require,
    run_standalone,
    suite_heading,
    wait_programs_gone,
)

if str(REPO_DIR) not in sys.path:
    sys.path.insert(0, str(REPO_DIR))

from tests.helpers.netns import (
    Netns,
    NetnsUnavailable,
    leftover_namespaces,
    lossy_netns,
)

HELPER = REPO_DIR / "tests" / "helpers" / "tcp_transfer.py"
METRIC = "linux.tcp.retransmits"
LO_MTU = 1500
PROBE_INTERVAL = "1s"
EXPORT_INTERVAL = "1s"
EXPORT_TIMEOUT = 15.0  # s for a round's counts to reach the sink
TRANSFER_TIMEOUT = 120.0
STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")
# the probe's functions, as BCC names their programs, and their hooks
HOOKS = {
    "on_retransmit": "tcp/tcp_retransmit_skb",
    "on_synack": "tcp/tcp_retransmit_synack",
    "on_send": "sock/sock_send_length",
    "on_recv": "sock/sock_recv_length",
    "on_state": "sock/inet_sock_set_state",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tcp-rounds", type=int, default=10,
                        help="tcp: rounds, each one stats and one CPU transfer "
                             "(default: %(default)s)")
    parser.add_argument("--tcp-mbytes", type=int, default=50,
                        help="tcp: MiB per transfer (default: %(default)s)")
    parser.add_argument("--tcp-drop", type=int, default=5,
                        help="tcp: %% of the packets to the server dropped "
                             "(default: %(default)s)")
    parser.add_argument("--tcp-idle", type=float, default=5.0,
                        help="tcp: seconds of the agent's idle CPU measured first "
                             "(default: %(default)s)")


def check_arguments(args: argparse.Namespace) -> str | None:
    if args.tcp_rounds < 1 or args.tcp_mbytes < 1 or args.tcp_idle <= 0:
        return "--tcp-rounds and --tcp-mbytes must be >= 1, --tcp-idle > 0"
    if not 1 <= args.tcp_drop <= 50:
        return "--tcp-drop must be between 1 and 50"
    return None


# -- the load ----------------------------------------------------------------------------


@dataclass
class Transfer:
    seconds: float  # from starting the server until every socket settled
    client_pid: int
    retrans_segs: int
    retrans_fail: int


def transfer(ns: Netns, nbytes: int) -> Transfer:
    before = ns.counters()
    began = time.monotonic()
    server = ns.popen([sys.executable, str(HELPER), "server", "127.0.0.1", str(ns.port)],
                      stdout=subprocess.PIPE)
    assert server.stdout is not None
    listening = server.stdout.readline().split()
    if not listening or listening[0] != "listening":
        raise BenchError(f"the transfer's server did not start: {listening}")
    client = ns.popen([sys.executable, str(HELPER), "client", "127.0.0.1", str(ns.port),
                       str(nbytes)], stdout=subprocess.PIPE)
    try:
        out, _ = client.communicate(timeout=TRANSFER_TIMEOUT)
        server_out, _ = server.communicate(timeout=TRANSFER_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"the transfer took over {TRANSFER_TIMEOUT:.0f}s") from exc
    if not out.strip().endswith(f"sent {nbytes} received 0") or (
            server_out.strip() != f"received {nbytes}"):
        raise BenchError(f"the transfer failed: client {out!r}, server {server_out!r}")
    try:
        ns.wait_settled()
    except TimeoutError as exc:
        raise BenchError(str(exc)) from exc
    seconds = time.monotonic() - began
    after = ns.counters()
    return Transfer(seconds, client.pid,
                    after["Tcp.RetransSegs"] - before["Tcp.RetransSegs"],
                    after["TcpExt.TCPRetransFail"] - before["TcpExt.TCPRetransFail"])


@contextlib.contextmanager
def namespace(port: int, drop: int) -> Iterator[Netns]:
    try:
        with lossy_netns(port, drop_percent=drop, lo_mtu=LO_MTU) as ns:
            yield ns
    except NetnsUnavailable as exc:
        raise BenchError(f"cannot make the lossy namespace: {exc}") from exc


# -- what the sink received --------------------------------------------------------------


def exported_by_port(sink: Any) -> dict[int, int]:
    """Sum of the latest cumulative value of every linux.tcp.retransmits series, by the
    service port its series names (peer aggregation: the peer's port for connections
    opened here, the local port for accepted ones). A series that restarted (a new start
    time: the agent forgot it, then counted again) adds its runs up."""
    from tests.peers.otlp_sink import attrs_to_dict

    latest: dict[tuple[Any, ...], tuple[int, int]] = {}
    for resource, point in sink.metrics_points(METRIC):
        attrs = attrs_to_dict(point.attributes)
        port = int(attrs.get("network.peer.port") or attrs.get("network.local.port") or 0)
        key = (tuple(sorted(resource.items())), tuple(sorted(attrs.items())),
               point.start_time_unix_nano)
        latest[key] = (port, int(point.as_int))
    out: dict[int, int] = {}
    for port, value in latest.values():
        out[port] = out.get(port, 0) + value
    return out


def others(by_port: dict[int, int], ours: set[int]) -> int:
    return sum(v for port, v in by_port.items() if port not in ours)


# -- BPF run-time accounting -------------------------------------------------------------


def stats_sysctl() -> int | None:
    try:
        return int(STATS_SYSCTL.read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def run_time_stats() -> Iterator[str]:
    """Run-time accounting on for the block; yields how it was turned on."""
    with bpf_run_time_stats() as enabled:
        if enabled:
            yield "BPF_ENABLE_STATS"
            return
    before = stats_sysctl()
    if before is None:
        raise BenchError("cannot turn on BPF run-time stats (no BPF_ENABLE_STATS, no "
                         f"{STATS_SYSCTL})")
    if before:
        yield "kernel.bpf_stats_enabled (already 1)"
        return
    STATS_SYSCTL.write_text("1")
    try:
        yield "kernel.bpf_stats_enabled"
    finally:
        STATS_SYSCTL.write_text(str(before))


def program_stats(ids: set[int]) -> dict[int, tuple[str, int, int, int]]:
    """id -> (name, run_cnt, run_time_ns, recursion_misses) of these programs."""
    return {int(p["id"]): (str(p.get("name", "?")), int(p.get("run_cnt", 0)),
                           int(p.get("run_time_ns", 0)), int(p.get("recursion_misses", 0)))
            for p in bpftool_json("prog", "show") if int(p.get("id", -1)) in ids}


# -- the agent's CPU --------------------------------------------------------------------


@dataclass(frozen=True)
class CpuSample:
    stat_s: float  # utime + stime, /proc/PID/stat (every thread, dead ones included; ticks)
    sched_s: float  # the live threads' /proc/PID/task/TID/schedstat run time (ns)
    tids: frozenset[int]


def sample_cpu(agent: AgentProcess) -> CpuSample:
    stat = agent.cpu_seconds()
    sched = 0
    tids: set[int] = set()
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{agent.pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                sched += int((task / "schedstat").read_text().split()[0])
                tids.add(int(task.name))
    return CpuSample(stat, sched / 1e9, frozenset(tids))


@dataclass(frozen=True)
class CpuDelta:
    stat_s: float
    sched_s: float
    exact: bool  # no thread came or went: the schedstat sum covers the window

    @staticmethod
    def between(a: CpuSample, b: CpuSample) -> CpuDelta:
        return CpuDelta(b.stat_s - a.stat_s, b.sched_s - a.sched_s, a.tids == b.tids)


# -- the rounds --------------------------------------------------------------------------


@dataclass
class StatsRound:
    segments: int
    seconds: float
    runs: dict[str, int]  # program name -> runs during the transfer
    ns: dict[str, int]
    misses: dict[str, int]  # runs the kernel skipped (the program interrupted itself)
    exported: int = 0
    foreign: int = 0  # retransmits the agent exported for other ports meanwhile

    @property
    def total_ns(self) -> int:
        return sum(self.ns.values())


@dataclass
class CpuRound:
    segments: int
    seconds: float  # the transfer, until its sockets settled
    cpu: CpuDelta  # the agent's over the transfer
    to_export_s: float  # from the transfer's start until the sink had its counts
    cpu_to_export: CpuDelta
    exported: int
    foreign: int = 0


@dataclass
class Results:
    idle_s: float = 0.0
    idle: CpuDelta = CpuDelta(0.0, 0.0, True)
    stats: list[StatsRound] = field(default_factory=list)
    cpu: list[CpuRound] = field(default_factory=list)
    stats_how: str = ""


def wait_exported(sink: Any, port: int, truth: int) -> tuple[int, dict[int, int]]:
    """Until the sink holds `truth` retransmits for `port` (or EXPORT_TIMEOUT)."""
    deadline = time.monotonic() + EXPORT_TIMEOUT
    while True:
        by_port = exported_by_port(sink)
        if by_port.get(port, 0) >= truth or time.monotonic() > deadline:
            return by_port.get(port, 0), by_port
        sink.wait_for(lambda: False, timeout=0.1)


def stats_round(ns: Netns, nbytes: int, prog_ids: set[int], names: dict[int, str],
                results: Results) -> StatsRound:
    with run_time_stats() as how:
        results.stats_how = how
        before = program_stats(prog_ids)
        run = transfer(ns, nbytes)
        after = program_stats(prog_ids)
    if set(before) != prog_ids or set(after) != prog_ids:
        raise BenchError(f"the agent's programs {sorted(prog_ids)} are not all loaded")
    runs = {names[i]: after[i][1] - before[i][1] for i in prog_ids}
    ns_ = {names[i]: after[i][2] - before[i][2] for i in prog_ids}
    misses = {names[i]: after[i][3] - before[i][3] for i in prog_ids}
    if not any(runs.values()):
        raise BenchError("no program run was counted: BPF run-time stats did not work")
    return StatsRound(run.retrans_segs - run.retrans_fail, run.seconds, runs, ns_, misses)


def cpu_round(ns: Netns, nbytes: int, agent: AgentProcess, sink: Any) -> CpuRound:
    cpu0, t0 = sample_cpu(agent), time.monotonic()
    run = transfer(ns, nbytes)
    cpu1 = sample_cpu(agent)
    exported, _ = wait_exported(sink, ns.port, run.retrans_segs - run.retrans_fail)
    cpu2, t2 = sample_cpu(agent), time.monotonic()
    return CpuRound(run.retrans_segs - run.retrans_fail, run.seconds,
                    CpuDelta.between(cpu0, cpu1), t2 - t0, CpuDelta.between(cpu0, cpu2),
                    exported)


def measure(args: argparse.Namespace, agent: AgentProcess, sink: Any,
            prog_ids: set[int], names: dict[int, str]) -> Results:
    results = Results()
    cpu0, t0 = sample_cpu(agent), time.monotonic()
    time.sleep(args.tcp_idle)
    results.idle = CpuDelta.between(cpu0, sample_cpu(agent))
    results.idle_s = time.monotonic() - t0
    nbytes = args.tcp_mbytes << 20
    ports: set[int] = set()

    def fresh_port() -> int:
        port = random.choice([p for p in range(20000, 60000) if p not in ports])
        ports.add(port)
        return port

    for r in range(args.tcp_rounds):
        others_before = others(exported_by_port(sink), ports)
        # alternate which transfer goes first, so neither always follows the other
        for kind in (("stats", "cpu") if r % 2 == 0 else ("cpu", "stats")):
            # one namespace per transfer: each port's exported count is one transfer's
            with namespace(fresh_port(), args.tcp_drop) as ns:
                if kind == "stats":
                    s = stats_round(ns, nbytes, prog_ids, names, results)
                    s_port = ns.port
                else:
                    c = cpu_round(ns, nbytes, agent, sink)
        exported, by_port = wait_exported(sink, s_port, s.segments)
        s.exported = exported
        foreign = max(0, others(by_port, ports) - others_before)
        s.foreign = c.foreign = foreign
        results.stats.append(s)
        results.cpu.append(c)
        print(f"  round {r + 1}/{args.tcp_rounds}: stats transfer {s.segments} segments "
              f"in {s.seconds:.1f}s, on_retransmit {s.runs.get('on_retransmit', 0)} runs, "
              f"exported {exported}; CPU transfer {c.segments} segments in {c.seconds:.1f}s, "
              f"agent {c.cpu.stat_s * 1000:.0f} ms, exported {c.exported}"
              f"{f'; ! {foreign} retransmits of other ports' if foreign else ''}",
              flush=True)
        if not agent.alive():
            raise BenchError(f"the agent died\n{agent.log_tail()}")
    return results


# -- the report --------------------------------------------------------------------------


def report(results: Results) -> None:
    stats = results.stats
    names = [n for n in HOOKS if any(n in s.runs for s in stats)]
    names += sorted({n for s in stats for n in s.runs} - set(names))
    segments = sum(s.segments for s in stats)
    flagged = any(s.foreign for s in stats)

    print()
    print(f"(a) in-kernel time of the probe's programs, {len(stats)} stats transfers, "
          f"{segments} retransmitted segments in all (run-time stats via {results.stats_how})")
    header = (f"{'program':<15}{'hook':<28}{'runs':>10}{'runs/seg':>10}{'ns/run':>9}"
              f"{'min..max':>15}{'ms total':>10}{'skipped':>9}")
    print(header)
    print("-" * len(header))
    for name in names:
        runs = sum(s.runs.get(name, 0) for s in stats)
        ns = sum(s.ns.get(name, 0) for s in stats)
        per_round = [s.ns[name] / s.runs[name] for s in stats if s.runs.get(name)]
        spread = (f"{min(per_round):.0f}..{max(per_round):.0f}" if per_round else "-")
        print(f"{name:<15}{HOOKS.get(name, '?'):<28}{runs:>10}"
              f"{fmt(runs / segments if segments else None, '.3f'):>10}"
              f"{fmt(ns / runs if runs else None, '.0f'):>9}{spread:>15}{ns / 1e6:>10.2f}"
              f"{sum(s.misses.get(name, 0) for s in stats):>9}")
    total_ns = sum(s.total_ns for s in stats)
    hits = sum(s.runs.get("on_retransmit", 0) for s in stats)
    hit_ns = sum(s.ns.get("on_retransmit", 0) for s in stats)
    per_round_total = [s.total_ns / s.segments for s in stats if s.segments]
    median_total = statistics.median(per_round_total) if per_round_total else None
    print()
    print(f"added kernel cost per retransmit event (one tcp_retransmit_skb hit, "
          f"{fmt(segments / hits if hits else None, '.1f')} segments on average): "
          f"{fmt(hit_ns / hits if hits else None, '.0f')} ns")
    print(f"all the probe's programs during the transfers, per retransmitted segment: "
          f"{fmt(total_ns / segments if segments else None, '.0f')} ns "
          f"(median of rounds {fmt(median_total, '.0f')} ns; "
          f"{total_ns / 1e6:.2f} ms for {segments} segments)"
          + ("  ! other ports retransmitted meanwhile: inflated" if flagged else ""))

    cpu = results.cpu
    idle_stat = results.idle.stat_s / results.idle_s
    idle_sched = results.idle.sched_s / results.idle_s
    print()
    print(f"(b) the agent's CPU during the lossy transfers; idle: {idle_sched * 100:.2f} % of a "
          f"core ({idle_stat * 100:.2f} % in utime+stime ticks) over {results.idle_s:.0f}s")
    header = (f"{'round':<7}{'segments':>9}{'exported':>9}{'transfer s':>11}{'CPU ms':>8}"
              f"{'% core':>8}{'ticks ms':>9}{'to export s':>12}{'CPU ms':>8}{'ticks ms':>9}"
              f"{'ms/1k seg':>10}{'above idle':>11}")
    print(header)
    print("-" * len(header))

    def per_1k(ms: float, segs: int) -> str:
        return fmt(ms / (segs / 1000) if segs else None, ".2f")

    def row(label: str, segs: int, exported: int, secs: float, during: CpuDelta,
            exp_s: float, to_export: CpuDelta, mark: str) -> None:
        above = to_export.sched_s - idle_sched * exp_s
        exact = "" if during.exact and to_export.exact else "~"
        print(f"{label:<7}{segs:>9}{exported:>9}{secs:>11.2f}{during.sched_s * 1000:>7.1f}"
              f"{exact:1}{during.sched_s / secs * 100 if secs else 0:>7.2f}%"
              f"{during.stat_s * 1000:>9.0f}{exp_s:>12.2f}"
              f"{to_export.sched_s * 1000:>7.1f}{exact:1}{to_export.stat_s * 1000:>9.0f}"
              f"{per_1k(to_export.sched_s * 1000, segs):>10}"
              f"{per_1k(above * 1000, segs):>11}{mark}")

    def total(deltas: list[CpuDelta]) -> CpuDelta:
        return CpuDelta(sum(d.stat_s for d in deltas), sum(d.sched_s for d in deltas),
                        all(d.exact for d in deltas))

    for i, c in enumerate(cpu, 1):
        row(str(i), c.segments, c.exported, c.seconds, c.cpu, c.to_export_s,
            c.cpu_to_export, " !" if c.foreign else "")
    segs = sum(c.segments for c in cpu)
    secs = sum(c.seconds for c in cpu)
    exp_s = sum(c.to_export_s for c in cpu)
    during = total([c.cpu for c in cpu])
    to_export = total([c.cpu_to_export for c in cpu])
    row("total", segs, sum(c.exported for c in cpu), secs, during, exp_s, to_export, "")
    print("(CPU ms: utime+stime at ns resolution: the schedstat run time of the agent's "
          "threads, which the kernel's utime+stime add up to; ~ where a thread came or "
          "went; ticks ms: utime+stime as /proc/PID/stat prints it, in 10 ms ticks; "
          "transfer: from its start until its sockets settled; to export: until the sink "
          "held its counts, one more drain and export; ms/1k seg: CPU ms to export per 1000 "
          "retransmitted segments; above idle: minus the idle rate over the same time)")
    print()
    print(f"agent CPU during the {len(cpu)} lossy transfers ({secs:.2f}s in all): "
          f"{fmt(during.sched_s / secs * 100 if secs else None)} % of one core "
          f"(idle {idle_sched * 100:.2f} %; in /proc/PID/stat ticks "
          f"{fmt(during.stat_s / secs * 100 if secs else None)} %)")
    print(f"agent CPU per 1000 retransmitted segments, until exported: "
          f"{per_1k(to_export.sched_s * 1000, segs)} ms, above idle "
          f"{per_1k((to_export.sched_s - idle_sched * exp_s) * 1000, segs)} ms (ticks: "
          f"{per_1k(to_export.stat_s * 1000, segs)} ms)")
    mismatched = [f"{i} ({kind}: exported {exported} of {segments})"
                  for i, (s, c) in enumerate(zip(stats, cpu, strict=True), 1)
                  for kind, exported, segments in (("stats", s.exported, s.segments),
                                                   ("CPU", c.exported, c.segments))
                  if exported != segments]
    if mismatched:
        print(f"warning: rounds {', '.join(mismatched)}: the count exported for the "
              "transfer's port differs from the namespace's RetransSegs - TCPRetransFail")


# -- the suite ---------------------------------------------------------------------------


def run_suite(args: argparse.Namespace, machine_shown: bool) -> int:
    require("ip", "nft", "bpftool")
    bcc = import_bcc()
    suite_heading("tcp: the TCP retransmit probe", bcc, machine_shown)
    sysctl_before = stats_sysctl()
    print(f"load:    {args.tcp_rounds} rounds x 2 transfers of {args.tcp_mbytes} MiB over one "
          f"connection in a private netns, loopback MTU {LO_MTU}, nftables dropping "
          f"{args.tcp_drop} % of the packets to the server (tests/helpers/netns.py)")
    print("method:  (a) bpftool run_cnt/run_time_ns of the agent's programs with BPF "
          "run-time stats on for the stats transfer only; (b) the agent's utime+stime "
          "over the other transfer, stats off; see bench/tcp.py")
    print(f"stats:   kernel.bpf_stats_enabled = {sysctl_before} before the run"
          + ("  (already on: the CPU transfers run with the accounting too)"
             if sysctl_before else ""))
    started = time.monotonic()
    namespaces_before = set(leftover_namespaces())
    life = args.tcp_rounds * (2 * TRANSFER_TIMEOUT + EXPORT_TIMEOUT) + args.tcp_idle + 120
    with tempfile.TemporaryDirectory(prefix="otel-ebpf-bench-") as tmp, otlp_sink() as sink:
        config = agent_config("tcp_retransmit", {"interval": PROBE_INTERVAL},
                              endpoint=sink.endpoint, export_interval=EXPORT_INTERVAL)
        with AgentProcess(config, Path(tmp), "agent-tcp", life) as agent:
            agent.wait_ready()
            prog_ids = prog_ids_of(agent.pid)
            names = {i: n for i, (n, *_) in program_stats(prog_ids).items()}
            missing = {"on_retransmit", "on_send", "on_recv"} - set(names.values())
            if missing:
                raise BenchError(f"the agent's programs {names} lack {sorted(missing)}")
            print(f"agent:   {agent_command_for_report(agent)}")
            print(f"config:  only tcp_retransmit (interval {PROBE_INTERVAL}, other keys "
                  f"default); OTLP/gRPC to the sink every {EXPORT_INTERVAL}; programs "
                  + ", ".join(f"{n} ({i})" for i, n in sorted(names.items())))
            print(flush=True)
            results = measure(args, agent, sink, prog_ids, names)
            code = agent.stop()
            if code != 0:
                raise BenchError(f"the agent exited with {code}\n{agent.log_tail()}")
            errors = agent.errors()
        left = wait_programs_gone(prog_ids)
        if left:
            raise BenchError(f"BPF programs {sorted(left)} of the agent outlived it")
    if stats_sysctl() != sysctl_before:
        raise BenchError(f"kernel.bpf_stats_enabled is {stats_sysctl()} after the run, "
                         f"{sysctl_before} before")
    if set(leftover_namespaces()) - namespaces_before:
        raise BenchError("a network namespace of the bench was left behind: "
                         f"{sorted(set(leftover_namespaces()) - namespaces_before)}")
    if errors:
        print("warning: the agent logged errors:\n  " + "\n  ".join(errors[:5]))
    report(results)
    print(f"took {time.monotonic() - started:.0f}s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="The tcp_retransmit probe's in-kernel cost per program run and per "
                    "retransmit event, and the agent's CPU during a lossy transfer.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    problem = check_arguments(args)
    if problem:
        parser.error(problem)
    return run_standalone("tcp", run_suite, args)


if __name__ == "__main__":
    sys.exit(main())
