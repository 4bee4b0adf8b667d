"""The agent's background threads: one per probe that drains its maps on its interval, and
one that sleeps in epoll on every probe's kernel event buffers.

Why threads rather than asyncio timers handing work to an executor: every wake-up of a
thread costs CPU of its own (on this VM a bare 0.1 s sleep costs ~0.14 ms of thread time,
more than a small drain), and a timer-plus-executor drain wakes the event loop twice and a
worker once. A drain thread wakes once per interval and calls the loop only when it has
records for it; an idle event buffer wakes nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Sequence

from otel_ebpf.model import Collection, SpanRecord
from otel_ebpf.probes.base import AnyProbe

log = logging.getLogger(__name__)


class PeriodicCollector:
    """Calls `collect(probe)` every `interval` seconds on its own thread and passes each
    result to `deliver` (from that thread)."""

    def __init__(self, probe: AnyProbe, interval: float,
                 collect: Callable[[AnyProbe], Collection],
                 deliver: Callable[[Collection], None]) -> None:
        self.probe = probe
        self.interval = interval
        self._collect = collect
        self._deliver = deliver
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"collect-{probe.name}",
                                        daemon=True)
        # time.monotonic() of the last drain that completed (of the start, before one)
        self.last_drained = time.monotonic()

    def start(self) -> None:
        self.last_drained = time.monotonic()
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                collection = self._collect(self.probe)
            except Exception:
                log.exception("probe %s: collection failed; will retry next interval",
                              self.probe.name)
                continue
            self.last_drained = time.monotonic()
            self._deliver(collection)

    def request_stop(self) -> None:
        """No collection starts after this one (shutdown tells every collector at once)."""
        self._stop.set()

    def stop(self, timeout: float) -> bool:
        """Stop after the collection under way, if any; False if it outlasted `timeout`."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()


class EventReader:
    """Reads the event buffers of `probes` as events arrive: one thread asleep in epoll on
    their descriptors and on a pipe that wakes it to stop. After a read it waits
    `batch_s`, so a busy buffer is handed over in batches rather than event by event."""

    def __init__(self, probes: Sequence[AnyProbe],
                 deliver: Callable[[list[SpanRecord]], object], batch_s: float) -> None:
        self._deliver = deliver
        self._batch_s = batch_s
        self._epoll = select.epoll()
        self._probe_of: dict[int, AnyProbe] = {}
        for probe in probes:
            for fd in probe.event_fds():
                self._epoll.register(fd, select.EPOLLIN)
                self._probe_of[fd] = probe
        self._wake_read, self._wake_write = os.pipe()
        self._epoll.register(self._wake_read, select.EPOLLIN)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)

    @property
    def probes(self) -> list[AnyProbe]:
        return list(dict.fromkeys(self._probe_of.values()))

    def start(self) -> None:
        if self._probe_of:
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ready = self._epoll.poll()
            except InterruptedError:
                continue
            if self._stop.is_set():
                return
            probes = dict.fromkeys(self._probe_of[fd] for fd, _ in ready
                                   if fd in self._probe_of)
            for probe in probes:
                if records := self._read(probe):
                    self._deliver(records)
            self._stop.wait(self._batch_s)

    @staticmethod
    def _read(probe: AnyProbe) -> list[SpanRecord]:
        try:
            return probe.poll_spans()
        except Exception:
            log.exception("probe %s: reading its events failed", probe.name)
            return []

    def stop(self, timeout: float) -> list[SpanRecord] | None:
        """Stop the thread, then read and return what the buffers still hold (on the
        caller's thread, not delivered). None if the thread did not stop in time."""
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_write, b"x")
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            return None
        return [record for probe in self.probes for record in self._read(probe)]

    def close(self) -> None:
        self._epoll.close()
        for fd in (self._wake_read, self._wake_write):
            with contextlib.suppress(OSError):
                os.close(fd)


class ProbeWorkers:
    """Every probe's drain thread and the one event reader: started with the agent's
    probes, stopped all together at shutdown or probe by probe on a reload (the event
    reader is then started again on the probes that remain). `absorb` and `take_spans`
    run on the event loop that started the workers."""

    def __init__(self, collect: Callable[[AnyProbe], Collection],
                 absorb: Callable[[Collection], None],
                 take_spans: Callable[[list[SpanRecord]], None],
                 batch_s: float, stop_s: float) -> None:
        self._collect = collect
        self._absorb = absorb
        self._take_spans = take_spans
        self._batch_s = batch_s
        self._stop_s = stop_s
        self._collectors: list[PeriodicCollector] = []
        self._events: EventReader | None = None

    def start_collector(self, probe: AnyProbe, interval: float) -> None:
        loop = asyncio.get_running_loop()

        def deliver(collection: Collection) -> None:
            if collection.records or collection.lost_events:
                loop.call_soon_threadsafe(self._absorb, collection)

        collector = PeriodicCollector(probe, interval, self._collect, deliver)
        collector.start()
        self._collectors.append(collector)

    def drain_ages(self) -> dict[str, tuple[float, float]]:
        """probe name -> (interval, seconds since its last completed drain)."""
        now = time.monotonic()
        return {c.probe.name: (c.interval, now - c.last_drained) for c in self._collectors}

    def start_events(self, probes: Sequence[AnyProbe]) -> None:
        loop = asyncio.get_running_loop()
        self._events = EventReader(
            probes, lambda spans: loop.call_soon_threadsafe(self._take_spans, spans),
            self._batch_s)
        self._events.start()

    async def stop(self, probes: Sequence[AnyProbe] | None = None) -> list[SpanRecord]:
        """Stop the drain threads of `probes` (None: all) and the event reader; returns
        what the event buffers still held."""
        loop = asyncio.get_running_loop()
        stopping = [c for c in self._collectors if probes is None or c.probe in probes]
        self._collectors = [c for c in self._collectors if c not in stopping]
        for collector in stopping:
            collector.request_stop()  # all at once: the waits below then overlap
        for collector in stopping:
            if not await loop.run_in_executor(None, collector.stop, self._stop_s):
                log.warning("probe %s: a drain was still running when it was stopped",
                            collector.probe.name)
        events, self._events = self._events, None
        if events is None:
            return []
        spans = await loop.run_in_executor(None, events.stop, self._stop_s)
        events.close()
        if spans is None:
            log.warning("the event reader was still busy when stopped; its last events "
                        "are dropped")
        return spans or []
