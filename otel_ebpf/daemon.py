"""The agent's event loop: load probes, drain them on their intervals, export, summarise,
and on SIGTERM/SIGINT (or the end of --duration) collect and flush once more, detach
everything and exit. SIGHUP re-reads the configuration (otel_ebpf/reload.py).

Blocking work never runs on the loop: each probe drains its maps on a thread of its own
and exports run on another (otel_ebpf/workers.py), so a collector that hangs cannot delay
the kernel-side drains; one thread sleeps in epoll until kernel event buffers hold events.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TextIO

from opentelemetry.sdk.metrics.export import Metric

from otel_ebpf import __version__
from otel_ebpf.aggregate import CumulativeStore
from otel_ebpf.cardinality import SeriesLimit
from otel_ebpf.config import Config
from otel_ebpf.enrich.identity import AGENT, IdentityResolver
from otel_ebpf.enrich.process import pid_alive
from otel_ebpf.export.agent_metrics import MapFill, process_metrics, sample_period_metric
from otel_ebpf.export.delivery import Delivery
from otel_ebpf.export.metrics import OtlpShipper
from otel_ebpf.export.metrics_export import MetricsExport
from otel_ebpf.export.profiles import ProfileExport
from otel_ebpf.export.queue import Backoff
from otel_ebpf.export.summary import HistogramSummary
from otel_ebpf.export.traces import QueuedSpan, SpanExport, exemplar_of
from otel_ebpf.export.transport import OneAttempt, until_answered
from otel_ebpf.health import HealthReporter
from otel_ebpf.kernel.engine import Engine
from otel_ebpf.model import Collection, CounterDelta, SpanRecord, Workload
from otel_ebpf.probes.base import Probe
from otel_ebpf.reload import Reloader
from otel_ebpf.selfmetrics import LOST_EVENTS
from otel_ebpf.workers import ProbeWorkers

log = logging.getLogger(__name__)

SHUTDOWN_BUDGET_S = 4.0  # the final flush gives up after this; SIGTERM-to-exit stays < 5 s
SELECTION_S = 5.0  # how often the workload filter's cgroups are recomputed
SPAN_POLL_S = 0.2  # a busy event buffer is emptied at most this often (batches the hand-off)
# a gone process's series is forgotten once exported and this long without a delta
EXPIRE_QUIET_S = 60.0
THREAD_STOP_S = 1.0  # how long shutdown waits for a drain or an event read under way


class Agent:
    def __init__(
        self,
        config: Config,
        engine: Engine,
        probes: list[Probe],
        shipper: OtlpShipper | None,
        identity: IdentityResolver,
        out: TextIO = sys.stdout,
        spans: SpanExport | None = None,
        profiles: ProfileExport | None = None,
        reloader: Reloader | None = None,
        health_file: Path | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.probes = probes
        self.shipper = shipper
        self.spans = spans
        self.profiles = profiles
        self.reloader = reloader
        slow = config.probes.syscall_latency.slow_spans
        self.identity = identity
        self.out = out
        limit = SeriesLimit(config.exporter.cardinality_limit, config.exporter.cardinality_limits)
        self.store = CumulativeStore(exemplars_per_series=slow.exemplars_per_series,
                                     limit=limit)
        self.map_fill = MapFill()
        self.metrics = None if shipper is None else MetricsExport(
            self.store, shipper, identity.resolver, config.exporter, time.time_ns(),
            self._agent_metrics)
        # only when printed: its windows grow with every (process, syscall) until a print
        self.summary = HistogramSummary(config.summary.top) if config.summary.enabled else None
        self._started_ns: dict[str, int] = {}
        self._bpf_pool = ThreadPoolExecutor(1, thread_name_prefix="bpf")
        self._export_pool = ThreadPoolExecutor(1, thread_name_prefix="export")
        # kernel event buffers are read apart from the map drains, which can take a while
        # (symbolizing): announcements and slow calls must not wait behind them
        self._workers = ProbeWorkers(self._collect_blocking, self._absorb, self._take_spans,
                                     SPAN_POLL_S, THREAD_STOP_S)
        self._profile_pool = ThreadPoolExecutor(1, thread_name_prefix="profiles")
        # `otel-ebpf health` reads it: written while the probes are attached and drained
        self.health = (None if health_file is None
                       else HealthReporter(health_file, self._workers.drain_ages))
        self._profile_future: asyncio.Future[None] | None = None
        self._export_future: asyncio.Future[bool] | None = None
        self._selected_cgroups: set[int] = set()
        self._summary_started = time.monotonic()
        self._stop = asyncio.Event()
        # every signal's delivery counts its drops and queue depth the same way, into the
        # store, under the agent's resource
        self._deliveries: list[Delivery[Any]] = [d for d in (
            spans.delivery if spans else None, profiles.delivery if profiles else None) if d]
        for delivery in self._deliveries:
            delivery.metrics.sink = self._add_self_metrics
        if spans is not None:
            spans.delivery.on_delivered = self._remember_exemplars

    def _add_self_metrics(self, records: list[CounterDelta]) -> None:
        now = time.time_ns()
        self.store.add(records, min(self._started_ns.values(), default=now), now)

    # ---- lifecycle -------------------------------------------------------------------

    def _agent_metrics(self, start_ns: int) -> list[Metric]:
        """The agent's own metrics read at each export: process, map fill, sampling."""
        metrics = process_metrics(start_ns) + self.map_fill.metrics(start_ns)
        syscalls = self.config.probes.syscall_latency
        if syscalls.enabled:
            metrics.append(sample_period_metric(syscalls.sample_period, start_ns))
        return metrics

    async def run(self, duration: float | None = None) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        if self.reloader is not None:
            loop.add_signal_handler(signal.SIGHUP, self.reloader.request)
        try:
            await self.identity.start()
            if not await self._start_probes():
                return 1
            if self.identity.selection.active:
                await self._apply_selection()
            self._start_workers()
            tasks = []
            if self.shipper is not None:
                tasks.append(asyncio.create_task(self._export_loop(), name="export"))
            if self.config.summary.enabled:
                tasks.append(asyncio.create_task(self._summary_loop(), name="summary"))
            if self.identity.selection.active:
                tasks.append(asyncio.create_task(self._selection_loop(), name="selection"))
            for delivery in self._deliveries:
                tasks.append(asyncio.create_task(delivery.run(), name=delivery.signal))
            if self.profiles is not None:
                tasks.append(asyncio.create_task(self._profile_loop(), name="profiles"))
            if self.reloader is not None:
                tasks.append(asyncio.create_task(self.reloader.run(self), name="reload"))
            if self.health is not None:
                tasks.append(asyncio.create_task(self.health.run(), name="health"))
            log.info("otel-ebpf %s running: probes %s, exporting to %s%s", __version__,
                     ", ".join(p.name for p in self.probes) or "none",
                     self.shipper.endpoint if self.shipper else "nowhere (exporter disabled)",
                     f", for {duration:g}s" if duration else "")
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=duration)
            except TimeoutError:
                log.info("--duration reached, stopping")
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._stop_workers()
            await self._final_flush()
            return 0
        finally:
            if self.health is not None:
                self.health.close()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self._stop_workers()
            self._stop_probes()
            await self.identity.close()
            for pool in (self._bpf_pool, self._export_pool, self._profile_pool):
                pool.shutdown(wait=False, cancel_futures=True)

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("%s received, flushing and detaching", sig.name)
        self._stop.set()

    async def _start_probes(self) -> bool:
        """Start every probe at once: their compiles run side by side (the engine bounds
        how many at a time), so start-up takes about the longest rather than the sum."""
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
        return not failed

    def _start_probe(self, probe: Probe) -> None:
        began = time.monotonic()
        probe.start(self.engine)
        # a reloaded probe's series go on from the first start
        self._started_ns.setdefault(probe.name, time.time_ns())
        log.info("probe %s attached (%s) in %.1fs; BPF program ids %s", probe.name,
                 ", ".join(str(h) for h in probe.hooks), time.monotonic() - began,
                 " ".join(map(str, probe.program_ids())))

    def _stop_probes(self, probes: list[Probe] | None = None) -> None:
        for probe in self.probes if probes is None else probes:
            try:
                probe.stop()
            except Exception as exc:  # detaching the others matters more
                log.error("probe %s did not detach cleanly: %s", probe.name, exc)

    async def _apply_selection(self) -> None:
        """Put the cgroups of the selected workloads into the probes' kernel filters."""
        loop = asyncio.get_running_loop()
        try:
            ids = await loop.run_in_executor(self._export_pool,
                                             self.identity.selection.cgroup_ids)
            for probe in self.probes:
                await loop.run_in_executor(self._bpf_pool, probe.set_cgroup_filter, ids)
        except Exception:
            log.exception("workload filter: could not update the selected cgroups")
            return
        if ids != self._selected_cgroups:
            log.info("workload filter: %d cgroups selected", len(ids))
            self._selected_cgroups = ids

    async def _selection_loop(self) -> None:
        while True:
            await asyncio.sleep(SELECTION_S)
            await self._apply_selection()

    # ---- collection ------------------------------------------------------------------

    def _interval(self, probe: Probe) -> float:
        return float(getattr(self.config.probes, probe.name).interval)

    def _start_workers(self) -> None:
        for probe in self.probes:
            self._workers.start_collector(probe, self._interval(probe))
        self._workers.start_events(self.probes)

    async def swap_probes(self, old: list[Probe], new: list[Probe]) -> list[Probe]:
        """Reload: `old` drained a last time and detached, `new` started in their place;
        every other probe keeps its programs and its drain thread. Returns the new probes
        that failed to start (detached again)."""
        loop = asyncio.get_running_loop()
        self._take_spans(await self._workers.stop(old))
        for probe in old:
            await self._collect(probe)
        self.probes = [p for p in self.probes if p not in old]  # a new list: loops iterate
        self._stop_probes(old)
        failed = []
        for probe in new:
            try:
                await loop.run_in_executor(None, self._start_probe, probe)
                if self.identity.selection.active:
                    probe.set_cgroup_filter(self._selected_cgroups)
            except Exception as exc:
                log.error("probe %s failed to start: %s", probe.name, exc)
                self._stop_probes([probe])
                failed.append(probe)
                continue
            self.probes = [*self.probes, probe]
            self._workers.start_collector(probe, self._interval(probe))
        self.engine.release_compiler_memory()
        self._workers.start_events(self.probes)
        return failed

    async def _stop_workers(self) -> None:
        self._take_spans(await self._workers.stop())

    async def _collect(self, probe: Probe) -> None:
        loop = asyncio.get_running_loop()
        try:
            collection = await loop.run_in_executor(self._bpf_pool, self._collect_blocking,
                                                    probe)
        except Exception:
            log.exception("probe %s: collection failed; will retry next interval", probe.name)
            return
        self._absorb(collection)

    def _collect_blocking(self, probe: Probe) -> Collection:
        collection = probe.collect()
        # stack samples go to the profile window from here: merging them is the bulk of
        # their cost, and the loop should only schedule
        if self.profiles is not None and collection.samples:
            self.profiles.add(collection.samples, collection.period_ns)
        return collection

    def _absorb(self, collection: Collection) -> None:
        now = time.time_ns()
        start = self._started_ns.get(collection.probe, now)
        self.store.add(collection.records, start, now)
        if self.summary is not None:
            self.summary.add(collection.records)
        self.map_fill.update(collection.probe, collection.map_fill)
        lost = [CounterDelta(LOST_EVENTS, AGENT, {"probe": collection.probe, "reason": r}, n)
                for r, n in collection.lost_events.items()]
        self.store.add(lost, start, now)

    # ---- export ----------------------------------------------------------------------

    def _export_once(self) -> bool:
        assert self.metrics is not None
        ok = self.metrics.export_once()
        if ok:
            self.store.expire(pid_alive, time.time_ns(), int(EXPIRE_QUIET_S * 1e9))
        return ok

    @property
    def _export_busy(self) -> bool:
        return self._export_future is not None and not self._export_future.done()

    def _start_export(self) -> asyncio.Future[bool]:
        loop = asyncio.get_running_loop()
        self._export_future = loop.run_in_executor(self._export_pool, self._export_once)
        return self._export_future

    async def _export_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.exporter.interval)
            if not await self._export_metrics():
                # the collector is away: as soon as it answers, export (once: a failure
                # then waits for the interval, so a collector that answers empty exports
                # but fails real ones never makes the agent rebuild its export in a loop)
                await self._until_collector_answers()
                await self._export_metrics()

    async def _export_metrics(self) -> bool:
        """One export; False when it failed in a way worth retrying before the interval."""
        if self._export_busy:
            return True  # the previous export is still running; cumulative data waits
        try:
            # shield: cancelling this loop at shutdown must not forget a running export
            if await asyncio.shield(self._start_export()):
                return True
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("metrics export failed unexpectedly; retrying next interval")
            return True
        exporter = self.shipper and self.shipper.exporter
        return not (isinstance(exporter, OneAttempt) and exporter.outcome.retryable)

    async def _until_collector_answers(self) -> None:
        """Cumulative values lose nothing by waiting, but the first export after an outage
        should not wait for the interval."""
        assert self.shipper is not None and isinstance(self.shipper.exporter, OneAttempt)
        retry = self.config.exporter.retry
        await until_answered(self.shipper.exporter, self._export_pool,
                             Backoff(retry.initial_backoff, retry.max_backoff))

    # ---- spans -----------------------------------------------------------------------

    def _take_spans(self, records: list[SpanRecord]) -> None:
        if self.spans is not None and records:
            self.spans.offer(records)

    def _remember_exemplars(self, delivered: list[QueuedSpan]) -> None:
        """Delivered slow-call spans become their histogram series' exemplars."""
        for queued in delivered:
            if (linked := exemplar_of(queued)) is not None:
                self.store.add_exemplar(*linked)

    # ---- profiles --------------------------------------------------------------------

    def _flush_profiles(self) -> None:
        """The profile window, built and queued for delivery (and the folded file)."""
        assert self.profiles is not None
        workloads = self.profiles.workloads()
        self.profiles.flush(self.identity.sample_resolver(workloads), time.time_ns())

    async def _profile_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.config.exporter.interval)
            if self._profile_future is not None and not self._profile_future.done():
                continue
            self._profile_future = loop.run_in_executor(self._profile_pool,
                                                        self._flush_profiles)
            try:
                await asyncio.shield(self._profile_future)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("building the profile window failed; retrying next interval")

    async def _summary_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.summary.interval)
            self._print_summary()

    def _print_summary(self) -> None:
        elapsed = time.monotonic() - self._summary_started
        self._summary_started = time.monotonic()

        def name_of(w: Workload) -> str:
            return (str(self.identity.processes.lookup(w).executable_name) if w.pid > 0
                    else "(all)")

        if self.summary is not None:
            print(self.summary.render(elapsed, name_of), file=self.out, flush=True)

    async def _final_profiles(self, deadline: float) -> None:
        if self.profiles is None:
            return
        if self._profile_future is not None and not self._profile_future.done():
            log.warning("a profile window was still being built at shutdown; dropped")
        else:
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(self._profile_pool, self._flush_profiles)
            try:
                await asyncio.wait_for(future, max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                log.warning("the last profile window was not built in time; dropped")
        if self.profiles.delivery is not None:
            await self.profiles.delivery.flush(deadline)

    async def _final_flush(self) -> None:
        """Last drain and export within SHUTDOWN_BUDGET_S; a collector that does not answer
        in time is abandoned (its retries are cancelled by shutting the exporter down)."""
        deadline = time.monotonic() + SHUTDOWN_BUDGET_S
        for probe in self.probes:
            try:
                await asyncio.wait_for(self._collect(probe), deadline - time.monotonic())
            except TimeoutError:
                log.warning("final collection of %s timed out", probe.name)
        if self.spans is not None:
            await self.spans.flush(deadline)
        await self._final_profiles(deadline)
        if self.config.summary.enabled:
            self._print_summary()
        if self.shipper is None:
            return
        if self._export_busy:
            # the collector is not answering: waiting for it would only delay the exit
            log.warning("an export to %s was still retrying at shutdown; final flush skipped",
                        self.shipper.endpoint)
        else:
            try:
                await asyncio.wait_for(self._start_export(),
                                       max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                log.warning("final export to %s did not finish in time; dropped",
                            self.shipper.endpoint)
        self.shipper.shutdown()
