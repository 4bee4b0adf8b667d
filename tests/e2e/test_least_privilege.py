"""Least privilege: the agent as uid 0 holding exactly the capabilities of its list
(otel_ebpf.kernel.capabilities, which deploy/ copies: the DaemonSet, the Helm chart, the
systemd unit, the Dockerfile's header), its bounding, permitted and effective sets reduced
to them with capsh (tests/helpers/capabilities.py). This machine lacks CAP_SYS_RESOURCE
as well: nothing may need it.

With the list, every default probe loads, exports exact counts through rotel, and a second
start comes from the compile cache (stored without CAP_SYS_ADMIN); each optional capability
is shown needed by the frames that stay addresses without it, and `doctor` names whichever
one is missing.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from otel_ebpf import config as agent_config
from otel_ebpf import probes as registry
from otel_ebpf.kernel.capabilities import CAPABILITIES, names
from tests.e2e.test_agent import AgentProcess
from tests.e2e.test_gateway import workload_count
from tests.helpers.capabilities import (
    SCENARIOS,
    capability_sets,
    folded_of,
    held,
    mask,
    with_capabilities,
)
from tests.helpers.cgroups import own_cgroup, run_in
from tests.peers.otlp_sink import OtlpSink
from tests.peers.rotel import RotelCollector

pytestmark = [pytest.mark.e2e, pytest.mark.kernel]

LISTED = names()
PROBES = registry.enabled_names(agent_config.Config())  # every default probe
READY = f" running: probes {', '.join(PROBES)}"
N_GETPPID, N_AFTER_RESTART = 4321, 1234
K_SLEEPS, SLEEP_MS = 3, 30
SLOW_NAMES = ("syscall nanosleep", "syscall clock_nanosleep")
CONFIG = """
probes:
  syscall_latency:
    interval: 500ms
    slow_spans:
      threshold: 1s          # only the helper's sleeps are slow calls, whatever the load
      thresholds: {nanosleep: 10ms, clock_nanosleep: 10ms}
      include: [nanosleep, clock_nanosleep]
  cpu_profile:
    frequency: 199       # samples of every helper within a second of a busy machine
summary:
  enabled: false
"""
PROFILE_ONLY = """
probes:
  syscall_latency: {enabled: false}
  tcp_retransmit: {enabled: false}
  cpu_profile: {frequency: 199}
exporter: {enabled: false}
summary: {enabled: false}
"""


def start_agent(tmp_path: Path, caps: list[str], config: str, cache: Path,
                env: dict[str, str] | None = None) -> AgentProcess:
    path = tmp_path / "least-privilege.yaml"
    path.write_text(config)
    return AgentProcess(tmp_path, "--config", str(path), "--export-interval", "1s",
                        "--profiles-folded", str(tmp_path / "cpu.folded"),
                        env={"OTEL_EBPF_CACHE_DIR": str(cache), **(env or {})},
                        program=with_capabilities(caps))


def wait_until(check: Callable[[], object], timeout: float, what: Callable[[], str]
               ) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what()
        time.sleep(0.25)


def read(path: Path) -> str:
    return path.read_text() if path.exists() else f"({path} not written)"


def exports_exactly(sink: OtlpSink, cgroup: Path, syscall_workload: Path, n: int,
                    agent: AgentProcess) -> None:
    """A helper in `cgroup` makes n getppid calls and K slow sleeps: its workload's series
    counts exactly that, and each sleep arrives as a span."""
    pid, out = run_in(cgroup, [syscall_workload, n, K_SLEEPS, SLEEP_MS])
    assert out.strip() == "done"

    def spans() -> list[Any]:
        return [s for r, s in sink.spans() if s.name in SLOW_NAMES
                and r.get("process.pid") == pid]

    assert sink.wait_for(lambda: workload_count(sink, cgroup, "getppid") == n
                         and len(spans()) >= K_SLEEPS, timeout=30), (
        workload_count(sink, cgroup, "getppid"), len(spans()), "".join(agent.stderr))
    assert workload_count(sink, cgroup, "clock_nanosleep") == K_SLEEPS
    assert len(spans()) == K_SLEEPS


def test_the_listed_capabilities_run_every_probe_export_and_restart_from_the_cache(
        rotel: RotelCollector, otlp_sink: OtlpSink, cgroup: Path, syscall_workload: Path,
        cpu_hot: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = rotel.grpc_env
    folded = tmp_path / "cpu.folded"
    agent = start_agent(tmp_path, LISTED, CONFIG, cache, env)
    try:
        agent.wait_for_log(READY, timeout=240)  # a cold cache: every program compiles
        listed = mask(LISTED)
        assert capability_sets(agent.proc.pid) == {
            "CapInh": 0, "CapPrm": listed, "CapEff": listed, "CapBnd": listed, "CapAmb": 0}
        exports_exactly(otlp_sink, cgroup, syscall_workload, N_GETPPID, agent)
        # every optional capability's frames symbolized (the ones it needs, all held)
        with held(cpu_hot, tmp_path, SCENARIOS.values()):
            wait_until(lambda: all(any(s.marker in line for line in folded_of(folded, s.name))
                                   for s in SCENARIOS.values()), 30,
                       lambda: f"not every scenario symbolized:\n{read(folded)[-4000:]}\n"
                       + "".join(agent.stderr))
        code, _ = agent.stop()
        assert code == 0, "".join(agent.stderr)
    finally:
        agent.kill()
    log = "".join(agent.stderr)
    assert "from the compile cache" not in log and "Traceback" not in log, log
    entries = sorted((cache / "programs").glob("*.json"))
    assert len(entries) == len(PROBES), log  # stored without CAP_SYS_ADMIN

    # a restart: every program from the cache, and the same exact counts
    agent = start_agent(tmp_path, LISTED, CONFIG, cache, env)
    try:
        agent.wait_for_log(READY, timeout=60)
        log = "".join(agent.stderr)
        for probe in PROBES:
            assert f"{probe}: program from the compile cache" in log, log
        with own_cgroup("restart") as again:
            exports_exactly(otlp_sink, again, syscall_workload, N_AFTER_RESTART, agent)
        code, _ = agent.stop()
        assert code == 0, "".join(agent.stderr)
    finally:
        agent.kill()
    assert sorted((cache / "programs").glob("*.json")) == entries


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One compile cache for the runs below: the profiler compiles once, not per run."""
    yield tmp_path_factory.mktemp("least-privilege-cache")


OPTIONAL = [c.name for c in CAPABILITIES if not c.required]


@pytest.mark.parametrize("missing", OPTIONAL)
def test_without_an_optional_capability_its_frames_stay_addresses(
        missing: str, shared_cache: Path, cpu_hot: Path, tmp_path: Path) -> None:
    caps = [c for c in LISTED if c != missing]
    scenario = SCENARIOS[missing]
    folded = tmp_path / "cpu.folded"
    agent = start_agent(tmp_path, caps, PROFILE_ONLY, shared_cache)
    try:
        agent.wait_for_log(" running: probes cpu_profile", timeout=120)
        # its samples drained while it is held, alive: symbolized if the agent could
        with held(cpu_hot, tmp_path, [scenario]):
            wait_until(lambda: samples(folded_of(folded, scenario.name)) >= 10, 30,
                       lambda: f"{scenario.name}:\n{read(folded)[-4000:]}\n"
                       + "".join(agent.stderr))
        time.sleep(1.5)  # its last samples, one export interval later
        code, _ = agent.stop()
        assert code == 0, "".join(agent.stderr)
    finally:
        agent.kill()
    lines = folded_of(folded, scenario.name)
    # sampled where it ran (scenario.why), and not one of those frames resolved
    assert not any(scenario.marker in line for line in lines), (scenario.why, lines)
    if missing == "SYSLOG":  # its kernel frames are there, as addresses
        assert any(";0xffff" in line for line in lines), lines


def samples(lines: list[str]) -> int:
    return sum(int(line.rsplit(" ", 1)[1]) for line in lines)


@pytest.mark.parametrize("missing", LISTED)
def test_doctor_names_the_missing_capability(missing: str) -> None:
    caps = [c for c in LISTED if c != missing]
    cap = next(c for c in CAPABILITIES if c.name == missing)
    done = subprocess.run([*with_capabilities(caps), "doctor", "--no-load"],
                          capture_output=True, text=True, timeout=120)
    line = next(line for line in done.stdout.splitlines() if line[5:].startswith("privileges"))
    others = [f"CAP_{name}" for name in caps]
    assert f"without CAP_{missing} ({cap.without})" in line, done.stdout
    assert not any(f"{other} " in line for other in others), line
    if cap.required:
        assert line.startswith("FAIL") and done.returncode == 1, done.stdout
        assert f"fix: grant CAP_{missing} " in done.stdout
    else:
        assert line.startswith("warn") and done.returncode == 0, done.stdout + done.stderr


def test_doctor_is_content_with_the_listed_capabilities() -> None:
    done = subprocess.run([*with_capabilities(LISTED), "doctor", "--no-load"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"ok   privileges                       root with {', '.join(LISTED)}" \
        in done.stdout, done.stdout
