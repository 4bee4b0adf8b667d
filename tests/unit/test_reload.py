"""Reload planning: which probes a new config reloads, which settings wait for a restart,
and what an invalid file or a probe that fails to start leaves running."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import pytest

from otel_ebpf import reload
from otel_ebpf.config import Config, ConfigError
from otel_ebpf.probes.base import Probe

WIRED = reload.Wiring(spans=True, profiles=True)


def config(**probes: Any) -> Config:
    return Config.model_validate({"probes": probes})


def test_only_changed_probe_sections_are_reloaded() -> None:
    running = config()
    new = config(tcp_retransmit={"aggregation": "connection"},
                 syscall_latency={"interval": "5s"})  # 5s is the default: unchanged
    assert reload.changed_probes(running, new) == ["tcp_retransmit"]
    assert reload.changed_probes(running, config(cpu_profile={"enabled": False})) == [
        "cpu_profile"]
    assert reload.changed_probes(running, running) == []


def test_settings_wired_at_start_keep_their_running_values() -> None:
    running = config()
    new = Config.model_validate({
        "exporter": {"interval": "3s"}, "service_name": "other",
        "probes": {"syscall_latency": {"interval": "1s",
                                       "slow_spans": {"exemplars_per_series": 2}}}})
    effective, kept = reload.runnable(running, new, WIRED)
    assert kept == ["service_name", "exporter",
                    "probes.syscall_latency.slow_spans.exemplars_per_series"]
    assert effective.exporter == running.exporter and effective.service_name == "otel-ebpf"
    assert effective.probes.syscall_latency.interval == 1.0  # the rest applies
    assert effective.probes.syscall_latency.slow_spans.exemplars_per_series == 4


def test_a_probe_cannot_start_a_signal_that_has_no_export() -> None:
    running = config(syscall_latency={"enabled": False}, cpu_profile={"enabled": False})
    new = config(syscall_latency={"interval": "1s"})  # enabled, with slow spans
    effective, kept = reload.runnable(running, new, reload.Wiring(spans=False,
                                                                   profiles=False))
    assert kept == ["probes.syscall_latency (its signal's export is made at start)",
                    "probes.cpu_profile (its signal's export is made at start)"]
    assert not effective.probes.syscall_latency.enabled
    assert not effective.probes.cpu_profile.enabled
    # without slow spans it needs no span export
    new = config(syscall_latency={"slow_spans": {"enabled": False}},
                 cpu_profile={"enabled": False})
    effective, kept = reload.runnable(running, new, reload.Wiring(spans=False,
                                                                   profiles=False))
    assert kept == [] and effective.probes.syscall_latency.enabled


@dataclass
class FakeProbe(Probe):  # type: ignore[misc]
    name: str = "x"  # type: ignore[misc]
    fail: bool = False

    def start(self, engine: Any) -> None: ...
    def verify(self, engine: Any) -> None: ...
    def collect(self) -> Any: ...
    def stop(self) -> None: ...


@dataclass
class Host:
    config: Config
    probes: list[Probe]
    swaps: list[tuple[list[str], list[str]]] = field(default_factory=list)

    async def swap_probes(self, old: list[Probe], new: list[Probe]) -> list[Probe]:
        self.swaps.append(([p.name for p in old], [p.name for p in new]))
        failed = [p for p in new if getattr(p, "fail", False)]
        self.probes = [p for p in self.probes if p not in old]
        self.probes += [p for p in new if p not in failed]
        return failed


def build(c: Config, failing: frozenset[str] = frozenset()) -> list[Probe]:
    return [FakeProbe(n, fail=n in failing and c.probes.tcp_retransmit.aggregation != "peer")
            for n in ("syscall_latency", "cpu_profile", "tcp_retransmit")
            if getattr(c.probes, n).enabled]


async def test_reload_swaps_the_changed_probe(caplog: pytest.LogCaptureFixture) -> None:
    host = Host(config(), build(config()))
    new = config(tcp_retransmit={"aggregation": "connection"})
    reloader = reload.Reloader(lambda: new, build, WIRED)
    with caplog.at_level(logging.INFO, "otel_ebpf"):
        await reloader.reload(host)
    assert host.swaps == [(["tcp_retransmit"], ["tcp_retransmit"])]
    assert host.config == new
    assert "probes reloaded: tcp_retransmit; untouched: syscall_latency, cpu_profile" in (
        caplog.text)


async def test_an_invalid_file_keeps_the_running_config(
    caplog: pytest.LogCaptureFixture
) -> None:
    running = config()
    host = Host(running, build(running))

    def broken() -> Config:
        raise ConfigError("invalid configuration:\n  probes.x: unknown key\nFix it")

    await reload.Reloader(broken, build, WIRED).reload(host)
    assert host.swaps == [] and host.config is running
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.getMessage() == (
        "reload: the new configuration is not used, the running one is kept: "
        "invalid configuration:; probes.x: unknown key; Fix it")


async def test_a_probe_that_fails_on_new_settings_comes_back_on_its_old_ones() -> None:
    running = config()
    host = Host(running, build(running))
    new = config(tcp_retransmit={"aggregation": "connection"})
    reloader = reload.Reloader(
        lambda: new, lambda c: build(c, frozenset({"tcp_retransmit"})), WIRED)
    await reloader.reload(host)
    assert host.swaps == [(["tcp_retransmit"], ["tcp_retransmit"]), ([], ["tcp_retransmit"])]
    assert host.config.probes.tcp_retransmit.aggregation == "peer"
    assert sorted(p.name for p in host.probes) == ["cpu_profile", "syscall_latency",
                                                   "tcp_retransmit"]
