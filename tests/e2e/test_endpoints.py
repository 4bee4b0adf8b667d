"""The agent's /metrics scraped by a real Prometheus (Debian's package): PromQL sees the
exact syscall count of a known workload and a finite p99 from histogram_quantile, at the
kernel's own bucket boundaries; nothing a process was given (arguments, environment)
reaches a label; /healthz and /readyz answer; with the endpoints off, aiohttp stays out of
the agent."""

from __future__ import annotations

import json
import math
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.agent_config import agent_config
from tests.e2e.test_agent import AgentProcess
from tests.peers.process import free_port
from tests.peers.prometheus import PrometheusServer, scrape_config

pytestmark = [pytest.mark.e2e, pytest.mark.kernel]

N_GETPPID = 3217
SLEEPS = 3
SECRET_ENV = "s3cr3t-from-the-environment"
SECRET_ATTRIBUTE = "s3cr3t-resource-attribute"
# what a series may be labelled with: the metric's attributes and the workload's identity
ALLOWED_LABELS = {"__name__", "job", "instance", "le", "linux_syscall_name", "process_pid",
                  "process_executable_name", "service_name", "host_name"}


def agent_yaml(endpoints: bool, port: int) -> str:
    """The workload's syscalls per process, on /metrics only; its command line is taken
    (process.command_args) and must stay out of /metrics all the same."""
    return agent_config(
        {"syscall_latency": {"interval": "500ms", "aggregation": "process",
                             "filter": {"comms": ["syscall_workloa"]}}},
        exporter={"enabled": False}, identity={"process": {"command_args": True}},
        endpoints={"enabled": endpoints, "port": port})


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def run_workload(binary: Path) -> tuple[int, str]:
    """The workload with a secret in its environment; (pid, its command line)."""
    argv = [str(binary), str(N_GETPPID), str(SLEEPS), "20"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True,
                            env={"PATH": "/usr/bin:/bin", "API_TOKEN": SECRET_ENV})
    out, _ = proc.communicate(timeout=30)
    assert out.strip() == "done"
    return proc.pid, " ".join(argv)


def test_prometheus_scrapes_exact_counts_and_finite_p99(
        tmp_path: Path, syscall_workload: Path) -> None:
    port = free_port()
    agent = AgentProcess(tmp_path, config_text=agent_yaml(True, port),
                         env={"OTEL_RESOURCE_ATTRIBUTES":
                              f"deployment.environment={SECRET_ATTRIBUTE}"})
    try:
        agent.wait_for_log("probe syscall_latency attached")
        agent.wait_for_log(f"endpoints: serving /metrics, /healthz, /readyz on "
                           f"http://127.0.0.1:{port}")
        base = f"http://127.0.0.1:{port}"
        status, body = http_get(base + "/healthz")
        assert status == 200 and json.loads(body)["alive"] is True, body
        status, body = http_get(base + "/readyz")
        assert status == 200, body
        assert json.loads(body) == {"ready": True, "probes": {"syscall_latency": "attached"},
                                    "alive": True, "metrics_export": "disabled"}
        maps = Path(f"/proc/{agent.proc.pid}/maps").read_text()
        assert "aiohttp" in maps  # the server's, loaded when it started

        with PrometheusServer(scrape_config(port)) as prometheus:
            pid, command_line = run_workload(syscall_workload)
            getppid = (f'linux_syscall_duration_seconds_count{{linux_syscall_name="getppid",'
                       f'process_pid="{pid}"}}')
            found = prometheus.wait_for(getppid, N_GETPPID)
            assert [r["value"] for r in found] == [N_GETPPID], found
            sleeps = prometheus.wait_for(getppid.replace("getppid", "clock_nanosleep"), SLEEPS)
            assert [r["value"] for r in sleeps] == [SLEEPS], sleeps

            # a few more scrapes: the count never went past the truth, and stays there
            prometheus.wait_for(f"count_over_time({getppid}[5m]) >= 3", 3, timeout=30)
            assert [r["value"] for r in prometheus.query(f"max_over_time({getppid}[5m])")
                    ] == [N_GETPPID]
            assert prometheus.query(getppid)[0]["value"] == N_GETPPID

            selector = f'{{linux_syscall_name="getppid",process_pid="{pid}"}}'
            buckets = prometheus.query(f"linux_syscall_duration_seconds_bucket{selector}")
            bounds = [b["metric"]["le"] for b in buckets]
            assert "+Inf" in bounds and len(bounds) >= 2
            for le in bounds:  # every boundary is one of the kernel's: 2^(i/4) s
                if le != "+Inf":
                    quarter_octaves = 4 * math.log2(float(le))
                    assert abs(quarter_octaves - round(quarter_octaves)) < 1e-9, le
            assert max(b["value"] for b in buckets) == N_GETPPID  # +Inf: the count

            p99 = prometheus.query(
                f"histogram_quantile(0.99, linux_syscall_duration_seconds_bucket{selector})")
            assert len(p99) == 1 and math.isfinite(p99[0]["value"]), p99
            assert 0 < p99[0]["value"] < 1, p99
            slow = prometheus.query(
                "histogram_quantile(0.99, linux_syscall_duration_seconds_bucket"
                f'{{linux_syscall_name="clock_nanosleep",process_pid="{pid}"}})')
            # 20 ms sleeps: the bucket above 2^(-23/4) s = 18.6 ms at least
            assert math.isfinite(slow[0]["value"]) and slow[0]["value"] > 0.0185, slow

            targets = prometheus.api("targets")["activeTargets"]
            assert [t["health"] for t in targets] == ["up"], targets
            series = prometheus.api("series", **{"match[]": f'{{process_pid="{pid}"}}'})
            assert series and all(set(s) <= ALLOWED_LABELS for s in series), series
            # the executable's name, or the kernel's 15-character one if it exited first
            assert {s["process_executable_name"] for s in series} <= {"syscall_workload",
                                                                     "syscall_workloa"}

        # nothing the workload was given, nor configured resource attributes, in /metrics
        status, text = http_get(base + "/metrics")
        assert status == 200 and f'process_pid="{pid}"' in text
        for secret in (SECRET_ENV, SECRET_ATTRIBUTE, command_line, str(syscall_workload)):
            assert secret not in text
        assert "linux_syscall_duration_seconds_bucket" in text
        assert "otel_ebpf_probe_map_fill_ratio" in text  # self-metrics
        code, _ = agent.stop()
        assert code == 0, "".join(agent.stderr)
    finally:
        agent.kill()


def test_endpoints_off_serve_nothing_and_keep_aiohttp_out(
        tmp_path: Path, syscall_workload: Path) -> None:
    port = free_port()
    agent = AgentProcess(tmp_path, config_text=agent_yaml(False, port))
    try:
        agent.wait_for_log("probe syscall_latency attached")
        time.sleep(1)  # any lazy start-up work done
        maps = Path(f"/proc/{agent.proc.pid}/maps").read_text()
        assert "aiohttp" not in maps
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
        assert not any("endpoints:" in line for line in agent.stderr)
        code, _ = agent.stop()
        assert code == 0
    finally:
        agent.kill()
