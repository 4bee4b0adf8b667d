"""The agent's three signals through the gateway collector of deploy/collector/ (the binary
its builder manifest makes, on its repository config; tests/peers/gateway.py) to a sink on
loopback: agent -> gateway -> sink.

Known truths: a helper in a cgroup of its own makes exactly N getppid calls and K sleeps
(the slow calls), so its workload's series counts N and K spans arrive, each as long as
its sleep; a CPU-bound helper's profile samples arrive, about as many as its CPU time at
the sampling frequency, with its two functions on their stacks.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.json_format import MessageToDict

from otel_ebpf import config as agent_config
from otel_ebpf import probes as registry
from tests.e2e.test_agent import AgentProcess
from tests.helpers.cgroups import run_in
from tests.helpers.processes import paused, reap
from tests.peers.gateway import GatewayCollector
from tests.peers.otelcol import resolve_profile_samples
from tests.peers.otlp_sink import OtlpSink, attrs_to_dict

pytestmark = [pytest.mark.e2e, pytest.mark.kernel]

DEFAULT_PROBES = registry.enabled_names(agent_config.Config())

N_GETPPID = 4321
K_SLEEPS, SLEEP_MS = 3, 30
FREQUENCY = 199
SLOW_NAMES = ("syscall nanosleep", "syscall clock_nanosleep")
CONFIG = f"""
probes:
  syscall_latency:
    interval: 500ms
    slow_spans:
      threshold: 1s          # only the helper's sleeps are slow calls, whatever the load
      thresholds: {{nanosleep: 10ms, clock_nanosleep: 10ms}}
      include: [nanosleep, clock_nanosleep]
  cpu_profile:
    frequency: {FREQUENCY}
    max_samples: 16384     # drains late on a loaded machine lose no sample
summary:
  enabled: false
"""


def workload_count(sink: OtlpSink, cgroup: Path, syscall: str,
                   executable: str = "syscall_workload") -> int:
    """The latest count of `syscall` in the series of `executable` in the workload
    `cgroup` (default aggregation: one series per workload and executable, whatever its
    processes)."""
    path = "/" + cgroup.name
    counts = [p.count for r, p in sink.metrics_points("linux.syscall.duration")
              if r.get("linux.cgroup.path") == path
              and attrs_to_dict(p.attributes).get("linux.syscall.name") == syscall
              and attrs_to_dict(p.attributes).get("process.executable.name") == executable]
    return max(counts, default=0)


class PidSamples:
    """The profile samples of one process in what the sink received, resolved (stack of
    function names, values, attributes) as the collector's JSON is. Each request is read
    once, outside the sink's lock (a whole machine's profile takes a while to resolve, and
    the gateway's export must not wait for it)."""

    def __init__(self, sink: OtlpSink, pid: int) -> None:
        self.sink, self.pid = sink, pid
        self.samples: list[dict[str, Any]] = []
        self._seen = 0

    def update(self) -> int:
        """Read the new requests; the samples counted so far."""
        requests = self.sink.profiles_requests
        for request in requests[self._seen:]:
            self.samples += [s for s in resolve_profile_samples(MessageToDict(request))
                             if s["attributes"].get("process.pid") == self.pid]
        self._seen = len(requests)
        return self.count()

    def count(self, function: str | None = None) -> int:
        return sum(sum(s["values"]) for s in self.samples
                   if function is None or function in s["stack"])


def cpu_bound(cpu_hot: Path, sink: OtlpSink) -> tuple[PidSamples, float]:
    """`cpu_hot split` (3:1 in CPU time in hot_a and hot_b), held stopped half-way until its
    first samples arrived symbolized (tests.helpers.processes); its samples and CPU
    seconds."""
    proc = subprocess.Popen([str(cpu_hot), "split", "3"], stdout=subprocess.DEVNULL)
    samples = PidSamples(sink, proc.pid)
    with paused([proc], 1):
        deadline = time.monotonic() + 30
        while not samples.count("hot_a") and time.monotonic() < deadline:
            samples.update()
            time.sleep(0.25)
    cpu_s = reap(proc)
    assert proc.returncode == 0
    return samples, cpu_s


def test_metrics_spans_and_profiles_pass_through_the_gateway(
        gateway: GatewayCollector, otlp_sink: OtlpSink, cgroup: Path,
        syscall_workload: Path, cpu_hot: Path, tmp_path: Path) -> None:
    config = tmp_path / "gateway-agent.yaml"
    config.write_text(CONFIG)
    agent = AgentProcess(tmp_path, "--config", str(config), "--export-interval", "1s",
                         env=gateway.grpc_env)
    try:
        agent.wait_for_log(f" running: probes {', '.join(DEFAULT_PROBES)}", timeout=120)
        pid, out = run_in(cgroup, [syscall_workload, N_GETPPID, K_SLEEPS, SLEEP_MS])
        assert out.strip() == "done"
        samples, cpu_s = cpu_bound(cpu_hot, otlp_sink)

        def spans() -> list[Any]:
            return [s for r, s in otlp_sink.spans() if s.name in SLOW_NAMES
                    and r.get("process.pid") == pid]

        def arrived() -> bool:
            return (workload_count(otlp_sink, cgroup, "getppid") == N_GETPPID
                    and len(spans()) >= K_SLEEPS)

        # the gateway batches for up to 5 s (its batch processor's timeout)
        assert otlp_sink.wait_for(arrived, timeout=30), (
            workload_count(otlp_sink, cgroup, "getppid"), len(spans()), "".join(agent.stderr))
        expected = cpu_s * FREQUENCY
        deadline = time.monotonic() + 30
        while samples.update() < 0.65 * expected and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(6)  # one more gateway batch: nothing beyond the truth arrives later
        assert workload_count(otlp_sink, cgroup, "getppid") == N_GETPPID
        assert workload_count(otlp_sink, cgroup, "clock_nanosleep") == K_SLEEPS
        slow = spans()
        assert len(slow) == K_SLEEPS
        for span in slow:
            assert SLEEP_MS * 1e6 <= span.end_time_unix_nano - span.start_time_unix_nano \
                < SLEEP_MS * 1e6 + 50e6
        # about as many samples as its CPU time at the frequency (not exactly: the timer
        # ticks on while a busy host steals the CPU, which its CPU time leaves out), none
        # twice, in its two functions
        total, hot_a, hot_b = samples.update(), samples.count("hot_a"), samples.count("hot_b")
        print(f"through the gateway: {total} samples of {expected:.0f} ({cpu_s:.2f} CPU s at "
              f"{FREQUENCY} Hz), hot_a {hot_a}, hot_b {hot_b}")
        assert 0.65 * expected <= total <= 1.35 * expected, (total, expected)
        assert hot_a + hot_b >= 0.9 * total, (hot_a, hot_b, total, samples.samples[:5])
        # 3:1 in CPU time, sampled with binomial noise and a loaded VM's stolen ticks (as
        # in test_agent's profile test: the kernel tests check the split tightly)
        assert abs(hot_a / (hot_a + hot_b) - 0.75) <= 0.15, (hot_a, hot_b)
        assert all("main" in s["stack"] for s in samples.samples if "hot_a" in s["stack"])
        code, _ = agent.stop()
        assert code == 0, "".join(agent.stderr)
    finally:
        agent.kill()
    log = gateway.read_log()
    assert "Everything is ready" in log and "error" not in log.lower(), log[-3000:]
