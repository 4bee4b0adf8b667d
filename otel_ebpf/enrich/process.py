"""Process identity from /proc (via psutil), cached per (pid, start time).

A process that exited before its first lookup keeps the name the kernel recorded (comm), so
its last measurements are still attributed; nothing is invented beyond that.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime

import psutil

from otel_ebpf.model import AttributeValue, Workload


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    pid: int
    executable_name: str
    executable_path: str | None
    create_time: float | None
    command: str | None = None       # argv[0]
    command_line: str | None = None  # only when configured: arguments hold secrets
    owner: str | None = None

    def attributes(self) -> dict[str, AttributeValue]:
        attrs: dict[str, AttributeValue] = {
            "process.pid": self.pid,
            "process.executable.name": self.executable_name,
        }
        created = (datetime.fromtimestamp(self.create_time, UTC).isoformat()
                   if self.create_time else None)
        optional = (("process.executable.path", self.executable_path),
                    ("process.creation.time", created),
                    ("process.command", self.command),
                    ("process.command_line", self.command_line),
                    ("process.owner", self.owner))
        attrs.update({k: v for k, v in optional if v})
        return attrs


class ProcessEnricher:
    def __init__(self, max_entries: int = 65536, command_args: bool = False) -> None:
        self.max_entries = max_entries
        self.command_args = command_args
        self._cache: dict[int, ProcessInfo] = {}

    def lookup(self, workload: Workload) -> ProcessInfo:
        """Blocking (/proc reads): call from an executor for many pids at once."""
        cached = self._cache.get(workload.pid)
        try:
            proc = psutil.Process(workload.pid)
            create_time = proc.create_time()
        except (psutil.Error, ValueError):
            if cached is not None:
                return cached  # exited since: the last identity we saw is still right
            return ProcessInfo(workload.pid, workload.comm or f"pid {workload.pid}", None, None)
        if cached is not None and cached.create_time == create_time:
            return cached
        info = ProcessInfo(workload.pid, *_executable(proc, workload.comm), create_time,
                           *_command(proc, self.command_args), _owner(proc))
        if len(self._cache) >= self.max_entries:
            self._cache.pop(next(iter(self._cache)))
        self._cache[workload.pid] = info
        return info


def _executable(proc: psutil.Process, fallback: str) -> tuple[str, str | None]:
    # semconv: on Linux the executable name is the base name of /proc/<pid>/exe's target
    try:
        path = proc.exe()
    except psutil.Error:
        path = ""
    if path:
        return os.path.basename(path.removesuffix(" (deleted)")), path
    try:
        return proc.name() or fallback, None  # kernel threads have no exe
    except psutil.Error:
        return fallback, None


def pid_alive(workload: Workload) -> bool:
    return workload.pid <= 0 or os.path.exists(f"/proc/{workload.pid}")


def _command(proc: psutil.Process, with_args: bool) -> tuple[str | None, str | None]:
    try:
        argv = proc.cmdline()
    except psutil.Error:
        return None, None
    if not argv:
        return None, None
    return argv[0], (" ".join(argv) if with_args else None)


def _owner(proc: psutil.Process) -> str | None:
    try:
        return proc.username()
    except (psutil.Error, KeyError):
        return None
