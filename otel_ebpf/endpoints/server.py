"""The aiohttp server: /metrics, /healthz, /readyz, and the live page (/ and its JSON,
/api/live and /api/profile; otel_ebpf.endpoints.live).

/metrics renders on a thread of its own (resolving identities reads /proc), one scrape at
a time. The health rules are `otel-ebpf health`'s (otel_ebpf.health): /healthz is 200
while the event loop answers and every probe's drain thread keeps draining, else 503
naming the stuck probe; /readyz is 200 when, besides, every enabled probe has its programs
loaded. Both say the last metrics export's state in their JSON body, but a collector that
does not answer fails neither: the agent keeps counting and delivers when it returns.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry.sdk.metrics.export import Metric as OtelMetric
from opentelemetry.sdk.metrics.export import MetricsData

from otel_ebpf.config import Config, EndpointsConfig
from otel_ebpf.endpoints.live import (
    RecentStacks,
    flame_tree,
    health_view,
    retransmit_view,
    syscall_view,
)
from otel_ebpf.enrich.identity import AGENT
from otel_ebpf.health import DRAIN_INTERVALS, STALE_S, DrainAges
from otel_ebpf.model import Workload

if TYPE_CHECKING:
    from aiohttp import web

    from otel_ebpf.aggregate import CumulativeStore
    from otel_ebpf.enrich.identity import IdentityResolver
    from otel_ebpf.export.agent_metrics import MapFill
    from otel_ebpf.model import Setting

log = logging.getLogger(__name__)

RENDER_TIMEOUT_S = 10.0  # a scrape that takes longer is answered 503
STATIC = {"/": ("index.html", "text/html"), "/live.js": ("live.js", "text/javascript"),
          "/live.css": ("live.css", "text/css")}
# the page loads only its own files and talks only to this server; nothing inline
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self'; base-uri 'none'; "
                               "frame-ancestors 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store"}


class HostView(Protocol):
    """What the endpoints read of the running probes (otel_ebpf.probe_host.ProbeHost)."""

    config: Config
    probes: list[Any]

    def drain_ages(self) -> DrainAges: ...

    def settings(self) -> list[Setting]: ...


class MetricsView(Protocol):
    """What they read of the metrics unit (otel_ebpf.signals.metrics.MetricsSignal)."""

    store: CumulativeStore
    map_fill: MapFill
    shipper: Any  # OtlpShipper | None


class Endpoints:
    def __init__(self, config: EndpointsConfig, host: HostView, metrics: MetricsView,
                 identity: IdentityResolver, stacks: RecentStacks | None = None) -> None:
        self.config = config
        self.host = host
        self.metrics = metrics
        self.identity = identity
        self.start_ns = time.time_ns()
        self.url: str | None = None  # once serving
        self._runner: web.AppRunner | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="scrape")
        self._registry: Any = None
        # CPU samples for the flame graph (the probes' sample route adds)
        self.stacks = stacks if stacks is not None else RecentStacks()

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> bool:
        """Serve; False (logged) when the address cannot be bound: the agent runs on
        without its endpoints."""
        from aiohttp import web
        from prometheus_client import CollectorRegistry

        from otel_ebpf.endpoints.prometheus import MetricsCollector

        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(MetricsCollector(self.snapshot))
        app = web.Application(client_max_size=4096)  # GETs only: no body worth reading
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        for path in STATIC:
            app.router.add_get(path, self._static)
        app.router.add_get("/api/live", self._json(self.live))
        app.router.add_get("/api/profile", self._json(self.profile))
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.config.address, self.config.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            log.error("endpoints: cannot listen on %s port %d (%s); /metrics, /healthz and "
                      "/readyz are off until a restart. Set endpoints.port to a free port, "
                      "or endpoints.enabled: false.", self.config.address, self.config.port,
                      exc.strerror or exc)
            return False
        self._runner = runner
        host, port = runner.addresses[0][:2]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        log.info("endpoints: serving /metrics, /healthz, /readyz on %s", self.url)
        return True

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- content ---------------------------------------------------------------------

    def agent_metrics(self, start_ns: int) -> list[OtelMetric]:
        """The agent's own metrics as the export reads them: process, map fill, settings."""
        from otel_ebpf.export.agent_metrics import process_metrics, setting_metrics

        return (process_metrics(start_ns) + self.metrics.map_fill.metrics(start_ns)
                + setting_metrics(self.host.settings(), start_ns))

    def snapshot(self) -> MetricsData:
        """What an export would send now (blocking: identities come from /proc)."""
        from otel_ebpf.export.metrics import build_metrics_data
        from otel_ebpf.export.metrics_export import with_series_gauge

        series = self.metrics.store.series()
        identity_of = self.identity.resolver(s.workload for s in series)
        data = build_metrics_data(series, identity_of)
        return with_series_gauge(data, identity_of(AGENT).resource, self.start_ns,
                                 self.agent_metrics(self.start_ns))

    def render(self, accept: str) -> tuple[bytes, str]:
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(accept)
        return encoder(self._registry), content_type

    def live(self) -> dict[str, Any]:
        """The live page's data now (blocking: identities come from /proc)."""
        series = self.metrics.store.series()
        identity_of = self.identity.resolver(s.workload for s in series)
        return {"time": time.time(), "ready": self.readiness()[1],
                "health": health_view(self.agent_metrics(self.start_ns), series),
                "syscalls": syscall_view(series, identity_of),
                "retransmits": retransmit_view(series, identity_of)}

    def profile(self) -> dict[str, Any]:
        """Flame graph of the last minutes of CPU samples (blocking)."""
        totals = self.stacks.totals()
        identity_of = self.identity.resolver(w for w, _ in totals)

        def process_name(workload: Workload) -> str:
            name = identity_of(workload).point.get("process.executable.name")
            return str(name or workload.comm or workload.pid)

        return {"window_seconds": self.stacks.window_s,
                "dropped": self.stacks.dropped, "root": flame_tree(totals, process_name)}

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Alive: no probe's drain is stuck (otel_ebpf.health's rule)."""
        stuck = {name: round(age, 1) for name, (interval, age) in self.host.drain_ages().items()
                 if age > max(DRAIN_INTERVALS * interval, STALE_S)}
        shipper = self.metrics.shipper
        if shipper is None:
            export = "disabled"
        elif shipper.in_outage:
            export = "failing"
        else:
            export = "ok" if shipper.exported else "pending"
        body: dict[str, Any] = {"alive": not stuck, "metrics_export": export}
        if stuck:
            body["stuck_drains_seconds"] = stuck
        return not stuck, body

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready: alive, and every enabled probe has its programs loaded."""
        from otel_ebpf.probes import enabled_names

        alive, body = self.health()
        attached = {p.name for p in self.host.probes if p.program_ids()}
        probes = {name: "attached" if name in attached else "not attached"
                  for name in enabled_names(self.host.config)}
        ready = alive and all(state == "attached" for state in probes.values())
        return ready, {"ready": ready, "probes": probes, **body}

    # ---- handlers --------------------------------------------------------------------

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        loop = asyncio.get_running_loop()
        try:
            body, content_type = await asyncio.wait_for(
                loop.run_in_executor(self._pool, self.render,
                                     request.headers.get("Accept", "")), RENDER_TIMEOUT_S)
        except TimeoutError:
            return web.Response(status=503, text="rendering /metrics timed out\n")
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    def _json(self, build: Callable[[], dict[str, Any]]
              ) -> Callable[[web.Request], Any]:
        async def handler(_: web.Request) -> web.StreamResponse:
            from aiohttp import web

            loop = asyncio.get_running_loop()
            try:
                body = await asyncio.wait_for(loop.run_in_executor(self._pool, build),
                                              RENDER_TIMEOUT_S)
            except TimeoutError:
                return web.Response(status=503, text="timed out\n")
            return web.Response(text=json.dumps(body), content_type="application/json",
                                headers=SECURITY_HEADERS)

        return handler

    async def _static(self, request: web.Request) -> web.StreamResponse:
        from importlib.resources import files

        from aiohttp import web

        name, content_type = STATIC[request.path]
        body = files("otel_ebpf.endpoints").joinpath("static", name).read_bytes()
        return web.Response(body=body, content_type=content_type, headers=SECURITY_HEADERS)

    async def _healthz(self, _: web.Request) -> web.StreamResponse:
        from aiohttp import web

        alive, body = self.health()
        return web.Response(status=200 if alive else 503, text=json.dumps(body) + "\n",
                            content_type="application/json")

    async def _readyz(self, _: web.Request) -> web.StreamResponse:
        from aiohttp import web

        ready, body = self.readiness()
        return web.Response(status=200 if ready else 503, text=json.dumps(body) + "\n",
                            content_type="application/json")
