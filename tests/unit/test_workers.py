"""The agent's background threads, driven by fake probes: a pipe stands for a kernel event
buffer (readable when it holds events), a counter for a map drain."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from otel_ebpf.kernel.engine import Engine
from otel_ebpf.model import Collection, SpanRecord, Workload
from otel_ebpf.probes.base import Probe
from otel_ebpf.workers import EventReader, PeriodicCollector


def span(name: str) -> SpanRecord:
    return SpanRecord(name=name, workload=Workload(), start_unix_ns=1, end_unix_ns=2,
                      attributes={})


class PipeProbe(Probe):
    """Events are bytes written to a pipe; poll_spans reads what is there, never waits."""

    name = "pipe"
    summary = "test"
    hooks = ()
    exports = ()

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self.polls = 0
        self.collects = 0

    def emit(self, *names: str) -> None:
        os.write(self.write_fd, "".join(f"{n}\n" for n in names).encode())

    def event_fds(self) -> list[int]:
        return [self.read_fd]

    def poll_spans(self) -> list[SpanRecord]:
        self.polls += 1
        try:
            data = os.read(self.read_fd, 65536)
        except BlockingIOError:
            return []
        return [span(n) for n in data.decode().split()]

    def start(self, engine: Engine) -> None:
        raise NotImplementedError

    def verify(self, engine: Engine) -> None:
        raise NotImplementedError

    def collect(self) -> Collection:
        self.collects += 1
        return Collection(self.name)

    def stop(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            os.close(fd)


@pytest.fixture
def probe() -> Iterator[PipeProbe]:
    p = PipeProbe()
    yield p
    p.stop()


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_event_reader_delivers_as_events_arrive_and_sleeps_otherwise(probe: PipeProbe
                                                                      ) -> None:
    got: list[str] = []
    lock = threading.Lock()

    def deliver(records: list[SpanRecord]) -> None:
        with lock:
            got.extend(r.name for r in records)

    reader = EventReader([probe], deliver, batch_s=0.01)
    reader.start()
    try:
        time.sleep(0.3)
        assert probe.polls == 0  # nothing arrived: nothing read, no timer
        probe.emit("a", "b")
        wait_until(lambda: len(got) == 2)
        probe.emit("c")
        wait_until(lambda: len(got) == 3)
        assert got == ["a", "b", "c"]
        polls = probe.polls
        time.sleep(0.3)
        assert probe.polls == polls  # idle again
    finally:
        remainder = reader.stop(timeout=2)
        reader.close()
    assert remainder == []


def test_event_reader_stop_is_prompt_and_returns_what_is_left(probe: PipeProbe) -> None:
    reader = EventReader([probe], lambda records: None, batch_s=60)
    reader.start()
    probe.emit("first")
    wait_until(lambda: probe.polls == 1)
    probe.emit("late")  # the reader is waiting out its batch interval
    began = time.monotonic()
    remainder = reader.stop(timeout=2)
    reader.close()
    assert time.monotonic() - began < 1
    assert [r.name for r in remainder or []] == ["late"]


def test_event_reader_without_buffers_starts_no_thread(probe: PipeProbe) -> None:
    class Quiet(PipeProbe):
        def event_fds(self) -> list[int]:
            return []

    quiet = Quiet()
    reader = EventReader([quiet], lambda records: None, batch_s=0.1)
    reader.start()
    assert reader.stop(timeout=1) == []
    reader.close()
    quiet.stop()


def test_periodic_collector_collects_on_its_interval_and_stops(probe: PipeProbe) -> None:
    delivered: list[Collection] = []
    collector = PeriodicCollector(probe, 0.05, lambda p: p.collect(), delivered.append)
    collector.start()
    wait_until(lambda: len(delivered) >= 3)
    assert collector.stop(timeout=1)
    count = probe.collects
    time.sleep(0.15)
    assert probe.collects == count
    assert all(c.probe == "pipe" for c in delivered)


def test_periodic_collector_survives_a_failing_collection(probe: PipeProbe) -> None:
    delivered: list[Collection] = []
    calls = 0

    def flaky(p: Probe) -> Collection:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("map gone")
        return p.collect()

    collector = PeriodicCollector(probe, 0.02, flaky, delivered.append)
    collector.start()
    wait_until(lambda: len(delivered) >= 2)
    assert collector.stop(timeout=1)
