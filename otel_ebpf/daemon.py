"""The agent: wires the running probes (otel_ebpf/probe_host.py) to one unit per signal
(otel_ebpf/signals/) and the summary, runs them until SIGTERM/SIGINT or the end of
--duration, then drains, exports and delivers once more within SHUTDOWN_BUDGET_S, detaches
everything and exits. SIGHUP re-reads the configuration (otel_ebpf/reload.py).

Which units exist follows from the signals the enabled probes declare; no unit knows
which probe feeds it, and this module holds no policy of any probe or signal.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TextIO

from otel_ebpf import __version__
from otel_ebpf.config import Config
from otel_ebpf.config_base import ProfilesProbeConfig
from otel_ebpf.endpoints.live import RecentStacks
from otel_ebpf.endpoints.server import Endpoints
from otel_ebpf.enrich.host import host_attributes
from otel_ebpf.enrich.identity import IdentityResolver
from otel_ebpf.export.otlp import OtlpShipper, make_otlp_exporter
from otel_ebpf.export.profile_sender import ProfilesSender, profiles_delivery
from otel_ebpf.export.profiles import ProfileExport
from otel_ebpf.export.summary import SummaryReport
from otel_ebpf.export.traces import SpanExport
from otel_ebpf.export.transport import OneAttempt
from otel_ebpf.health import HealthReporter
from otel_ebpf.kernel.engine import Engine
from otel_ebpf.kernel.syscalls import SyscallTable
from otel_ebpf.memory import trim_periodically
from otel_ebpf.model import Collection, ProfileType, SpanRecord, StackSample, Workload
from otel_ebpf.probe_host import ProbeHost, Routes
from otel_ebpf.probes import PROBE_TYPES, ProbeContext, Signal, build
from otel_ebpf.probes.cpu_profile import ON_CPU
from otel_ebpf.reload import Reloader, Wiring
from otel_ebpf.signals import needed
from otel_ebpf.signals.metrics import MetricsSignal
from otel_ebpf.signals.profiles import ProfilesSignal
from otel_ebpf.signals.spans import SpansSignal
from otel_ebpf.symbolize.unwind.shared import SharedUnwinder

log = logging.getLogger(__name__)

SHUTDOWN_BUDGET_S = 4.0  # the final flush gives up after this; SIGTERM-to-exit stays < 5 s


class Agent:
    def __init__(self, host: ProbeHost, identity: IdentityResolver, metrics: MetricsSignal,
                 spans: SpansSignal | None = None, profiles: ProfilesSignal | None = None,
                 summary: SummaryReport | None = None,
                 reloader: Reloader | None = None, health: HealthReporter | None = None,
                 endpoints: Endpoints | None = None) -> None:
        self.host = host
        self.identity = identity
        self.metrics = metrics
        self.spans = spans
        self.profiles = profiles
        self.summary = summary
        self.reloader = reloader
        # `otel-ebpf health` reads it: written while the probes are attached and drained
        self.health = health
        self.endpoints = endpoints  # /metrics, /healthz, /readyz, / (otel_ebpf.endpoints)
        self._stop = asyncio.Event()

    async def run(self, duration: float | None = None) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        if self.reloader is not None:
            loop.add_signal_handler(signal.SIGHUP, self.reloader.request)
        try:
            await self.identity.start()
            # the compilers start first (child processes), then the endpoints server, so
            # that importing aiohttp overlaps them; /healthz answers while they compile
            starting = asyncio.create_task(self.host.start(), name="start")
            await asyncio.sleep(0)
            if self.endpoints is not None:
                await self.endpoints.start()
            if not await starting:
                return 1
            jobs: list[tuple[str, Coroutine[Any, Any, None]]] = [
                ("export", self.metrics.run()), ("selection", self.host.run_selection()),
                ("memory", trim_periodically())]
            for name, job in (("summary", self.summary), ("spans", self.spans),
                              ("profiles", self.profiles)):
                if job is not None:
                    jobs.append((name, job.run()))
            if self.reloader is not None:
                jobs.append(("reload", self.reloader.run(self.host)))
            if self.health is not None:
                jobs.append(("health", self.health.run()))
            tasks = [asyncio.create_task(job, name=name) for name, job in jobs]
            log.info("otel-ebpf %s running: probes %s, exporting to %s%s", __version__,
                     ", ".join(p.name for p in self.host.probes) or "none",
                     self.metrics.endpoint, f", for {duration:g}s" if duration else "")
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=duration)
            except TimeoutError:
                log.info("--duration reached, stopping")
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.host.stop_workers()
            await self._final_flush()
            return 0
        finally:
            if self.health is not None:
                self.health.close()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self.host.stop_workers()
            self.host.detach()
            await self.identity.close()
            if self.endpoints is not None:
                await self.endpoints.stop()
            for runner in (self.metrics, self.profiles, self.summary):
                if runner is not None:
                    runner.close()

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("%s received, flushing and detaching", sig.name)
        self._stop.set()

    async def _final_flush(self) -> None:
        """Last drain, delivery and export within SHUTDOWN_BUDGET_S."""
        deadline = time.monotonic() + SHUTDOWN_BUDGET_S
        await self.host.last(deadline)
        for unit in (self.spans, self.profiles, self.summary, self.metrics):
            if unit is not None:
                await unit.last(deadline)


def build_agent(config: Config, engine: Engine, syscalls: SyscallTable,
                load_config: Callable[[], Config], out: TextIO = sys.stdout,
                health_file: Path | None = None) -> Agent:
    """The agent for `config`: a unit for each signal the probes produce, each signal's
    exporter (and its connection) only where a probe produces it. SpoolError: the spool
    directory cannot be used."""
    identity = IdentityResolver(config, host_attributes())
    signals = needed(config)
    start_ns = time.time_ns()
    exporting = config.exporter.enabled

    def shipper(signal: str) -> OtlpShipper:
        # the exporters attempt once per export: the agent owns the retry (transport.py)
        return OtlpShipper(OneAttempt(make_otlp_exporter(config.exporter, signal), signal),
                           config.exporter.resolved_endpoint(), signal)

    host: ProbeHost | None = None
    metrics = MetricsSignal(
        config.exporter, shipper("metrics") if exporting else None, identity.resolver,
        identity.alive, max(probe.exemplars_per_series(config.probes.section(name))
                            for name, probe in PROBE_TYPES.items()),
        lambda: host.settings() if host is not None else [], start_ns)
    spans = profiles = None
    if Signal.SPANS in signals:
        spans = SpansSignal(SpanExport(shipper("traces"), config.exporter, identity.resolver),
                            metrics)
    stacks = RecentStacks() if config.endpoints.enabled else None  # the live page's
    if Signal.PROFILES in signals:
        delivery = profiles_delivery(ProfilesSender(config.exporter), config.exporter,
                                     identity.sample_resolver) if exporting else None
        profiles = ProfilesSignal(ProfileExport(delivery, _folded_path(config), start_ns,
                                                _live_flame(stacks)),
                                  identity, config.exporter.interval, metrics.counters)
    summary = None
    if config.summary.enabled:
        summary = SummaryReport(config.summary.top, config.summary.interval,
                                lambda w: _process_name(identity, w), out)
    profile = config.probes.cpu_profile  # sizes the unwinder every stack probe shares
    context = ProbeContext(syscalls, select_cgroups=bool(
        config.identity.filter.model_dump(exclude_defaults=True)), unwinder=SharedUnwinder(
            profile.unwind_table_rows, profile.unwind_processes))
    host = ProbeHost(config, engine, build(config, context),
                     _routes(metrics, spans, profiles, summary), identity.selection)
    endpoints = (None if stacks is None
                 else Endpoints(config.endpoints, host, metrics, identity, stacks))
    reloader = Reloader(load_config, lambda c: build(c, context),
                        Wiring(spans=spans is not None, profiles=profiles is not None))
    health = None if health_file is None else HealthReporter(health_file, host.drain_ages)
    return Agent(host, identity, metrics, spans, profiles, summary, reloader, health,
                 endpoints)


def _routes(metrics: MetricsSignal, spans: SpansSignal | None,
            profiles: ProfilesSignal | None, summary: SummaryReport | None) -> Routes:
    def collection(c: Collection) -> None:
        metrics.absorb(c)
        if summary is not None:
            summary.add(c.records)

    def ignore(_: Any) -> None:
        return None

    def samples(c: Collection) -> None:
        if profiles is not None:
            profiles.add(c)

    span_route: Callable[[list[SpanRecord]], None] = spans.offer if spans else ignore
    return Routes(collection, samples, span_route)



def _live_flame(stacks: RecentStacks | None
                ) -> Callable[[ProfileType, list[StackSample]], None] | None:
    """The live page's flame graph: each window of CPU samples as the export takes it."""
    if stacks is None:
        return None

    def add(profile_type: ProfileType, samples: list[StackSample]) -> None:
        if profile_type == ON_CPU:
            stacks.add(samples)
    return add


def _folded_path(config: Config) -> Path | None:
    """Where the enabled profile-producing probes write folded stacks, if anywhere."""
    for name in PROBE_TYPES:
        section = config.probes.section(name)
        if isinstance(section, ProfilesProbeConfig) and section.enabled and section.folded_path:
            return section.folded_path
    return None


def _process_name(identity: IdentityResolver, workload: Workload) -> str:
    return (str(identity.processes.lookup(workload).executable_name) if workload.pid > 0
            else "(all)")
