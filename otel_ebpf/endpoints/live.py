"""What the live page (/) shows, as JSON: a flame graph of the last minutes of CPU
samples, every workload's syscall latency buckets, the top retransmitting peers and the
agent's own health.

Latency and retransmits are read from the cumulative store at each request (the page
turns successive reads into rates and heatmap columns). CPU samples are kept here, in
slots of SLOT_S seconds over the last WINDOW_S: the export windows are emptied every
export, and the page should show minutes, not seconds. A slot keeps the profile windows
built in it as they are (already merged per thread and stack), and merges them only when
the page asks: nothing is hashed per sample for a page nobody may be viewing. The slots
are bounded (MAX_STACKS samples each; beyond, samples are counted as dropped).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from otel_ebpf.aggregate import Series
from otel_ebpf.export.profiles import folded_stack
from otel_ebpf.model import Identity, StackSample, Workload

WINDOW_S = 300.0
SLOT_S = 10.0
MAX_STACKS = 20_000  # samples (each a distinct thread and stack of its window) per slot
FLAME_MIN_SHARE = 0.005  # frames under 0.5 % of the samples are left out of the graph
TOP_SERIES = 40  # syscall series sent to the page, by calls
TOP_PEERS = 10

StackKey = tuple[Workload, tuple[Any, ...]]


class RecentStacks:
    """CPU stack samples of the last WINDOW_S seconds. Thread-safe: the profile windows
    are added on the export's thread, a request reads."""

    def __init__(self, window_s: float = WINDOW_S, slot_s: float = SLOT_S,
                 max_stacks: int = MAX_STACKS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.slot_s = slot_s
        self.max_stacks = max_stacks
        self.dropped = 0
        self._clock = clock
        self._slots: deque[tuple[int, list[StackSample]]] = deque(
            maxlen=max(1, int(window_s / slot_s)))
        self.window_s = slot_s * (self._slots.maxlen or 1)
        self._lock = threading.Lock()

    def add(self, samples: Sequence[StackSample]) -> None:
        slot = int(self._clock() // self.slot_s)
        with self._lock:
            if not self._slots or self._slots[-1][0] != slot:
                self._slots.append((slot, []))
            kept = self._slots[-1][1]
            room = max(0, self.max_stacks - len(kept))
            kept.extend(samples[:room])
            self.dropped += sum(s.count for s in samples[room:])

    def totals(self) -> dict[StackKey, int]:
        oldest = int(self._clock() // self.slot_s) - (self._slots.maxlen or 1) + 1
        with self._lock:
            slots = [list(samples) for slot, samples in self._slots if slot >= oldest]
        merged: dict[StackKey, int] = {}
        for samples in slots:
            for s in samples:
                key = (s.workload, s.frames)
                merged[key] = merged.get(key, 0) + s.count
        return merged


def flame_tree(totals: dict[StackKey, int], process_name: Callable[[Workload], str],
               min_share: float = FLAME_MIN_SHARE) -> dict[str, Any]:
    """Root-first tree {name, value, children} of the samples; frames under `min_share`
    of all samples are pruned (their samples stay in their parent's value)."""
    root: dict[str, Any] = {"name": "all", "value": 0, "children": {}}
    names: dict[Workload, str] = {}
    for (workload, frames), count in totals.items():
        if workload not in names:
            names[workload] = process_name(workload)
        sample = StackSample(workload, 0, "", frames, count)
        node = root
        node["value"] += count
        for name in folded_stack(sample, names[workload]):
            child = node["children"].get(name)
            if child is None:
                child = node["children"][name] = {"name": name, "value": 0, "children": {}}
            child["value"] += count
            node = child
    floor = root["value"] * min_share

    def prune(node: dict[str, Any]) -> dict[str, Any]:
        kept = sorted((c for c in node["children"].values() if c["value"] >= floor),
                      key=lambda c: (-c["value"], c["name"]))
        return {"name": node["name"], "value": node["value"],
                "children": [prune(c) for c in kept]}

    return prune(root)


def workload_name(identity: Identity) -> str:
    merged = {**identity.resource, **identity.point}
    service = str(merged.get("service.name", "") or merged.get("linux.cgroup.path", ""))
    executable = str(merged.get("process.executable.name", ""))
    pid = merged.get("process.pid")
    name = " / ".join(n for n in (service, executable) if n) or "(host)"
    return f"{name} [{pid}]" if pid is not None and "process.pid" in identity.point else name


def syscall_view(series: list[Series], identity_of: Callable[[Workload], Identity]
                 ) -> list[dict[str, Any]]:
    """The busiest syscall latency series: workload, syscall, cumulative buckets."""
    busiest = sorted((s for s in series if s.is_histogram
                      and s.descriptor.name == "linux.syscall.duration"),
                     key=lambda s: -s.count)[:TOP_SERIES]
    return [{"workload": workload_name(identity_of(s.workload)),
             "syscall": str(s.attributes.get("linux.syscall.name", "?")),
             "scale": s.scale, "offset": s.offset, "counts": list(s.bucket_counts or []),
             "zero": s.zero_count, "count": s.count, "sum": s.sum} for s in busiest]


def retransmit_view(series: list[Series], identity_of: Callable[[Workload], Identity]
                    ) -> list[dict[str, Any]]:
    """Retransmitted segments by peer (and owning workload), the largest first."""
    peers: dict[tuple[str, str], int] = {}
    for s in series:
        if s.descriptor.name != "linux.tcp.retransmits":
            continue
        address = s.attributes.get("network.peer.address")
        port = s.attributes.get("network.peer.port")
        peer = (f"{address}:{port}" if port is not None else str(address)
                ) if address is not None else "(all peers)"
        key = (peer, workload_name(identity_of(s.workload)))
        peers[key] = peers.get(key, 0) + s.value
    top = sorted(peers.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_PEERS]
    return [{"peer": peer, "workload": workload, "segments": n}
            for (peer, workload), n in top]


def health_view(metrics: list[Any], series: list[Series]) -> dict[str, Any]:
    """The agent's own figures: memory, CPU, map fill, lost events by probe and reason."""
    out: dict[str, Any] = {"map_fill": {}, "lost_events": {}}
    for metric in metrics:
        points = metric.data.data_points
        if metric.name == "process.memory.usage":
            out["rss_bytes"] = points[0].value
        elif metric.name == "process.cpu.time":
            out["cpu_seconds"] = sum(p.value for p in points)
        elif metric.name == "otel_ebpf.probe.map.fill":
            for p in points:
                out["map_fill"][f"{p.attributes['probe']}/{p.attributes['map']}"] = p.value
    for s in series:
        if s.descriptor.name == "otel_ebpf.probe.lost_events":
            key = f"{s.attributes.get('probe')}/{s.attributes.get('reason')}"
            out["lost_events"][key] = out["lost_events"].get(key, 0) + s.value
    return out
