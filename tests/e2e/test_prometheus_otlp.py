"""OTLP straight into Prometheus 3 (built from its Go module): its OTLP receiver turns the
agent's exponential histogram into a native histogram, on which PromQL gives the known
workload's exact syscall count and a finite p99 - the same numbers /metrics gives."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from otel_ebpf.endpoints.prometheus import IDENTIFYING
from tests.e2e.agent_config import agent_config
from tests.e2e.test_agent import AgentProcess
from tests.e2e.test_endpoints import N_GETPPID, SLEEPS, run_workload
from tests.peers.prometheus import PrometheusServer, otlp_config, prometheus3

pytestmark = [pytest.mark.e2e, pytest.mark.kernel]

CONFIG = agent_config(
    {"syscall_latency": {"interval": "500ms", "aggregation": "process",
                         "filter": {"comms": ["syscall_workloa"]},
                         "slow_spans": {"enabled": False}}},
    exporter={"interval": "1s"}, endpoints={"enabled": False})


@pytest.fixture(scope="session")
def prometheus3_binary() -> Path:
    return prometheus3()


def test_otlp_into_prometheus3_native_histogram_counts_exactly(
        tmp_path: Path, syscall_workload: Path, prometheus3_binary: Path) -> None:
    with PrometheusServer(otlp_config(list(IDENTIFYING)), binary=prometheus3_binary,
                          extra_args=["--web.enable-otlp-receiver"]) as prometheus:
        agent = AgentProcess(tmp_path, config_text=CONFIG, env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"{prometheus.url}/api/v1/otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})
        try:
            agent.wait_for_log("probe syscall_latency attached")
            pid, _ = run_workload(syscall_workload)
            selector = f'{{linux_syscall_name="getppid",process_pid="{pid}"}}'
            count = f"histogram_count(linux_syscall_duration_seconds{selector})"
            found = prometheus.wait_for(count, N_GETPPID)
            assert [r["value"] for r in found] == [N_GETPPID], (found, prometheus.query(
                '{__name__=~"linux_syscall.*"}'), "".join(agent.stderr))
            sleeps = prometheus.wait_for(count.replace("getppid", "clock_nanosleep"), SLEEPS)
            assert [r["value"] for r in sleeps] == [SLEEPS], sleeps
            # a native histogram: no classic _bucket series came with it
            assert prometheus.query(f"linux_syscall_duration_seconds_bucket{selector}") == []
            p99 = prometheus.query(
                f"histogram_quantile(0.99, linux_syscall_duration_seconds{selector})")
            assert len(p99) == 1 and math.isfinite(p99[0]["value"]), p99
            assert 0 < p99[0]["value"] < 1, p99
            labels = found[0]["metric"]
            assert labels["process_executable_name"] in ("syscall_workload",
                                                         "syscall_workloa")
            code, _ = agent.stop()
            assert code == 0, "".join(agent.stderr)
        finally:
            agent.kill()
