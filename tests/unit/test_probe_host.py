"""The running probes, driven by probes whose kernel side is a counter: a probe that fails
to start fails the start, every probe's output goes where it belongs by what it is (and
stack samples on the thread that drained them), a reload swaps one probe and leaves the
others, and shutdown drains each one a last time."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from otel_ebpf.config import Config
from otel_ebpf.config_base import ProbeConfig
from otel_ebpf.kernel.engine import Engine
from otel_ebpf.model import Collection, CounterDelta, MetricDescriptor, SpanRecord, StackSample
from otel_ebpf.model import Workload as W
from otel_ebpf.probe_host import ProbeHost, Routes
from otel_ebpf.probes.base import Hook, Probe

COUNT = MetricDescriptor("test.count", "{thing}", "things")


class CountingProbe(Probe[ProbeConfig]):
    """Each collection holds one count, and a stack sample when `samples` is set."""

    summary = "test"
    config_class = ProbeConfig
    hooks = (Hook("raw_tracepoint", "sched/sched_switch", "on_switch"),)
    exports = (COUNT,)

    def __init__(self, name: str, samples: bool = False, fail: bool = False) -> None:
        super().__init__(ProbeConfig(interval=0.05))
        self.name = name  # type: ignore[misc]
        self.samples = samples
        self.fail = fail
        self.collections = 0
        self.started = self.stopped = False

    def start(self, engine: Engine) -> None:
        if self.fail:
            raise RuntimeError(f"{self.name} cannot start here")
        self.started = True

    def collect(self) -> Collection:
        self.collections += 1
        samples = [StackSample(W(1, "t"), 1, "t", (), 1)] if self.samples else []
        return Collection(self.name, [CounterDelta(COUNT, W(), {}, 1)], samples=samples)

    def stop(self) -> None:
        self.stopped = True


class Recorder:
    def __init__(self) -> None:
        self.collections: list[tuple[str, str]] = []  # (probe, thread)
        self.samples: list[tuple[str, str]] = []
        self.spans: list[SpanRecord] = []

    def routes(self) -> Routes:
        def on(into: list[tuple[str, str]]) -> Any:
            return lambda c: into.append((c.probe, threading.current_thread().name))
        return Routes(on(self.collections), on(self.samples), self.spans.extend)


def host(probes: list[CountingProbe], recorder: Recorder) -> ProbeHost:
    return ProbeHost(Config(), Engine(None), list(probes), recorder.routes())


async def until(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_a_probe_that_fails_to_start_fails_the_start(
    caplog: pytest.LogCaptureFixture
) -> None:
    good, bad = CountingProbe("good"), CountingProbe("bad", fail=True)
    running = host([good, bad], Recorder())
    assert not await running.start()
    assert "probe bad failed to start: bad cannot start here" in caplog.text
    assert good.started
    running.detach()
    assert good.stopped and bad.stopped


async def test_output_is_routed_by_what_it_is() -> None:
    recorder = Recorder()
    plain, sampling = CountingProbe("plain"), CountingProbe("sampling", samples=True)
    running = host([plain, sampling], recorder)
    assert await running.start()
    loop_thread = threading.current_thread().name
    await until(lambda: {p for p, _ in recorder.collections} == {"plain", "sampling"})
    await running.stop_workers()
    running.detach()
    assert {t for _, t in recorder.collections} == {loop_thread}
    assert {p for p, _ in recorder.samples} == {"sampling"}  # only where there are samples
    assert {t for _, t in recorder.samples} == {"collect-sampling"}


async def test_a_reload_swaps_one_probe_and_keeps_the_others() -> None:
    recorder = Recorder()
    kept, old, new = CountingProbe("kept"), CountingProbe("swapped"), CountingProbe("swapped")
    running = host([kept, old], recorder)
    assert await running.start()
    failed = await running.swap_probes([old], [new, CountingProbe("bad", fail=True)])
    assert [p.name for p in failed] == ["bad"]
    assert running.probes == [kept, new]
    assert old.stopped and not kept.stopped and new.started
    drained = old.collections
    await until(lambda: new.collections >= 2 and kept.collections >= 2)
    assert old.collections == drained  # no drain thread left for it
    await running.stop_workers()
    running.detach()


async def test_shutdown_drains_every_probe_a_last_time() -> None:
    recorder = Recorder()
    probes = [CountingProbe("a"), CountingProbe("b", samples=True)]
    running = host(probes, recorder)
    assert await running.start()
    await running.stop_workers()
    before = [p.collections for p in probes]
    await running.last(time.monotonic() + 5)
    assert [p.collections for p in probes] == [n + 1 for n in before]
    assert recorder.collections[-2:] == [("a", threading.current_thread().name),
                                         ("b", threading.current_thread().name)]
    running.detach()
    assert all(p.stopped for p in probes)
