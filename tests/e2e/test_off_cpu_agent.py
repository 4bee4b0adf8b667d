"""Off-CPU profiles and slow-call stacks through the agent as a process and the real
OpenTelemetry Collector (profiles and traces to its file exporter): a helper that sleeps
40 x 50 ms from wait_for_tick, and one whose read on a pipe is slow
(tests/helpers/off_cpu_target.c)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import build_helper
from tests.e2e.test_agent import AgentProcess
from tests.kernel.test_slow_call_stack import sleeping

pytestmark = [pytest.mark.e2e, pytest.mark.kernel]

SLEEPS, SLEEP_MS = 40, 50
# captures are rate-limited machine-wide: on a shared machine other tasks' switches
# could take the default 1000 a second, and this test is about the helper's stacks
CONFIG = """
probes:
  syscall_latency:
    filter:
      comms: [off_cpu_target]
  cpu_profile:
    enabled: false
  off_cpu:
    enabled: true
    rate_per_second: 50000
    burst: 5000
summary:
  enabled: false
"""


def span_attributes(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for rs in doc.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for span in ss.get("spans", []):
                attrs = {a["key"]: next(iter(a.get("value", {}).values()), None)
                         for a in span.get("attributes", [])}
                out.append({"name": span.get("name"), **attrs})
    return out


def test_off_cpu_profile_and_slow_call_stack_reach_the_collector(
    otelcol: Any, tmp_path: Path
) -> None:
    from tests.peers.otelcol import resolve_profile_samples

    binary = build_helper("off_cpu_target")
    config = tmp_path / "offcpu.yaml"
    config.write_text(CONFIG)
    agent = AgentProcess(tmp_path, "--config", str(config), "--export-interval", "1s",
                         env={"OTEL_EXPORTER_OTLP_ENDPOINT": otelcol.grpc_endpoint})
    agent.wait_for_log("probe off_cpu attached", timeout=60)
    agent.wait_for_log("probe syscall_latency attached", timeout=60)

    sleeper = subprocess.run([str(binary), "sleeps", str(SLEEPS), str(SLEEP_MS)],
                             capture_output=True, check=True, timeout=30)
    assert sleeper.stdout.strip() == b"done"

    reader = subprocess.Popen([str(binary), "read"], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL)
    assert reader.stdin is not None
    try:
        deadline = time.monotonic() + 10
        while not sleeping(reader.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)
        reader.stdin.write(b"x")
        reader.stdin.flush()

        def read_spans() -> list[dict[str, Any]]:
            return [a for doc in otelcol.read_exported("traces") for a in span_attributes(doc)
                    if a["name"] == "syscall read" and "read_config" in str(
                        a.get("code.stacktrace"))]

        deadline = time.monotonic() + 30
        while not read_spans() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        reader.stdin.close()
        reader.wait(timeout=10)
    (span,) = read_spans()
    frames = [line.split()[1].split("+")[0] for line in span["code.stacktrace"].splitlines()]
    assert frames.index("read_config") < frames.index("main"), frames

    slept = SLEEPS * SLEEP_MS * 1_000_000

    def sleeper_samples() -> list[dict[str, Any]]:
        return [s for doc in otelcol.read_exported("profiles")
                for s in resolve_profile_samples(doc)
                if s["sample_type"] == ("off_cpu", "nanoseconds")
                and s["attributes"].get("thread.name") == "off_cpu_target"
                and sum(s["values"]) and "wait_for_tick" in s["stack"]]

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and sum(
            sum(s["values"]) for s in sleeper_samples()) < 0.95 * slept:
        time.sleep(0.2)
    samples = sleeper_samples()
    pid = samples[0]["attributes"]["process.pid"] if samples else None
    mine = [s for doc in otelcol.read_exported("profiles")
            for s in resolve_profile_samples(doc)
            if s["sample_type"] == ("off_cpu", "nanoseconds")
            and s["attributes"].get("process.pid") == pid]
    total = sum(sum(s["values"]) for s in mine)
    through = sum(sum(s["values"]) for s in mine
                  if "wait_for_tick" in s["stack"] and "main" in s["stack"])
    assert abs(total - slept) <= 0.05 * slept, (total, "".join(agent.stderr))
    assert through >= 0.95 * total, [(s["stack"], s["values"]) for s in mine]
    code, _ = agent.stop()
    assert code == 0
