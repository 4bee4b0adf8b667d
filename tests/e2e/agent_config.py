"""The configuration file of an agent under test, as YAML text for ``AgentProcess``: a test
names the probes it runs with the settings it is about, and the sections it changes;
every other probe of the registry is off, so a probe added later changes no older test."""

from __future__ import annotations

from typing import Any

import yaml

from otel_ebpf.probes import PROBE_TYPES

# What every test agent shares: no summary table on stdout; no questions to a Docker or
# podman engine the host may run (the identities under test come from cgroup names); no
# /metrics server unless the test asks for one on a port of its own (the default, 9464,
# may be another agent's on a shared machine)
TEST_AGENT: dict[str, Any] = {
    "summary": {"enabled": False},
    "identity": {"docker": {"enabled": False}},
    "endpoints": {"enabled": False},
}


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` merged in, mapping by mapping; neither is changed."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def agent_config(probes: dict[str, dict[str, Any]], **sections: Any) -> str:
    """TEST_AGENT with `sections` (``exporter={...}``, ``endpoints={...}``, ...) merged in;
    the probes named in `probes` with their settings (``{}``: the defaults), the others
    disabled."""
    unknown = sorted(set(probes) - set(PROBE_TYPES))
    if unknown:
        raise ValueError(f"no probe {', '.join(unknown)}; the registry has "
                         f"{', '.join(PROBE_TYPES)}")
    config = merged(TEST_AGENT, sections)
    config["probes"] = {name: probes.get(name, {"enabled": False}) for name in PROBE_TYPES}
    return yaml.safe_dump(config, sort_keys=False)
