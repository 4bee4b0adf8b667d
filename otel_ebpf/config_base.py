"""The value types configuration sections are made of (durations, sizes, on/off words)
and the base classes of every section, probes' included. Probes import their config's
base from here: otel_ebpf.config assembles the whole from the probe registry.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ns|us|ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0,
                 None: 1.0}


def parse_duration(value: Any) -> Any:
    """'50us', '250ms', '10s', '2m', '1h' or a bare number of seconds -> seconds."""
    if isinstance(value, bool):
        return value  # let pydantic reject it as not a number
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and (m := _DURATION.match(value)):
        return float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    raise ValueError("expected a duration such as 500us, 10ms, 10s, 2m or a number of seconds")


Duration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]

_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB)?\s*$")
_UNIT_BYTES = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, None: 1}


def parse_size(value: Any) -> Any:
    """'512KiB', '8MiB', '1GiB' or a bare number of bytes -> bytes."""
    if isinstance(value, str) and (m := _SIZE.match(value)):
        return int(m.group(1)) * _UNIT_BYTES[m.group(2)]
    if isinstance(value, str):
        raise ValueError("expected a size such as 65536, 512KiB, 8MiB or 1GiB")
    return value


Size = Annotated[int, BeforeValidator(parse_size), Field(ge=1 << 16, le=1 << 34)]

# YAML 1.1 (PyYAML) reads unquoted on/off/yes/no/true/false as booleans: where a word
# setting offers on and off, those are what the user meant. Only such settings take them.
_SWITCH_WORDS = {"yes": "on", "true": "on", "no": "off", "false": "off"}


def switch_word(value: Any) -> Any:
    """True/False (and quoted yes/no/true/false) -> "on"/"off"; anything else as given."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str):
        return _SWITCH_WORDS.get(value.strip().lower(), value)
    return value


OnOffAuto = Annotated[Literal["auto", "on", "off"], BeforeValidator(switch_word)]


class Strict(BaseModel):
    """A section: unknown keys are errors, defaults are validated too."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class ProbeConfig(Strict):
    """What the agent reads of every probe's section: whether the probe runs, and how
    often its kernel maps are drained. Each probe's config class extends it, next to the
    probe (otel_ebpf/probes/<name>.py), with its own keys and defaults."""

    enabled: bool = True
    interval: Duration = 5.0


class ProfilesProbeConfig(ProbeConfig):
    """The section of a probe that produces profiles."""

    # also write collapsed stacks ("a;b;c N", cumulative) here, for flamegraph tools
    folded_path: Path | None = None
