"""What every probe is: a `.bpf.c` under probes/ and the small class that loads it and
decodes its maps into `otel_ebpf.model` records."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

from otel_ebpf.kernel.engine import Engine, Program
from otel_ebpf.model import Collection, MetricDescriptor, SpanRecord


@dataclass(frozen=True)
class Hook:
    """A kernel attach point. `event` is the tracefs event ("raw_syscalls/sys_enter") whose
    presence `doctor` checks, or None for perf events."""

    kind: str  # raw_tracepoint | tracepoint | perf_event
    event: str | None
    note: str = ""

    def __str__(self) -> str:
        text = f"{self.kind}:{self.event}" if self.event else self.kind
        return f"{text} ({self.note})" if self.note else text


class Probe(abc.ABC):
    name: ClassVar[str]
    summary: ClassVar[str]
    hooks: ClassVar[tuple[Hook, ...]]
    exports: ClassVar[tuple[MetricDescriptor, ...]]
    _program: Program | None = None

    def set_cgroup_filter(self, cgroup_ids: set[int]) -> None:
        """Record only tasks in these cgroups (the workload filter). Probes that were built
        with a dynamic cgroup filter apply it in the kernel; others ignore it."""
        return None

    def program_ids(self) -> list[int]:
        """The kernel ids of this probe's loaded programs, for logs and `bpftool`."""
        return self._program.program_ids() if self._program is not None else []

    @abc.abstractmethod
    def start(self, engine: Engine) -> None:
        """Compile, load and attach. Raises EngineError with an actionable message."""

    @abc.abstractmethod
    def verify(self, engine: Engine) -> None:
        """Compile and pass the verifier without attaching (for `doctor`)."""

    @abc.abstractmethod
    def collect(self) -> Collection:
        """Drain the kernel maps: the records since the previous call. Blocking (map
        syscalls); the daemon runs it in an executor."""

    def event_fds(self) -> list[int]:
        """Descriptors that poll readable when poll_spans has events to read."""
        return self._program.event_fds() if self._program is not None else []

    def poll_spans(self) -> list[SpanRecord]:
        """Events the kernel streamed since the previous call, as spans; never waits.
        Most probes have none."""
        return []

    @abc.abstractmethod
    def stop(self) -> None:
        """Detach and unload. Safe to call twice and after a failed start."""
