"""`otel-ebpf health`: is the agent running here working? For a container HEALTHCHECK and
Kubernetes exec probes.

When $OTEL_EBPF_HEALTH_FILE names a file, the agent rewrites it every HEARTBEAT_S seconds
from the moment its probes are attached until it stops (then it removes it): its pid, the
time, and for each probe how long ago its drain thread last read the kernel maps. The
check reads it back: a missing file means no agent attached its probes (still compiling, or
gone); an old file means the agent's event loop is stuck; an old drain means that probe's
thread is. A collector that does not answer is not a failure: the agent keeps counting
and delivers when it returns, and a restart would lose what it holds.

A file, not a port: the endpoints server (/healthz, /readyz) may be off or bound to a
loopback address a pod's kubelet cannot reach, and this check must also work with a
read-only root filesystem (the file goes on a writable /tmp) and in the host's PID
namespace, where a container's processes are not told apart by pid. Both apply the same
rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "OTEL_EBPF_HEALTH_FILE"
HEARTBEAT_S = 5.0
STALE_S = 30.0  # no report for this long: the agent's event loop is not running
# a probe whose drain is later than this many of its intervals (and STALE_S) is stuck
DRAIN_INTERVALS = 3

# probe name -> (drain interval, seconds since its last completed drain)
DrainAges = Mapping[str, tuple[float, float]]


def path_from_env(environ: Mapping[str, str] | None = None) -> Path | None:
    value = (os.environ if environ is None else environ).get(ENV, "")
    return Path(value) if value else None


def write(path: Path, ages: DrainAges, now: float | None = None) -> None:
    """Replace `path` atomically (a reader never sees half a file)."""
    report = {"pid": os.getpid(), "time": time.time() if now is None else now,
              "probes": {name: {"interval": interval, "since_drain": round(age, 3)}
                         for name, (interval, age) in ages.items()}}
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(report))
    tmp.replace(path)


def check(path: Path, now: float | None = None) -> tuple[bool, str]:
    """(healthy, one line saying why) from the agent's last report."""
    now = time.time() if now is None else now
    try:
        report = json.loads(path.read_text())
        written, probes = float(report["time"]), dict(report["probes"])
        pid = int(report["pid"])
    except FileNotFoundError:
        return False, (f"no report at {path}: the agent has not attached its probes yet "
                       "(it compiles them first) or is not running")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return False, f"unreadable report at {path}: {exc}"
    age = now - written
    if age > STALE_S:
        return False, (f"the agent (pid {pid}) last reported {age:.0f}s ago (it does every "
                       f"{HEARTBEAT_S:g}s): its event loop is stuck or it was killed")
    stuck = []
    for name, state in sorted(probes.items()):
        since, interval = float(state["since_drain"]), float(state["interval"])
        if since > max(DRAIN_INTERVALS * interval, STALE_S):
            stuck.append(f"{name} (last drained {since:.0f}s ago, every {interval:g}s)")
    if stuck:
        return False, f"the agent (pid {pid}) no longer drains: {', '.join(stuck)}"
    drains = ", ".join(f"{name} {float(s['since_drain']):.1f}s ago"
                       for name, s in sorted(probes.items()))
    return True, f"the agent (pid {pid}) reported {age:.1f}s ago; drains: {drains or 'none'}"


class HealthReporter:
    """The agent's side: `run` writes the report every HEARTBEAT_S seconds (as a task on
    the agent's loop, so a stuck loop stops the reports), `close` removes it."""

    def __init__(self, path: Path, ages: Callable[[], DrainAges],
                 period: float = HEARTBEAT_S) -> None:
        self.path = path
        self._ages = ages
        self._period = period

    def write_once(self) -> None:
        write(self.path, self._ages())

    async def run(self) -> None:
        failing = False
        while True:
            try:
                self.write_once()
                failing = False
            except OSError as exc:
                if not failing:  # once per outage, not every period
                    log.error("cannot write the health report %s (%s): health checks of "
                              "this agent fail; set %s to a writable path", self.path,
                              exc.strerror, ENV)
                failing = True
            await asyncio.sleep(self._period)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()
