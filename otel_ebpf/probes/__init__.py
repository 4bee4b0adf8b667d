"""The probe registry. Adding a probe: its probes/<name>.bpf.c, its module
otel_ebpf/probes/<name>.py (the probe class with its declared contract and decoder, and
its config class), and one line in PROBES. The agent builds, routes and configures every
probe from its declaration (otel_ebpf/probes/base.py): the `probes.<name>` config section
comes from its config class, its exports from the signals it declares.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from otel_ebpf.probes.base import AnyProbe, Hook, Probe, ProbeContext, Signal

if TYPE_CHECKING:
    from otel_ebpf.config import Config

__all__ = ["PROBES", "PROBE_TYPES", "AnyProbe", "Hook", "Probe", "ProbeContext", "Signal",
           "build", "enabled_names", "produced", "types_producing"]

# one line per probe: <name>:<class>, its module otel_ebpf/probes/<name>.py
PROBES = (
    "syscall_latency:SyscallLatency",
    "cpu_profile:CpuProfile",
    "tcp_retransmit:TcpRetransmit",
    "runqueue_latency:RunqueueLatency",
    "off_cpu:OffCpu",
)


def _probe_type(entry: str) -> type[Probe[Any]]:
    name, _, class_name = entry.partition(":")
    probe = getattr(importlib.import_module(f"{__name__}.{name}"), class_name)
    if not (isinstance(probe, type) and issubclass(probe, Probe)
            and getattr(probe, "name", None) == name):
        raise TypeError(f"probe registry: {entry} is not a Probe named {name!r}")
    return probe


PROBE_TYPES: dict[str, type[Probe[Any]]] = {
    probe.name: probe for probe in map(_probe_type, PROBES)}


def enabled_names(config: Config) -> list[str]:
    return [name for name in PROBE_TYPES if config.probes.section(name).enabled]


def build(config: Config, context: ProbeContext) -> list[AnyProbe]:
    """The enabled probes, constructed but not started."""
    return [probe.create(config.probes.section(name), context)
            for name, probe in PROBE_TYPES.items() if config.probes.section(name).enabled]


def produced(config: Config, names: Iterable[str] | None = None) -> frozenset[Signal]:
    """The signals the probes (all, or those named) produce with this config."""
    wanted = PROBE_TYPES if names is None else names
    return frozenset().union(*(PROBE_TYPES[name].produces(config.probes.section(name))
                               for name in wanted))


def types_producing(signal: Signal) -> list[type[Probe[Any]]]:
    """The probe types that declare this signal."""
    return [probe for probe in PROBE_TYPES.values() if signal in probe.signals]
