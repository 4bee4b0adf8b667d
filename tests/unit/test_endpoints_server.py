"""The endpoints' server over real sockets: /metrics from the agent's store, /healthz,
/readyz from the probes and the last export, a port already taken, and the loopback rule."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from otel_ebpf import config as cfg
from otel_ebpf.endpoints.server import Endpoints
from otel_ebpf.enrich.identity import IdentityResolver
from otel_ebpf.export.otlp import OtlpShipper
from otel_ebpf.model import CounterDelta, Workload
from otel_ebpf.probes.tcp_retransmit import RETRANSMITS
from otel_ebpf.signals.metrics import MetricsSignal

NO_PROBES = {"probes": {name: {"enabled": False} for name in
                        ("syscall_latency", "cpu_profile", "tcp_retransmit")}}


@dataclass
class HostState:
    """The part of otel_ebpf.probe_host.ProbeHost the endpoints read (no kernel here)."""

    config: cfg.Config
    probes: list[Any] = field(default_factory=list)
    ages: dict[str, tuple[float, float]] = field(default_factory=dict)

    def drain_ages(self) -> dict[str, tuple[float, float]]:
        return self.ages

    def settings(self) -> list[Any]:
        return []


class AgentState:
    """The endpoints' sources: a probe host view, the real metrics unit and identity."""

    def __init__(self, config: cfg.Config, shipper: Any = None) -> None:
        self.config = config
        self.host = HostState(config)
        self.identity = IdentityResolver(config, {"host.name": "node-1"})
        self.metrics = MetricsSignal(config.exporter, shipper, self.identity.resolver,
                                     lambda _: True, 4, list, 1)
        self.store = self.metrics.store

    def endpoints(self) -> Endpoints:
        return Endpoints(self.config.endpoints, self.host, self.metrics, self.identity)


def make_config(**endpoints: Any) -> cfg.Config:
    return cfg.Config.model_validate({**NO_PROBES, "identity": {"docker": {"enabled": False}},
                                      "endpoints": {"port": 0, **endpoints}})


async def get(url: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, response.headers["Content-Type"], await response.text()


async def test_serves_metrics_health_and_readiness_on_loopback() -> None:
    agent = AgentState(make_config())
    agent.store.add([CounterDelta(RETRANSMITS, Workload(pid=0, cgroup_id=1), {}, 3)], 1, 2)
    endpoints = agent.endpoints()
    assert await endpoints.start()
    try:
        assert endpoints.url is not None and endpoints.url.startswith("http://127.0.0.1:")
        status, content_type, text = await get(endpoints.url + "/metrics")
        assert status == 200 and content_type.startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert [s.value for s in families["linux_tcp_retransmits"].samples
                if s.name.endswith("_total")] == [3]
        assert "process_cpu_time_seconds" in families
        status, _, body = await get(endpoints.url + "/healthz")
        assert status == 200 and json.loads(body) == {"alive": True,
                                                      "metrics_export": "disabled"}
        # no probe enabled, exporter off: ready
        status, _, body = await get(endpoints.url + "/readyz")
        assert status == 200 and json.loads(body)["ready"] is True
        # a collector that does not answer is said, but fails neither check (as in
        # `otel-ebpf health`: the agent keeps counting and delivers when it returns)
        agent.metrics.shipper = OtlpShipper(None, "http://127.0.0.1:1")
        assert json.loads((await get(endpoints.url + "/readyz"))[2])["metrics_export"] == (
            "pending")
        agent.metrics.shipper._report_outage("test: connection refused")
        for path in ("/healthz", "/readyz"):
            status, _, body = await get(endpoints.url + path)
            assert status == 200 and json.loads(body)["metrics_export"] == "failing"
        assert (await get(endpoints.url + "/nothing"))[0] == 404
    finally:
        await endpoints.stop()


async def test_a_stuck_drain_fails_health_and_readiness() -> None:
    agent = AgentState(make_config())
    agent.host.ages = {"syscall_latency": (5.0, 2.0)}
    endpoints = agent.endpoints()
    assert await endpoints.start()
    try:
        assert endpoints.url is not None
        assert (await get(endpoints.url + "/healthz"))[0] == 200
        agent.host.ages["syscall_latency"] = (5.0, 31.0)  # over max(3 intervals, 30 s)
        for path in ("/healthz", "/readyz"):
            status, _, body = await get(endpoints.url + path)
            assert status == 503, body
            assert json.loads(body)["stuck_drains_seconds"] == {"syscall_latency": 31.0}
    finally:
        await endpoints.stop()


async def test_an_enabled_probe_not_attached_is_not_ready() -> None:
    config = cfg.Config.model_validate({"endpoints": {"port": 0},
                                        "identity": {"docker": {"enabled": False}}})
    agent = AgentState(config)
    endpoints = agent.endpoints()
    assert await endpoints.start()
    try:
        assert endpoints.url is not None
        status, _, body = await get(endpoints.url + "/readyz")
        assert status == 503 and '"syscall_latency": "not attached"' in body
    finally:
        await endpoints.stop()


async def test_a_port_in_use_is_reported_and_the_agent_runs_on(
        caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        agent = AgentState(make_config(port=port))
        endpoints = agent.endpoints()
        assert not await endpoints.start()
        await endpoints.stop()
    assert f"cannot listen on 127.0.0.1 port {port}" in caplog.text
    assert "endpoints.port" in caplog.text


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "192.0.2.1", "example.com"])
def test_a_non_loopback_address_is_refused_unless_allowed(address: str) -> None:
    with pytest.raises(ValidationError, match="allow_remote"):
        cfg.Config.model_validate({"endpoints": {"address": address}})
    with pytest.raises(cfg.ConfigError, match="not a loopback address"):
        cfg.load(overrides={("endpoints", "address"): address}, env={})
    allowed = cfg.Config.model_validate({"endpoints": {"address": address,
                                                       "allow_remote": True}})
    assert allowed.endpoints.address == address


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.53", "::1", "localhost",
                                     "::ffff:127.0.0.1"])
def test_loopback_addresses_need_nothing(address: str) -> None:
    assert cfg.Config.model_validate({"endpoints": {"address": address}})


def test_run_exits_2_on_a_non_loopback_bind(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("endpoints:\n  address: 0.0.0.0\n")
    out = subprocess.run([sys.executable, "-m", "otel_ebpf", "run", "--config", str(config)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "endpoints: address '0.0.0.0' is not a loopback address" in out.stderr
    assert "endpoints.allow_remote: true" in out.stderr
    assert "Traceback" not in out.stderr
