"""SIGHUP on the agent as a process: only the probe whose settings changed is reloaded (the
others keep their kernel programs, by id); an invalid file keeps the running config."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest

from tests.e2e.test_agent import CONFIG, AgentProcess, loaded_program_ids

pytestmark = [pytest.mark.e2e, pytest.mark.kernel]

_ATTACHED = re.compile(r"probe (\w+) attached .* BPF program ids ([\d ]+)$")


def program_ids_by_probe(agent: AgentProcess) -> dict[str, list[set[int]]]:
    """Each probe's program ids, one set per time it was attached, in order."""
    seen: dict[str, list[set[int]]] = {}
    for line in agent.stderr:
        if m := _ATTACHED.search(line.rstrip()):
            seen.setdefault(m.group(1), []).append({int(i) for i in m.group(2).split()})
    return seen


def hang_up_and_wait(agent: AgentProcess, fragment: str, count: int) -> str:
    agent.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        log = "".join(agent.stderr)
        if log.count(fragment) >= count:
            return log
        assert agent.proc.poll() is None, log
        time.sleep(0.2)
    pytest.fail(f"agent never logged {fragment!r} after SIGHUP:\n{''.join(agent.stderr)}")


def test_sighup_reloads_only_the_changed_probe_and_keeps_a_bad_file_out(
    tmp_path: Path
) -> None:
    agent = AgentProcess(tmp_path, "--no-export")
    try:
        _reload_steps(agent, tmp_path / "agent.yaml")
    finally:
        agent.kill()


def _reload_steps(agent: AgentProcess, config: Path) -> None:
    agent.wait_for_log("running: probes", timeout=120)
    before = program_ids_by_probe(agent)
    assert set(before) == {"syscall_latency", "cpu_profile", "tcp_retransmit"}, before

    # one probe setting, plus one that the running agent cannot take without a restart
    config.write_text(CONFIG.replace("probes:\n", "probes:\n  tcp_retransmit:\n"
                                                  "    aggregation: connection\n", 1)
                      + "exporter:\n  interval: 3s\n")
    log = hang_up_and_wait(agent, "reload: configuration applied", 1)
    assert "probes reloaded: tcp_retransmit; untouched: syscall_latency, cpu_profile" in log
    assert "need a restart (still running on their previous values): exporter" in log
    after = program_ids_by_probe(agent)
    assert len(after["tcp_retransmit"]) == 2, log
    assert after["syscall_latency"] == before["syscall_latency"]  # not attached again
    assert after["cpu_profile"] == before["cpu_profile"]
    loaded = loaded_program_ids()
    old_tcp, new_tcp = after["tcp_retransmit"]
    assert old_tcp.isdisjoint(loaded), "the replaced programs are still loaded"
    assert new_tcp | before["syscall_latency"][0] | before["cpu_profile"][0] <= loaded

    # an invalid file: the running config stays, one line says why
    config.write_text(CONFIG.replace("interval: 500ms", "interval: soon"))
    log = hang_up_and_wait(agent, "reload: the new configuration is not used", 1)
    why = next(line for line in agent.stderr if "new configuration is not used" in line)
    assert "probes.syscall_latency.interval: expected a duration" in why, why
    assert "Traceback" not in log
    assert program_ids_by_probe(agent) == after
    assert new_tcp | before["syscall_latency"][0] <= loaded_program_ids()

    # not UTF-8: the same, never a traceback
    config.write_bytes(b"service_name: caf\xe9\n")
    log = hang_up_and_wait(agent, "reload: the new configuration is not used", 2)
    assert "is not UTF-8 text" in log and "Traceback" not in log

    code, _ = agent.stop()
    assert code == 0, "".join(agent.stderr)
