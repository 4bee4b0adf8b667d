"""Every PromQL expression of the Grafana dashboards returns data from a live agent: the
scrape dashboard against Debian's Prometheus scraping /metrics, the OTLP one against
Prometheus 3 receiving the agent's OTLP, each while a known syscall workload runs and a
lossy TCP transfer retransmits (in a private network namespace)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from otel_ebpf.endpoints.prometheus import IDENTIFYING
from tests.deploy.test_grafana import dashboard_expressions, substituted
from tests.e2e.agent_config import agent_config
from tests.e2e.test_agent import AgentProcess
from tests.e2e.test_endpoints import run_workload
from tests.e2e.test_tcp_agent import lossy_transfer
from tests.helpers.netns import NetnsUnavailable, lossy_netns
from tests.peers.process import free_port
from tests.peers.prometheus import PrometheusServer, otlp_config, prometheus3, scrape_config

pytestmark = [pytest.mark.e2e, pytest.mark.kernel]


@pytest.mark.parametrize("source", ["scrape", "otlp"])
def test_every_dashboard_expression_returns_data(tmp_path: Path, syscall_workload: Path,
                                                 source: str) -> None:
    port = free_port()
    if source == "scrape":
        server = PrometheusServer(scrape_config(port))
        env: dict[str, str] = {}
    else:
        server = PrometheusServer(otlp_config(list(IDENTIFYING)), binary=prometheus3(),
                                  extra_args=["--web.enable-otlp-receiver"])
    config = agent_config(
        {"syscall_latency": {"interval": "500ms", "slow_spans": {"enabled": False}},
         "tcp_retransmit": {"interval": "1s"}},
        exporter={"enabled": source == "otlp", "interval": "1s"},
        endpoints={"enabled": source == "scrape", "port": port})
    with server as prometheus:
        if source == "otlp":
            env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"{prometheus.url}/api/v1/otlp",
                   "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
        agent = AgentProcess(tmp_path, config_text=config, env=env)
        try:
            agent.wait_for_log("probe tcp_retransmit attached")
            agent.wait_for_log("probe syscall_latency attached")
            run_workload(syscall_workload)
            peer_port = random.randint(20000, 60000)  # a private namespace: any port
            try:
                with lossy_netns(peer_port, drop_percent=5, lo_mtu=1500) as ns:
                    transfer = lossy_transfer(ns)
            except NetnsUnavailable as exc:
                pytest.fail(f"cannot make the test namespace: {exc}")
            assert transfer.retrans_segs > 0
            expressions = [substituted(e) for e in dashboard_expressions(source)]
            empty = expressions
            deadline = time.monotonic() + 90
            while empty and time.monotonic() < deadline:
                empty = [e for e in expressions if not prometheus.query(e)]
                time.sleep(1)
            assert not empty, (empty, "".join(agent.stderr[-20:]))
            code, _ = agent.stop()
            assert code == 0
        finally:
            agent.kill()
