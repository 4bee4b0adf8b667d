"""A probe's own counters by name, from the one place that defines them: the
`enum probe_stat` of its .bpf.c (probes/probe_stats.h indexes its counter array by it).

Names follow values, so reordering or inserting entries in the C cannot mislabel a
counter; an enum with gaps or repeated values, or without STAT_COUNT, is refused.
"""

from __future__ import annotations

import re

_ENUM = re.compile(r"\benum\s+probe_stat\s*\{(?P<body>.*?)\}\s*;", re.S)
_COMMENTS = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_ENTRY = re.compile(r"^STAT_(?P<name>[A-Z0-9_]+)\s*(?:=\s*(?P<value>\d+))?$")


class StatsError(ValueError):
    """The source has no usable enum probe_stat."""


def stat_names(source: str) -> tuple[str, ...]:
    """The counters' names ("map_full" for STAT_MAP_FULL), in the order of their index."""
    found = _ENUM.search(_COMMENTS.sub(" ", source))
    if found is None:
        raise StatsError("no `enum probe_stat { ... };` in the source")
    by_value: dict[int, str] = {}
    count: int | None = None
    value = -1
    for entry in filter(None, (e.strip() for e in found.group("body").split(","))):
        parsed = _ENTRY.match(entry)
        if parsed is None:
            raise StatsError(f"enum probe_stat: {entry!r} is not STAT_<NAME> [= <n>]")
        value = int(parsed.group("value")) if parsed.group("value") else value + 1
        name = parsed.group("name")
        if name == "COUNT":
            count = value
        elif value in by_value:
            raise StatsError(f"enum probe_stat: STAT_{name} repeats value {value} "
                             f"(STAT_{by_value[value].upper()})")
        else:
            by_value[value] = name.lower()
    if count is None:
        raise StatsError("enum probe_stat has no STAT_COUNT")
    if sorted(by_value) != list(range(count)):
        raise StatsError(f"enum probe_stat: values {sorted(by_value)} are not 0.."
                         f"{count - 1} (STAT_COUNT = {count})")
    return tuple(by_value[i] for i in range(count))
