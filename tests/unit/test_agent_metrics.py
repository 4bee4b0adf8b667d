"""The agent's own resource use and map fill, as exported."""

from __future__ import annotations

import os

from otel_ebpf.export.agent_metrics import MAP_FILL, MapFill, process_metrics


def test_process_metrics_follow_the_semantic_conventions() -> None:
    burn = sum(i * i for i in range(200_000))  # some CPU of our own
    assert burn
    by_name = {m.name: m for m in process_metrics(1, 2)}
    assert set(by_name) == {"process.cpu.time", "process.memory.usage",
                            "process.memory.virtual"}
    cpu = by_name["process.cpu.time"]
    assert cpu.unit == "s" and cpu.data.is_monotonic
    modes = {p.attributes["cpu.mode"]: p.value for p in cpu.data.data_points}
    assert modes.keys() == {"user", "system"}
    assert 0 < modes["user"] <= os.times().user
    (rss,) = by_name["process.memory.usage"].data.data_points
    with open("/proc/self/status") as f:
        vm_rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    assert abs(rss.value - vm_rss) < 16 << 20  # the same number, read moments apart
    assert not by_name["process.memory.usage"].data.is_monotonic


def test_map_fill_is_the_latest_share_per_probe_and_map() -> None:
    fill = MapFill()
    assert fill.metrics(1) == []
    fill.update("syscall_latency", {"latency": (2048, 8192)})
    fill.update("tcp_retransmit", {"retransmits": (0, 16384)})
    fill.update("syscall_latency", {"latency": (4096, 8192)})
    (metric,) = fill.metrics(1, 2)
    assert metric.name == MAP_FILL and metric.unit == "1"
    got = {(p.attributes["probe"], p.attributes["map"]): p.value
           for p in metric.data.data_points}
    assert got == {("syscall_latency", "latency"): 0.5, ("tcp_retransmit", "retransmits"): 0.0}
