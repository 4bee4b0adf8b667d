"""A stack probe started for a test, its new-process announcements read as the daemon
reads them (as they come: every 10 ms here), so that short-lived processes have their maps
captured while they live."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from otel_ebpf.kernel.engine import Engine
from otel_ebpf.model import StackSample
from otel_ebpf.probes.profiler import StackProfiler

P = TypeVar("P", bound=StackProfiler[Any])


class Running(Generic[P]):
    """The probe started, with its event buffer polled on a thread of its own."""

    def __init__(self, probe: P) -> None:
        self.probe = probe
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.01):
            self.probe.poll_spans()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def running(engine: Engine, probe: P) -> Iterator[Running[P]]:
    """`probe` started and polled for the block, stopped after it."""
    probe.start(engine)
    polled = Running(probe)
    try:
        yield polled
    finally:
        polled.stop()
        probe.stop()


def samples_of(pid: int, samples: list[StackSample]) -> list[StackSample]:
    return [s for s in samples if s.workload.pid == pid]


def names(sample: StackSample) -> list[str | None]:
    return [f.function for f in sample.frames]
