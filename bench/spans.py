"""`make bench` spans suite (issue #5): slow-syscall spans exported per second without loss
(target >= 5,000/s on this machine), and the agent's CPU per span.

Method
------
The real agent (`otel-ebpf run` as a process) runs only syscall_latency, its slow_spans
threshold for getppid set to 1 ns so that every getppid is a span, the kernel rate limit
out of the way (rate_per_second and burst 1,000,000), the comm filter on the generator,
and everything else at the product's defaults: event buffer 1 MiB, span queue 8192, the
probe host's event batching (SPAN_POLL_S), export (SPAN_EXPORT_S) and batch (SPAN_BATCH)
constants. It
exports OTLP/gRPC to an in-process sink (tests/peers/otlp_sink.py), metrics every 1 s so
its self-metrics arrive promptly.

bench/span_storm.c then makes K getppid calls a second for --span-seconds seconds, paced
every millisecond with an absolute clock_nanosleep, at increasing K (--span-rates). A step
ends once the sink holds every span of that generator (counted by name and thread.id, the
generator being single-threaded) or none arrived for NO_PROGRESS_S. A step is lossless when
received == offered and the agent's self-metrics otel_ebpf.spans.dropped (queue_full,
export_refused, shutdown) and otel_ebpf.probe.lost_events{probe=syscall_latency} (buffer_full,
rate_limited, map_full) did not grow during it. The steps stop at the first loss; the
result is the highest lossless K.

The agent's CPU per span is its utime+stime (/proc/PID/stat, every thread) over a step,
from the generator's start until the last span arrived, divided by the spans received. It
includes the agent's background work over that time (metrics export every second; its idle
CPU is printed for scale) but not the in-kernel cost of the probe, which the generator pays.
Nothing is pinned: the agent, the generator and the sink share the machine's CPUs.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    BENCH_DIR,
    BUILD_DIR,
    AgentProcess,
    BenchError,
    agent_command_for_report,
    agent_config,
    bpftool_json,
    build_c,
    fmt,
    import_bcc,
    last_counter_values,
    otlp_sink,
    require,
    suite_heading,
    verdict,
)

STORM_SRC = BENCH_DIR / "span_storm.c"
STORM_BIN = BUILD_DIR / "span_storm"
STORM_COMM = "span_storm"
SPAN_NAME = "syscall getppid"
TARGET = 5000  # spans/s without loss
METRICS_INTERVAL = 1.0  # s
NO_PROGRESS_S = 3.0  # the daemon exports at least every SPAN_EXPORT_S (0.5 s) while spans wait
DRAIN_TIMEOUT = 60.0
IDLE_SECONDS = 3.0
DROP_REASONS = ("queue_full", "export_refused", "shutdown")
LOSS_REASONS = ("buffer_full", "rate_limited", "map_full")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--span-rates", default="1000,2000,5000,10000,15000,20000,30000,50000",
                        help="spans: getppid calls (spans) per second to offer, in order, "
                             "comma-separated (default: %(default)s)")
    parser.add_argument("--span-seconds", type=float, default=5.0,
                        help="spans: seconds per rate (default: %(default)s)")
    parser.add_argument("--span-all-rates", action="store_true",
                        help="spans: keep going after the first lossy rate")


def rates_of(args: argparse.Namespace) -> list[int]:
    return [int(r) for r in str(args.span_rates).split(",") if r.strip()]


def check_arguments(args: argparse.Namespace) -> str | None:
    try:
        rates = rates_of(args)
    except ValueError:
        return "--span-rates must be comma-separated integers"
    if not rates or min(rates) < 1 or args.span_seconds < 1:
        return "--span-rates must be positive and --span-seconds >= 1"
    return None


def agent_settings() -> dict[str, Any]:
    return {
        "filter": {"comms": [STORM_COMM]},
        "slow_spans": {"thresholds": {"getppid": "1ns"}, "rate_per_second": 1_000_000,
                       "burst": 1_000_000},
    }


class SpanCounter:
    """Spans named SPAN_NAME the sink received, by thread.id; reads each request once."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self.by_tid: dict[int, int] = {}
        self.other = 0
        self._seen = 0

    def update(self) -> None:
        requests = self.sink.trace_requests
        for request in requests[self._seen:]:
            for rs in request.resource_spans:
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        if span.name != SPAN_NAME:
                            self.other += 1
                            continue
                        tid = next((a.value.int_value for a in span.attributes
                                    if a.key == "thread.id"), -1)
                        self.by_tid[tid] = self.by_tid.get(tid, 0) + 1
        self._seen = len(requests)

    def clear(self) -> None:
        self.sink.clear()
        self._seen = 0
        self.by_tid.clear()


def product_constants() -> str:
    """The agent's span pipeline constants and the span config defaults, as running."""
    from otel_ebpf import probe_host
    from otel_ebpf.config import ExporterConfig
    from otel_ebpf.export import traces
    from otel_ebpf.probes.slow_syscalls import SlowSpansConfig

    defaults = SlowSpansConfig()
    queue = ExporterConfig().queue.spans
    constants = (("SPAN_POLL_S", probe_host), ("SPAN_EXPORT_S", traces), ("SPAN_BATCH", traces))
    return (", ".join(f"{n} {getattr(module, n, '?')}" for n, module in constants)
            + f"; exporter.queue.spans {queue.max_items} spans / {queue.max_bytes} bytes, "
            f"buffer_size "
            f"{defaults.buffer_size} bytes (defaults)")


def self_metrics(sink: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    # one series per (reason, workload): summed per reason
    for key, value in last_counter_values(sink, "otel_ebpf.spans.dropped").items():
        reason = str(dict(key).get("reason"))
        out[reason] = out.get(reason, 0.0) + value
    for key, value in last_counter_values(sink, "otel_ebpf.probe.lost_events").items():
        attrs = dict(key)
        if attrs.get("probe") == "syscall_latency":
            out[str(attrs.get("reason"))] = value
    return out


@dataclass
class Step:
    rate: int
    offered: int
    elapsed: float  # the generator's
    max_lag_ms: float
    received: int = 0
    drain_s: float = 0.0  # from the generator's end to the last span
    agent_cpu_s: float = 0.0
    wall_s: float = 0.0
    drops: dict[str, float] = field(default_factory=dict)

    @property
    def lossless(self) -> bool:
        return self.received == self.offered and not any(self.drops.values())

    @property
    def us_per_span(self) -> float | None:
        return self.agent_cpu_s / self.received * 1e6 if self.received else None


def run_step(rate: int, seconds: float, agent: AgentProcess, counter: SpanCounter,
             baseline: dict[str, float]) -> tuple[Step, dict[str, float]]:
    cpu0, t0 = agent.cpu_seconds(), time.monotonic()
    cmd = [str(STORM_BIN), str(rate), f"{seconds:g}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=seconds * 3 + 60)
    ended = time.monotonic()
    if proc.returncode != 0:
        raise BenchError(f"the generator failed ({proc.returncode}): {shlex.join(cmd)}")
    calls, elapsed, lag = out.split()
    step = Step(rate, int(calls), float(elapsed), float(lag))
    last_count, last_change = -1, ended
    while True:
        counter.update()
        received = counter.by_tid.get(proc.pid, 0)
        now = time.monotonic()
        if received != last_count:
            last_count, last_change = received, now
        if (received >= step.offered or now - last_change > NO_PROGRESS_S
                or now - ended > DRAIN_TIMEOUT or not agent.alive()):
            break
        time.sleep(0.1)
    step.received = received
    step.drain_s = max(0.0, last_change - ended)
    step.agent_cpu_s = agent.cpu_seconds() - cpu0
    step.wall_s = time.monotonic() - t0
    # two metrics exports later the counters include everything of this step
    time.sleep(2.5 * METRICS_INTERVAL)
    totals = self_metrics(counter.sink)
    step.drops = {r: totals.get(r, 0) - baseline.get(r, 0)
                  for r in (*DROP_REASONS, *LOSS_REASONS)}
    return step, totals


def report(steps: list[Step], idle_pct: float) -> None:
    print()
    header = (f"{'spans/s':>8}{'offered':>9}{'received':>10}{'lost':>7}{'lag ms':>8}"
              f"{'drain s':>8}{'agent CPU':>10}{'us/span':>9}  self-metric drops")
    print(header)
    print("-" * (len(header) + 8))
    for s in steps:
        drops = ", ".join(f"{r} {v:.0f}" for r, v in s.drops.items() if v) or "none"
        print(f"{s.rate:>8}{s.offered:>9}{s.received:>10}{s.offered - s.received:>7}"
              f"{s.max_lag_ms:>8.1f}{s.drain_s:>8.1f}"
              f"{s.agent_cpu_s / s.wall_s * 100:>9.1f}%"
              f"{fmt(s.us_per_span, '.1f'):>9}  {drops}")
    print(f"(agent CPU: utime+stime per wall second over the step, its idle level with metrics "
          f"every {METRICS_INTERVAL:g}s being {idle_pct:.2f} %; lag: the generator's worst delay "
          "behind its schedule; drain: from the generator's end to the last span at the sink)")
    good = [s for s in steps if s.lossless]
    # the highest rate below which every step was lossless
    best = None
    for s in steps:
        if not s.lossless:
            break
        best = s
    print()
    if best is None:
        print(f"target: {'spans/s without loss >= 5000':<40} "
              f"{verdict(False, 'loss at every rate tried')}")
    else:
        capped = "" if len(good) < len(steps) else ", the highest rate tried"
        print(f"target: {'spans/s without loss >= 5000':<40} "
              f"{verdict(best.rate >= TARGET, f'{best.rate}/s{capped}')}")
        print(f"result: agent CPU per span at {best.rate}/s: {best.us_per_span:.1f} us "
              f"({best.agent_cpu_s:.2f} s CPU for {best.received} spans, background included)")
    lossy = next((s for s in steps if not s.lossless), None)
    if lossy is not None:
        where = ", ".join(f"{r} {v:.0f}" for r, v in lossy.drops.items() if v)
        unexplained = (lossy.offered - lossy.received) - sum(lossy.drops.values())
        print(f"first loss at {lossy.rate}/s: {lossy.offered - lossy.received} of "
              f"{lossy.offered} spans missing; self-metrics: {where or 'no drops counted'}"
              + (f"; {unexplained:.0f} not counted by any self-metric" if unexplained > 0
                 else ""))


def run_suite(args: argparse.Namespace, machine_shown: bool) -> int:
    require("gcc", "taskset")
    bcc = import_bcc()
    build_c(STORM_SRC, STORM_BIN)
    suite_heading("spans: slow-syscall spans (issue #5)", bcc, machine_shown)
    rates = rates_of(args)
    print(f"load:    {STORM_BIN} RATE {args.span_seconds:g}  for RATE in "
          f"{', '.join(map(str, rates))} (stopping at the first loss"
          f"{'' if not args.span_all_rates else ': off'})")
    print("method:  every getppid of the generator is a span (threshold 1 ns); count spans at "
          "the sink vs calls made, plus the agent's drop/loss self-metrics; see bench/spans.py")
    started = time.monotonic()
    steps: list[Step] = []
    with tempfile.TemporaryDirectory(prefix="otel-ebpf-bench-") as tmp, otlp_sink() as sink:
        life = len(rates) * (args.span_seconds * 3 + 20) + 120
        config = agent_config("syscall_latency", agent_settings(), endpoint=sink.endpoint,
                              export_interval=f"{METRICS_INTERVAL:g}s")
        with AgentProcess(config, Path(tmp), "agent-spans", life) as agent:
            agent.wait_ready()
            prog_ids = {int(p["id"]) for p in bpftool_json("prog", "show")
                        if any(h.get("pid") == agent.pid for h in p.get("pids", []))}
            print(f"agent:   {agent_command_for_report(agent)}")
            print("config:  only syscall_latency; slow_spans thresholds {getppid: 1ns}, "
                  f"rate_per_second/burst 1000000, filter comms [{STORM_COMM}], other keys "
                  f"default; OTLP/gRPC to the sink, metrics every {METRICS_INTERVAL:g}s")
            print(f"product: {product_constants()}")
            counter = SpanCounter(sink)
            cpu0, t0 = agent.cpu_seconds(), time.monotonic()
            time.sleep(IDLE_SECONDS)
            idle_pct = (agent.cpu_seconds() - cpu0) / (time.monotonic() - t0) * 100
            baseline = self_metrics(sink)
            counter.clear()
            print(flush=True)
            for rate in rates:
                step, baseline = run_step(rate, args.span_seconds, agent, counter, baseline)
                steps.append(step)
                counter.clear()
                print(f"  {rate}/s: {step.received} of {step.offered} spans"
                      f"{'' if step.lossless else ' (loss)'}", flush=True)
                if not agent.alive():
                    raise BenchError(f"the agent died\n{agent.log_tail()}")
                if not step.lossless and not args.span_all_rates:
                    break
            code = agent.stop()
            if code != 0:
                raise BenchError(f"the agent exited with {code}\n{agent.log_tail()}")
            errors = agent.errors()
        left = prog_ids & {int(p["id"]) for p in bpftool_json("prog", "show")}
        if left:
            raise BenchError(f"BPF programs {sorted(left)} of the agent outlived it")
    if errors:
        print("warning: the agent logged errors:\n  " + "\n  ".join(errors[:5]))
    report(steps, idle_pct)
    print(f"took {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":  # pragma: no cover - run through bench/run.py
    raise SystemExit("run it as: .venv/bin/python bench/run.py --suite spans")
