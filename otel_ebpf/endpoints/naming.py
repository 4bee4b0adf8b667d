"""OpenTelemetry names as Prometheus names, by the OpenTelemetry specification's
"Prometheus and OpenMetrics compatibility" rules.

A metric's name has its invalid characters replaced by `_`, then its unit as a suffix
(`s` -> `_seconds`, `By` -> `_bytes`, `1` -> `_ratio` for gauges; annotations such as
`{segment}` are dropped), then `_total` for a monotonic counter (prometheus_client adds
that one). Attribute keys become label names the same way; two keys that collide once
sanitised share one label, their values joined by `;` in the order of the original keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from otel_ebpf.model import AttributeValue

_INVALID_NAME = re.compile(r"[^a-zA-Z0-9_:]+")
_INVALID_LABEL = re.compile(r"[^a-zA-Z0-9_]+")
_UNDERSCORES = re.compile(r"__+")
_ANNOTATION = re.compile(r"\{[^}]*\}")

# UCUM units -> Prometheus' words (the specification's table, the ones an agent meets)
_UNIT_WORDS = {
    "d": "days", "h": "hours", "min": "minutes", "s": "seconds", "ms": "milliseconds",
    "us": "microseconds", "ns": "nanoseconds",
    "By": "bytes", "KiBy": "kibibytes", "MiBy": "mebibytes", "GiBy": "gibibytes",
    "KBy": "kilobytes", "MBy": "megabytes", "GBy": "gigabytes",
    "bit": "bits", "m": "meters", "V": "volts", "A": "amperes", "J": "joules",
    "W": "watts", "g": "grams", "Cel": "celsius", "Hz": "hertz", "%": "percent",
}
_PER_WORDS = {"s": "second", "min": "minute", "h": "hour", "d": "day", "m": "meter"}


def unit_suffix(unit: str, gauge: bool = False) -> str:
    """The name suffix for an OpenTelemetry unit, without the leading `_` ('' for none)."""
    unit = _ANNOTATION.sub("", unit).strip()
    if unit == "1":
        return "ratio" if gauge else ""
    if not unit:
        return ""
    main, _, per = unit.partition("/")
    words = [_UNIT_WORDS.get(main, main)] if main else []
    if per:
        words.append("per_" + _PER_WORDS.get(per, per))
    return _sanitise("_".join(words), _INVALID_NAME)


def _sanitise(text: str, invalid: re.Pattern[str]) -> str:
    return _UNDERSCORES.sub("_", invalid.sub("_", text)).strip("_")


def metric_name(name: str, unit: str, gauge: bool = False) -> tuple[str, str]:
    """(Prometheus name without `_total`, its unit word) for an OpenTelemetry metric."""
    base = _sanitise(name, _INVALID_NAME)
    if base[:1].isdigit():
        base = "_" + base
    suffix = unit_suffix(unit, gauge)
    if suffix and not base.endswith("_" + suffix):
        base = f"{base}_{suffix}"
    return base, suffix


def label_name(key: str) -> str:
    label = _sanitise(key, _INVALID_LABEL) or "_"
    return "key_" + label if label[:1].isdigit() else label


def label_value(value: AttributeValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def labels_of(attributes: Mapping[str, AttributeValue]) -> dict[str, str]:
    """Attributes as Prometheus labels (names sanitised, colliding ones joined)."""
    labels: dict[str, str] = {}
    for key in sorted(attributes):
        name = label_name(key)
        value = label_value(attributes[key])
        labels[name] = f"{labels[name]};{value}" if name in labels else value
    return labels
