"""The agent's signals, one unit each (metrics, spans, profiles): what a probe's records
become once collected. Which units the agent wires follows from what the enabled probes
declare they produce (otel_ebpf/probes), never from which probes they are.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from otel_ebpf.config_base import ProfilesProbeConfig
from otel_ebpf.probes import PROBE_TYPES, Signal

if TYPE_CHECKING:
    from otel_ebpf.config import Config


def needed(config: Config, names: Iterable[str] | None = None) -> frozenset[Signal]:
    """The signals of these probes (default: all) that need a unit: metrics always;
    spans when they are exported; profiles when they are exported, written as folded
    stacks or shown on the live page (its flame graph is fed from the profile windows)."""
    wanted: set[Signal] = {Signal.METRICS}
    for name in PROBE_TYPES if names is None else names:
        section = config.probes.section(name)
        kept = config.endpoints.enabled or (isinstance(section, ProfilesProbeConfig)
                                            and section.folded_path is not None)
        wanted |= {signal for signal in PROBE_TYPES[name].produces(section)
                   if config.exporter.enabled or (signal is Signal.PROFILES and kept)}
    return frozenset(wanted)
