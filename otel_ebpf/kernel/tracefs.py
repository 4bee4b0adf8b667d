"""tracefs: where the kernel lists its trace events, and what an event's format holds."""

from __future__ import annotations

from pathlib import Path

TRACEFS_ROOTS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))


def tracefs_root() -> Path | None:
    return next((p for p in TRACEFS_ROOTS if (p / "events").is_dir()), None)


def event_has_field(event: str, field: str, root: Path | None = None) -> bool:
    """Whether the trace event ("tcp/tcp_retransmit_skb") has a field of this name in
    this kernel; False when tracefs or the event is missing."""
    root = root or tracefs_root()
    if root is None:
        return False
    try:
        text = (root / "events" / event / "format").read_text()
    except OSError:
        return False
    return any(line.split(";")[0].strip().endswith(f" {field}")
               for line in text.splitlines() if "field:" in line)
