"""Fixtures for end-to-end tests: a recording OTLP sink and, in front of it, a rotel
collector or the gateway collector of deploy/collector/; the OpenTelemetry Collector with
profiles; a cgroup of the test's own.

Function-scoped: each starts in milliseconds (the collectors' builds are cached), and a
fresh set per test means no test can see another test's telemetry or inherit a wedged
collector.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_agent import AgentProcess
from tests.helpers.cgroups import own_cgroup
from tests.peers.gateway import GatewayCollector
from tests.peers.gateway import gateway_binary as build_gateway
from tests.peers.otelcol import OtelCollector, ensure_built
from tests.peers.otlp_sink import OtlpSink
from tests.peers.rotel import RotelCollector


@pytest.fixture
def otlp_sink() -> Iterator[OtlpSink]:
    """A started ``OtlpSink`` on a free loopback port; stopped after the test."""
    with OtlpSink() as sink:
        yield sink


@pytest.fixture
def rotel(otlp_sink: OtlpSink, tmp_path: Path) -> Iterator[RotelCollector]:
    """A started rotel collector forwarding everything to the ``otlp_sink`` fixture.

    Rotel's output goes to ``tmp_path/rotel.log`` and is printed at teardown, so pytest
    shows it under "Captured stdout teardown" when a test fails.
    """
    collector = RotelCollector(otlp_sink.endpoint, log_path=tmp_path / "rotel.log")
    with collector:
        yield collector
    print(f"--- rotel-agent output ({collector.log_path}) ---\n{collector.read_log()}")


@pytest.fixture(scope="session")
def otelcol_binary() -> Path:
    """The OpenTelemetry Collector built from Go modules (cached outside the repo)."""
    return ensure_built()


@pytest.fixture
def otelcol(otelcol_binary: Path, tmp_path: Path) -> Iterator[OtelCollector]:
    """A started OpenTelemetry Collector with profiles support, debug + file exporters."""
    collector = OtelCollector(binary=otelcol_binary, log_path=tmp_path / "otelcol.log")
    with collector:
        yield collector
    print(f"--- otelcol output ({collector.log_path}) ---\n{collector.read_log()}")


@pytest.fixture
def cgroup() -> Iterator[Path]:
    """A cgroup v2 directory of this test's own (tests.helpers.cgroups.run_in runs a helper
    in it), for a probe's kernel filter or a workload series of its own."""
    with own_cgroup("e2e") as path:
        yield path


@pytest.fixture(scope="session")
def gateway_binary() -> Path:
    """The gateway collector of deploy/collector/ (built once, cached outside the repo)."""
    return build_gateway()


@pytest.fixture
def gateway(gateway_binary: Path, otlp_sink: OtlpSink, tmp_path: Path
            ) -> Iterator[GatewayCollector]:
    """The gateway on its repository config, forwarding to the ``otlp_sink`` fixture."""
    collector = GatewayCollector(otlp_sink.address, binary=gateway_binary,
                                 log_path=tmp_path / "gateway.log")
    with collector:
        yield collector
    print(f"--- gateway output ({collector.log_path}) ---\n{collector.read_log()}")


@pytest.fixture(autouse=True)
def no_agent_left() -> Iterator[None]:
    """Agents a test started and did not stop (it failed first) are killed after it."""
    yield
    while AgentProcess.started:
        AgentProcess.started.pop().kill()
