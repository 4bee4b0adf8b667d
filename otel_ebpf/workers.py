"""The agent's background threads: one per probe that drains its maps on its interval, and
one that sleeps in epoll on every probe's kernel event buffers.

Why threads rather than asyncio timers handing work to an executor: every wake-up of a
thread costs CPU of its own (on this VM a bare 0.1 s sleep costs ~0.14 ms of thread time,
more than a small drain), and a timer-plus-executor drain wakes the event loop twice and a
worker once. A drain thread wakes once per interval and calls the loop only when it has
records for it; an idle event buffer wakes nobody.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections.abc import Callable, Sequence

from otel_ebpf.model import Collection, SpanRecord
from otel_ebpf.probes.base import Probe

log = logging.getLogger(__name__)


class PeriodicCollector:
    """Calls `collect(probe)` every `interval` seconds on its own thread and passes each
    result to `deliver` (from that thread)."""

    def __init__(self, probe: Probe, interval: float,
                 collect: Callable[[Probe], Collection],
                 deliver: Callable[[Collection], None]) -> None:
        self.probe = probe
        self.interval = interval
        self._collect = collect
        self._deliver = deliver
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"collect-{probe.name}",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                collection = self._collect(self.probe)
            except Exception:
                log.exception("probe %s: collection failed; will retry next interval",
                              self.probe.name)
                continue
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

    def __init__(self, probes: Sequence[Probe],
                 deliver: Callable[[list[SpanRecord]], object], batch_s: float) -> None:
        self._deliver = deliver
        self._batch_s = batch_s
        self._epoll = select.epoll()
        self._probe_of: dict[int, Probe] = {}
        for probe in probes:
            for fd in probe.event_fds():
                self._epoll.register(fd, select.EPOLLIN)
                self._probe_of[fd] = probe
        self._wake_read, self._wake_write = os.pipe()
        self._epoll.register(self._wake_read, select.EPOLLIN)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)

    @property
    def probes(self) -> list[Probe]:
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
    def _read(probe: Probe) -> list[SpanRecord]:
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
