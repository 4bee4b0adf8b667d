"""Fixtures for end-to-end tests: a recording OTLP sink and a rotel collector in front of it.

Both are function-scoped: each starts in milliseconds, and a fresh pair per test means no
test can see another test's telemetry or inherit a wedged collector.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from otel_ebpf.kernel.cgroupfs import cgroup2_root
from tests.e2e.test_agent import AgentProcess
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
    """A cgroup v2 directory of this test's own, for the probe's kernel filter."""
    path = cgroup2_root() / f"otel-ebpf-e2e-{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir()
    try:
        yield path
    finally:
        deadline = time.monotonic() + 5
        while True:
            try:
                path.rmdir()
                break
            except OSError:  # a helper still exiting
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


@pytest.fixture(autouse=True)
def no_agent_left() -> Iterator[None]:
    """Agents a test started and did not stop (it failed first) are killed after it."""
    yield
    while AgentProcess.started:
        AgentProcess.started.pop().kill()
