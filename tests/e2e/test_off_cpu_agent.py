"""Off-CPU profiles and slow-call stacks through the agent as a process and the real
OpenTelemetry Collector (profiles and traces to its file exporter): a helper that sleeps
40 x 50 ms from wait_for_tick, and one that burns CPU and then blocks in a slow read on a
pipe (tests/helpers/off_cpu_target.c): its on-CPU and off-CPU profiles come under one
workload resource."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import build_helper
from tests.e2e.agent_config import agent_config
from tests.e2e.test_agent import AgentProcess
from tests.helpers.processes import sleeping

pytestmark = [pytest.mark.e2e, pytest.mark.kernel]

SLEEPS, SLEEP_MS = 40, 50
# cpu_profile at a modest rate: at 499 Hz on a loaded 2-CPU machine its collect holds its
# symbolizer lock for seconds, and the one thread that reads every probe's events waits
# on it in cpu_profile's new-process handler, so off_cpu's announcement of a 2 s process
# can come after it exited. Stack captures are rate-limited machine-wide: on a shared
# machine other tasks' switches could take the default 1000 a second, and this test is
# about the helper's stacks.
CONFIG = agent_config({
    "syscall_latency": {"filter": {"comms": ["off_cpu_target"]}},
    "cpu_profile": {"frequency": 97},
    "off_cpu": {"enabled": True, "rate_per_second": 50000, "burst": 5000},
})


def span_attributes(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for rs in doc.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for span in ss.get("spans", []):
                attrs = {a["key"]: next(iter(a.get("value", {}).values()), None)
                         for a in span.get("attributes", [])}
                out.append({"name": span.get("name"), **attrs})
    return out


def resources_of(docs: list[dict[str, Any]], pid: int) -> dict[tuple[str, str], set[Any]]:
    """Per profile type, the resources (attribute sets) of the profiles holding `pid`'s
    samples."""
    from tests.peers.otelcol import resolve_profile_samples

    out: dict[tuple[str, str], set[Any]] = {}
    for doc in docs:
        for rp in doc.get("resourceProfiles", []):
            strings = doc.get("dictionary", {}).get("stringTable", [])
            resource = frozenset(
                (a["key"] if "key" in a else strings[a.get("keyStrindex", 0)],
                 str(strings[v["stringValueStrindex"]] if "stringValueStrindex" in v
                     else next(iter(v.values()), None)))
                for a in rp.get("resource", {}).get("attributes", [])
                for v in [a.get("value", {})])
            one = {"dictionary": doc.get("dictionary", {}), "resourceProfiles": [rp]}
            for sample in resolve_profile_samples(one):
                if sample["attributes"].get("process.pid") == pid:
                    out.setdefault(sample["sample_type"], set()).add(resource)
    return out


def test_off_cpu_profile_and_slow_call_stack_reach_the_collector(
    otelcol: Any, tmp_path: Path
) -> None:
    from tests.peers.otelcol import resolve_profile_samples

    binary = build_helper("off_cpu_target")
    agent = AgentProcess(tmp_path, "--export-interval", "1s", config_text=CONFIG,
                         env=otelcol.grpc_env)
    # every probe attached and their event buffers read (new processes announced): the
    # helpers are then symbolized from maps read while they live
    agent.wait_for_log(" running: probes", timeout=90)

    sleeper = subprocess.run([str(binary), "sleeps", str(SLEEPS), str(SLEEP_MS)],
                             capture_output=True, check=True, timeout=30)
    assert sleeper.stdout.strip() == b"done"

    # 500 ms of CPU in burn (on-CPU samples), then the slow read (an off-CPU sample)
    reader = subprocess.Popen([str(binary), "read", "500"], stdin=subprocess.PIPE,
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
        both = {("samples", "count"), ("off_cpu", "nanoseconds")}
        while not both <= set(resources_of(otelcol.read_exported("profiles"), reader.pid)) \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        resources = resources_of(otelcol.read_exported("profiles"), reader.pid)
    finally:
        reader.stdin.close()
        reader.wait(timeout=10)
    # the same workload resource for both profile types, one identity
    assert resources.get(("samples", "count")) and resources.get(
        ("off_cpu", "nanoseconds")) == resources[("samples", "count")], resources
    assert len(resources[("samples", "count")]) == 1, resources
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
