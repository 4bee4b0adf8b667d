"""The live page's data: CPU samples kept for the last minutes in bounded slots, the flame
graph tree, the busiest syscall series, the top retransmitting peers; and the page served
from the package with a strict Content-Security-Policy."""

from __future__ import annotations

import aiohttp

from otel_ebpf.aggregate import CumulativeStore
from otel_ebpf.endpoints.live import RecentStacks, flame_tree, retransmit_view, syscall_view
from otel_ebpf.model import CounterDelta, ExpHistogramDelta, Identity, StackSample, Workload
from otel_ebpf.probes.syscall_latency import SYSCALL_DURATION
from otel_ebpf.probes.tcp_retransmit import RETRANSMITS
from otel_ebpf.symbolize.frames import KERNEL, NATIVE, Frame
from tests.unit.test_endpoints_server import AgentState, make_config

APP = Workload(pid=42, comm="app", cgroup_id=3)


def frame(name: str, kind: str = NATIVE) -> Frame:
    return Frame(0x1000, name, kind, None, 0)


HOT = (frame("hot_a"), frame("main"), frame("_start"))  # leaf first
IO = (frame("vfs_write", KERNEL), frame("write"), frame("main"), frame("_start"))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_recent_stacks_keep_the_window_and_are_bounded() -> None:
    clock = Clock()
    stacks = RecentStacks(window_s=30, slot_s=10, max_stacks=2, clock=clock)
    stacks.add([StackSample(APP, 1, "app", HOT, 3), StackSample(APP, 1, "app", IO, 1)])
    stacks.add([StackSample(APP, 2, "app", (frame("other"),), 5)])  # a third stack: dropped
    assert stacks.totals() == {(APP, HOT): 3, (APP, IO): 1} and stacks.dropped == 5
    clock.now += 10
    stacks.add([StackSample(APP, 1, "app", HOT, 2)])
    assert stacks.totals()[(APP, HOT)] == 5
    clock.now += 25  # the first slot is out of the 30 s window
    assert stacks.totals() == {(APP, HOT): 2}
    clock.now += 30
    assert stacks.totals() == {}


def test_flame_tree_is_root_first_and_prunes_rare_frames() -> None:
    rare = (frame("rare"), frame("main"), frame("_start"))
    tree = flame_tree({(APP, HOT): 900, (APP, IO): 100, (APP, rare): 1}, lambda w: w.comm,
                      min_share=0.01)
    assert tree["name"] == "all" and tree["value"] == 1001
    (process,) = tree["children"]
    assert process["name"] == "app"
    main = process["children"][0]["children"][0]
    assert main["name"] == "main" and main["value"] == 1001
    assert [c["name"] for c in main["children"]] == ["hot_a", "write"]  # rare: pruned
    assert main["children"][1]["children"][0]["name"] == "vfs_write_[k]"


def test_syscall_and_retransmit_views() -> None:
    store = CumulativeStore()
    store.add([ExpHistogramDelta(SYSCALL_DURATION, APP, {"linux.syscall.name": "read"}, 2,
                                 -40, [1, 2], 3, 0.1, 0.01, 0.05),
               ExpHistogramDelta(SYSCALL_DURATION, APP, {"linux.syscall.name": "getppid"},
                                 2, -90, [10], 10, 0.1, 0.01, 0.01),
               CounterDelta(RETRANSMITS, APP, {"network.peer.address": "10.0.0.9",
                                               "network.peer.port": 443}, 7),
               CounterDelta(RETRANSMITS, APP, {"network.peer.address": "10.0.0.8"}, 9)],
              1, 2)

    def identity_of(w: Workload) -> Identity:
        return Identity({"service.name": "web"}, {"process.pid": w.pid,
                                                  "process.executable.name": "app"})

    view = syscall_view(store.series(), identity_of)
    assert [(v["syscall"], v["count"], v["offset"]) for v in view] == [
        ("getppid", 10, -90), ("read", 3, -40)]
    assert view[0]["workload"] == "web / app [42]"
    assert [(r["peer"], r["segments"]) for r in retransmit_view(store.series(), identity_of)
            ] == [("10.0.0.8", 9), ("10.0.0.9:443", 7)]


async def test_the_page_and_its_data_are_served_with_a_strict_policy() -> None:
    agent = AgentState(make_config())
    agent.store.add([CounterDelta(RETRANSMITS, APP, {"network.peer.address": "10.0.0.8"},
                                  4)], 1, 2)
    endpoints = agent.endpoints()
    endpoints.stacks.add([StackSample(APP, 1, "app", HOT, 5)])
    assert await endpoints.start()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(endpoints.url + "/") as page:
                html = await page.text()
                assert page.status == 200 and page.content_type == "text/html"
                policy = page.headers["Content-Security-Policy"]
                assert "default-src 'none'" in policy and "script-src 'self'" in policy
                assert '<script src="live.js"' in html and "http" not in html  # no CDN
            for asset in ("/live.js", "/live.css"):
                async with session.get(endpoints.url + asset) as response:
                    assert response.status == 200
            async with session.get(endpoints.url + "/api/live") as response:
                live = await response.json()
            assert live["retransmits"][0]["segments"] == 4
            assert live["health"]["rss_bytes"] > 0 and live["ready"]["ready"] is True
            async with session.get(endpoints.url + "/api/profile") as response:
                profile = await response.json()
            assert profile["root"]["value"] == 5
            assert profile["root"]["children"][0]["children"][0]["children"][0]["children"][
                0]["name"] == "hot_a"
    finally:
        await endpoints.stop()
