"""The running probes: started together, drained on their intervals (otel_ebpf/workers.py),
kept to the workload filter, swapped one by one on a reload, drained a last time and
detached at shutdown.

What a probe produces is routed by what it is, never by which probe made it: records and
counts to the metrics unit, stack samples to the profiles unit, spans to the spans unit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from otel_ebpf.config import Config
from otel_ebpf.enrich.selection import WorkloadSelection
from otel_ebpf.kernel.engine import Engine
from otel_ebpf.model import Collection, Setting, SpanRecord
from otel_ebpf.periodic import Periodic
from otel_ebpf.probes.base import AnyProbe
from otel_ebpf.workers import ProbeWorkers

log = logging.getLogger(__name__)

SELECTION_S = 5.0  # how often the workload filter's cgroups are recomputed
SPAN_POLL_S = 0.2  # a busy event buffer is emptied at most this often (batches the hand-off)
THREAD_STOP_S = 1.0  # how long shutdown waits for a drain or an event read under way


@dataclass(frozen=True)
class Routes:
    """Where the probes' output goes: each collection (on the event loop), its stack
    samples (first, on the drain thread that collected them: merging them is their
    cost, and the loop should only schedule), and spans (on the event loop)."""

    collection: Callable[[Collection], None]
    samples: Callable[[Collection], None]
    spans: Callable[[list[SpanRecord]], None]


class ProbeHost:
    """The probes the agent runs on `config` (reload replaces both)."""

    def __init__(self, config: Config, engine: Engine, probes: list[AnyProbe], routes: Routes,
                 selection: WorkloadSelection | None = None) -> None:
        self.config = config
        self.engine = engine
        self.probes = probes
        self._routes = routes
        self._started_ns: dict[str, int] = {}  # a reloaded probe's series go on from here
        self._drained_ns: dict[str, int] = {}  # probe -> when its latest drain began
        self._selection = selection if selection is not None and selection.active else None
        self._selected: set[int] = set()
        self.selecting: Periodic[None] = Periodic("selection", SELECTION_S, self._select)
        self._bpf_pool = ThreadPoolExecutor(1, thread_name_prefix="bpf")
        # kernel event buffers are read apart from the map drains, which can take a while
        # (symbolizing): announcements and slow calls must not wait behind them
        self._workers = ProbeWorkers(self._collect_blocking, routes.collection, routes.spans,
                                     SPAN_POLL_S, THREAD_STOP_S)

    def drain_ages(self) -> dict[str, tuple[float, float]]:
        """probe name -> (interval, seconds since its last completed drain)."""
        return self._workers.drain_ages()

    def settings(self) -> list[Setting]:
        """The running probes' settings that readers of their data need."""
        return [setting for probe in self.probes for setting in probe.settings()]

    # ---- start and stop ----------------------------------------------------------------

    async def start(self) -> bool:
        """Start every probe at once: their compiles run side by side (the engine bounds
        how many at a time), so start-up takes about the longest rather than the sum.
        Then the workload filter, then the drain threads. False if any failed."""
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(max(1, len(self.probes)), thread_name_prefix="start") as pool:
            results = await asyncio.gather(
                *(loop.run_in_executor(pool, self._start_probe, probe) for probe in self.probes),
                return_exceptions=True)
        failed = [(probe, result) for probe, result in zip(self.probes, results, strict=True)
                  if isinstance(result, BaseException)]
        for probe, exc in failed:
            log.error("probe %s failed to start: %s", probe.name, exc)
        self.engine.release_compiler_memory()
        if failed:
            return False
        if self._selection is not None:
            await self.selecting.once()
        for probe in self.probes:
            self._workers.start_collector(probe, probe.config.interval)
        self._workers.start_events(self.probes)
        return True

    def _start_probe(self, probe: AnyProbe) -> None:
        began = time.monotonic()
        probe.start(self.engine)
        self._started_ns.setdefault(probe.name, time.time_ns())
        log.info("probe %s attached (%s) in %.1fs; BPF program ids %s", probe.name,
                 ", ".join(str(h) for h in probe.hooks), time.monotonic() - began,
                 " ".join(map(str, probe.program_ids())))

    def _stop_probes(self, probes: list[AnyProbe] | None = None) -> None:
        for probe in self.probes if probes is None else probes:
            try:
                probe.stop()
            except Exception as exc:  # detaching the others matters more
                log.error("probe %s did not detach cleanly: %s", probe.name, exc)

    async def stop_workers(self) -> None:
        """Stop draining; the events the buffers still held go to their route."""
        self._routes.spans(await self._workers.stop())

    async def last(self, deadline: float) -> None:
        """Drain every probe a last time, until `deadline` (monotonic)."""
        for probe in self.probes:
            try:
                await asyncio.wait_for(self._collect(probe), deadline - time.monotonic())
            except TimeoutError:
                log.warning("final collection of %s timed out", probe.name)

    def detach(self) -> None:
        self._stop_probes()
        self.selecting.close()
        self._bpf_pool.shutdown(wait=False, cancel_futures=True)

    # ---- reload ------------------------------------------------------------------------

    async def swap_probes(self, old: list[AnyProbe], new: list[AnyProbe]) -> list[AnyProbe]:
        """Reload: `old` drained a last time and detached, `new` started in their place;
        every other probe keeps its programs and its drain thread. Returns the new probes
        that failed to start (detached again)."""
        loop = asyncio.get_running_loop()
        self._routes.spans(await self._workers.stop(old))
        for probe in old:
            await self._collect(probe)
        self.probes = [p for p in self.probes if p not in old]  # a new list: loops iterate
        self._stop_probes(old)
        failed = []
        for probe in new:
            try:
                await loop.run_in_executor(None, self._start_probe, probe)
                if self._selection is not None:
                    probe.set_cgroup_filter(self._selected)
            except Exception as exc:
                log.error("probe %s failed to start: %s", probe.name, exc)
                self._stop_probes([probe])
                failed.append(probe)
                continue
            self.probes = [*self.probes, probe]
            self._workers.start_collector(probe, probe.config.interval)
        self.engine.release_compiler_memory()
        self._workers.start_events(self.probes)
        return failed

    # ---- collection and the workload filter --------------------------------------------

    async def _collect(self, probe: AnyProbe) -> None:
        loop = asyncio.get_running_loop()
        try:
            collection = await loop.run_in_executor(self._bpf_pool, self._collect_blocking,
                                                    probe)
        except Exception:
            log.exception("probe %s: collection failed; will retry next interval", probe.name)
            return
        self._routes.collection(collection)

    def _collect_blocking(self, probe: AnyProbe) -> Collection:
        began = time.time_ns()
        collection = probe.collect()
        # what this drain read was counted since the previous one began (or the start)
        collection.window_start_ns = self._drained_ns.get(
            probe.name, self._started_ns.get(probe.name, began))
        self._drained_ns[probe.name] = began
        if collection.samples:
            self._routes.samples(collection)
        return collection

    async def run_selection(self) -> None:
        """Keep the probes' kernel filters to the selected workloads' cgroups."""
        if self._selection is not None:
            await self.selecting.run()

    def _select(self) -> None:
        """Blocking: the selected workloads' cgroups into every probe's kernel filter."""
        assert self._selection is not None
        ids = self._selection.cgroup_ids()
        for probe in self.probes:
            probe.set_cgroup_filter(ids)
        if ids != self._selected:
            log.info("workload filter: %d cgroups selected", len(ids))
            self._selected = ids
