"""SIGHUP: re-read the configuration and reload only the probes whose settings changed.

What the agent built at start from the configuration - its exporters and their queues, the
identity resolvers, the summary, the series store - stays as it is: a change to those
settings is logged as needing a restart and the running value is kept. An invalid file
keeps the whole running configuration.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from otel_ebpf.config import Config, ConfigError
from otel_ebpf.probes import PROBE_TYPES
from otel_ebpf.probes.base import AnyProbe, Signal
from otel_ebpf.signals import needed

log = logging.getLogger(__name__)

# settings read once, when the agent is wired: changing them takes a restart (each probe
# declares those of its section)
FIXED: tuple[tuple[str, ...], ...] = (
    ("service_name",), ("resource_attributes",), ("exporter",), ("summary",),
    ("identity",), ("endpoints",),
    *(("probes", name, *key.split(".")) for name, probe in PROBE_TYPES.items()
      for key in probe.wired_at_start),
)


@dataclass(frozen=True)
class Wiring:
    """The exports made at start: a probe cannot start producing a signal that has none."""

    spans: bool
    profiles: bool

    def made(self) -> frozenset[Signal]:
        return frozenset({Signal.METRICS} | {s for s, on in ((Signal.SPANS, self.spans),
                                                             (Signal.PROFILES, self.profiles))
                                             if on})


class ProbeHost(Protocol):
    config: Config
    probes: list[AnyProbe]

    async def swap_probes(self, old: list[AnyProbe], new: list[AnyProbe]) -> list[AnyProbe]: ...


def _get(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
    for part in path:
        tree = tree[part]
    return tree


def _put(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        tree = tree[part]
    tree[path[-1]] = value


def runnable(running: Config, new: Config, wiring: Wiring) -> tuple[Config, list[str]]:
    """`new` with every setting that cannot change at run time put back to its running
    value, and the dotted names of those that were."""
    tree, old = new.model_dump(), running.model_dump()
    kept = []
    for path in FIXED:
        if _get(tree, path) != _get(old, path):
            _put(tree, path, _get(old, path))
            kept.append(".".join(path))
    config = Config.model_validate(tree)
    # a probe section whose signal has no export made for it stays as it runs
    for name in PROBE_TYPES:
        path = ("probes", name)
        if needed(config, [name]) - wiring.made() and _get(tree, path) != _get(old, path):
            _put(tree, path, _get(old, path))
            kept.append(f"probes.{name} (its signal's export is made at start)")
            config = Config.model_validate(tree)
    return config, kept


def changed_probes(running: Config, new: Config) -> list[str]:
    """Names of the probes whose section differs (enabled or not)."""
    return [name for name in type(running.probes).model_fields
            if getattr(running.probes, name) != getattr(new.probes, name)]


def _one_line(exc: ConfigError) -> str:
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


class Reloader:
    """Re-reads the configuration on request (SIGHUP), one reload at a time: a request
    during a reload runs another after it."""

    def __init__(self, load: Callable[[], Config], build: Callable[[Config], list[AnyProbe]],
                 wiring: Wiring) -> None:
        self._load = load
        self._build = build
        self._wiring = wiring
        self._wanted = asyncio.Event()

    def request(self) -> None:
        self._wanted.set()

    async def run(self, host: ProbeHost) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            try:
                await self.reload(host)
            except Exception:
                log.exception("reload: failed; the agent runs on as it was")

    async def reload(self, host: ProbeHost) -> None:
        loop = asyncio.get_running_loop()
        try:
            new = await loop.run_in_executor(None, self._load)
        except ConfigError as exc:
            log.error("reload: the new configuration is not used, the running one is kept: "
                      "%s", _one_line(exc))
            return
        running = host.config
        new, kept = runnable(running, new, self._wiring)
        if kept:
            log.warning("reload: changed settings that need a restart (still running on "
                        "their previous values): %s", ", ".join(kept))
        logging.getLogger("otel_ebpf").setLevel(new.log_level.upper())
        names = changed_probes(running, new)
        old = [p for p in host.probes if p.name in names]
        failed = await host.swap_probes(
            old, await loop.run_in_executor(None, self._fresh, new, names))
        if failed:
            # back to the running settings for those: their old probes were stopped
            back = [p.name for p in failed]
            new = _with_probes(new, running, back)
            log.error("reload: probes %s did not start on the new settings; starting them "
                      "again on their previous ones", ", ".join(back))
            await host.swap_probes([], await loop.run_in_executor(None, self._fresh, new,
                                                                  back))
        host.config = new
        untouched = [p.name for p in host.probes if p.name not in names]
        log.info("reload: configuration applied; probes reloaded: %s; untouched: %s",
                 ", ".join(n for n in names if n not in {p.name for p in failed}) or "none",
                 ", ".join(untouched) or "none")

    def _fresh(self, config: Config, names: list[str]) -> list[AnyProbe]:
        return [p for p in self._build(config) if p.name in names]


def _with_probes(config: Config, source: Config, names: list[str]) -> Config:
    tree, other = config.model_dump(), source.model_dump()
    for name in names:
        tree["probes"][name] = other["probes"][name]
    return Config.model_validate(tree)
