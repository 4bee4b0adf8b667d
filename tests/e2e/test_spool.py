"""The on-disk spool against rotel stopped and restarted on the same port (the issue's
"Nothing lost in an outage", for outages longer than memory holds): with a memory queue
of 8 spans and a spool, every slow-call span of the outage arrives after it; with a small
spool too, every span is delivered or counted as dropped (spool_full) exactly once; and
an agent restarted during the outage delivers what the previous run left in the spool.

The outage length is OTEL_EBPF_OUTAGE_S (as in test_outage.py); what is proven does not
depend on it past a few retry cycles.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.agent_config import agent_config
from tests.e2e.test_agent import AgentProcess
from tests.e2e.test_outage import (
    OUTAGE_S,
    dropped_spans,
    outage,
    sleeps_in,
    slow_calls,
    spans_of,
)
from tests.peers.otlp_sink import OtlpSink
from tests.peers.rotel import RotelCollector

pytestmark = [pytest.mark.e2e, pytest.mark.kernel]


def start_agent(tmp_path: Path, rotel: RotelCollector, cgroup: Path, spool: Path,
                spool_bytes: str = "256MiB", threshold: str = "10ms") -> AgentProcess:
    config = agent_config(
        {"syscall_latency": sleeps_in(cgroup, threshold, rate_per_second=5000, burst=5000)},
        exporter={"queue": {"spool_directory": str(spool),
                            "spans": {"max_items": 8, "max_spool_bytes": spool_bytes}}})
    agent = AgentProcess(tmp_path, "--export-interval", "1s", config_text=config,
                         env=rotel.grpc_env)
    agent.wait_for_log("probe syscall_latency attached")
    return agent


def unique(spans: list[Any]) -> dict[bytes, Any]:
    """By span id: a collector may deliver a batch twice (rotel retries its sink)."""
    return {s.span_id: s for s in spans}


def spool_files(spool: Path) -> list[Path]:
    return sorted((spool / "spans").glob("*.spool"))


def test_past_a_tiny_memory_queue_every_span_of_the_outage_arrives_after_it(
    rotel: RotelCollector, otlp_sink: OtlpSink, slow_workload: Path, tmp_path: Path,
    cgroup: Path,
) -> None:
    k = 60
    spool = tmp_path / "spool"
    agent = start_agent(tmp_path, rotel, cgroup, spool)
    seen: list[int] = []

    def during() -> tuple[int, list[int]]:
        result = slow_calls(cgroup, slow_workload, k, 20)
        time.sleep(1)  # the last spans reach the queue
        seen.append(len(spool_files(spool)))
        return result

    down, up, (pid, starts) = outage(rotel, OUTAGE_S, during)
    assert otlp_sink.wait_for(lambda: len(unique(spans_of(otlp_sink, pid))) >= k,
                              timeout=30), "".join(agent.stderr)
    time.sleep(2)  # anything more would show up now
    delivered = unique(spans_of(otlp_sink, pid))
    print(f"\nspool, memory queue 8, outage {up - down:.1f}s: offered {k}, delivered "
          f"{len(delivered)}, spool files at the end of the outage {seen[0]}, "
          f"drops {dropped_spans(otlp_sink)}")
    assert seen[0] > 0  # the memory queue did overflow to disk
    assert sorted(s.start_time_unix_nano // 1_000_000 for s in delivered.values()) == (
        pytest.approx([t // 1_000_000 for t in starts], abs=1))  # each call, once
    assert not any(dropped_spans(otlp_sink).values())
    assert spool_files(spool) == []  # delivered files leave the spool
    code, _ = agent.stop()
    assert code == 0 and "Traceback" not in "".join(agent.stderr)


def test_past_a_small_spool_the_oldest_go_and_every_span_is_accounted_for(
    rotel: RotelCollector, otlp_sink: OtlpSink, slow_workload: Path, tmp_path: Path,
    cgroup: Path,
) -> None:
    """1,000 slow calls (1 ms sleeps over a 500 us threshold) against a 64 KiB spool:
    delivered + dropped == offered exactly, the drops are spool_full and carry whose."""
    k = 1000
    spool = tmp_path / "spool"
    agent = start_agent(tmp_path, rotel, cgroup, spool, spool_bytes="64KiB",
                        threshold="500us")
    down, up, (pid, starts) = outage(rotel, min(OUTAGE_S, 8.0),
                                     lambda: slow_calls(cgroup, slow_workload, k, 1))
    assert len(starts) == k

    def counted() -> int:
        return sum(dropped_spans(otlp_sink).values())

    assert otlp_sink.wait_for(
        lambda: len(unique(spans_of(otlp_sink, pid))) + counted() >= k, timeout=60), (
        "".join(agent.stderr))
    time.sleep(2)
    delivered = unique(spans_of(otlp_sink, pid))
    drops = dropped_spans(otlp_sink)
    print(f"\nspool 64 KiB, memory queue 8, outage {up - down:.1f}s: offered {k}, "
          f"delivered {len(delivered)}, dropped {drops}")
    assert len(delivered) + counted() == k
    assert counted() > 0  # the spool's bound was reached
    reasons = {dict(key)["reason"] for key, n in drops.items() if n}
    assert reasons <= {"spool_full", "queue_full"} and "spool_full" in reasons
    for key in drops:
        attrs = dict(key)
        assert attrs["service.name"] in ("slow_workload", "slowpoke"), attrs
        assert "process.pid" not in attrs
    newest = max(starts) // 1_000_000  # the newest survive: the last call arrived
    assert any(abs(s.start_time_unix_nano // 1_000_000 - newest) <= 1
               for s in delivered.values())
    code, _ = agent.stop()
    assert code == 0 and "Traceback" not in "".join(agent.stderr)


def test_an_agent_restarted_during_the_outage_delivers_the_previous_runs_spool(
    rotel: RotelCollector, otlp_sink: OtlpSink, slow_workload: Path, tmp_path: Path,
    cgroup: Path,
) -> None:
    k = 30
    spool = tmp_path / "spool"
    first = start_agent(tmp_path, rotel, cgroup, spool)
    second: list[AgentProcess] = []

    def during() -> tuple[int, list[int]]:
        result = slow_calls(cgroup, slow_workload, k, 20)
        time.sleep(1)  # the last spans reach the queue
        code, _ = first.stop()  # the agent restarts while the collector is still away
        assert code == 0 and "Traceback" not in "".join(first.stderr)
        assert spool_files(spool), "".join(first.stderr)
        second.append(start_agent(tmp_path, rotel, cgroup, spool))
        return result

    down, up, (pid, starts) = outage(rotel, OUTAGE_S, during)
    (agent,) = second
    assert otlp_sink.wait_for(lambda: len(unique(spans_of(otlp_sink, pid))) >= k,
                              timeout=30), "".join(agent.stderr)
    time.sleep(2)
    delivered = unique(spans_of(otlp_sink, pid))
    print(f"\nrestart during a {up - down:.1f}s outage: offered {k} to the first run, "
          f"the second delivered {len(delivered)}")
    assert sorted(s.start_time_unix_nano // 1_000_000 for s in delivered.values()) == (
        pytest.approx([t // 1_000_000 for t in starts], abs=1))
    assert not any(dropped_spans(otlp_sink).values())
    assert any("left by a previous run" in line for line in agent.stderr)
    assert spool_files(spool) == []
    code, _ = agent.stop()
    assert code == 0 and "Traceback" not in "".join(agent.stderr)
