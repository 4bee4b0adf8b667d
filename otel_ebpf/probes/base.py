"""The probe contract. A probe is its `probes/<name>.bpf.c` and a class that declares what
it is - the hooks it attaches to, the signals it produces, its config class, which of its
own counters are lost events - and decodes its maps into `otel_ebpf.model` records.

The base class does the rest, the same way for every probe: compile and verify, fill the
in-kernel cgroup filter (probes/cgroup_filter.h), attach the hooks in their declared
order (an optional hook that cannot attach is logged and skipped), count the program's
own counters by the names of its `enum probe_stat` (probes/probe_stats.h) and stop.
"""

from __future__ import annotations

import abc
import enum
import functools
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeAlias, TypeVar

from otel_ebpf.config_base import ProbeConfig
from otel_ebpf.kernel.cgroupfs import cgroup_id
from otel_ebpf.kernel.engine import Engine, EngineError, Program, bpf_source, update_set_map
from otel_ebpf.kernel.syscalls import SyscallTable
from otel_ebpf.model import Collection, MetricDescriptor, ProfileType, Setting, SpanRecord
from otel_ebpf.probes.stats import stat_names
from otel_ebpf.symbolize.unwind.shared import SharedUnwinder

log = logging.getLogger(__name__)

C = TypeVar("C", bound=ProbeConfig)
HOOK_KINDS = ("raw_tracepoint", "tracepoint", "perf_event")


class Signal(enum.Enum):
    """What a probe's records become: the agent wires an export per signal."""

    METRICS = "metrics"
    SPANS = "spans"
    PROFILES = "profiles"


@dataclass(frozen=True)
class Hook:
    """A kernel attach point and the BPF function attached to it. `event` is the tracefs
    event ("sched/sched_switch") whose presence `doctor` checks, None for perf events.
    A probe runs without an optional hook that this kernel lacks (`note` says what is
    then missing)."""

    kind: str  # one of HOOK_KINDS
    event: str | None
    function: str
    required: bool = True
    note: str = ""

    def __post_init__(self) -> None:
        if self.kind not in HOOK_KINDS:
            raise ValueError(f"hook kind {self.kind!r} is not one of {HOOK_KINDS}")
        if (self.event is None) != (self.kind == "perf_event"):
            raise ValueError("tracepoints name their event; perf events have none")

    def __str__(self) -> str:
        text = f"{self.kind}:{self.event}" if self.event else self.kind
        notes = [n for n in ("" if self.required else "optional", self.note) if n]
        return f"{text} ({'; '.join(notes)})" if notes else text


@dataclass(frozen=True)
class ProbeContext:
    """What the agent hands every probe it builds: the syscall names of this kernel,
    whether the workload filter (identity.filter) asks for in-kernel cgroup filtering, and
    the user-stack unwinder the stack probes share."""

    syscalls: SyscallTable
    select_cgroups: bool = False
    unwinder: SharedUnwinder = field(default_factory=SharedUnwinder)


@functools.cache
def _stat_names(probe: str) -> tuple[str, ...]:
    return stat_names(bpf_source(probe))


class Probe(abc.ABC, Generic[C]):
    """A probe, declared. Subclasses set the class attributes below and implement
    `collect` (the decoder); `program_flags`, `prepare` and the class methods are theirs
    to extend."""

    name: ClassVar[str]  # its config section, and probes/<name>.bpf.c
    summary: ClassVar[str]
    config_class: ClassVar[type[ProbeConfig]]
    hooks: ClassVar[tuple[Hook, ...]]  # in the order they are attached
    signals: ClassVar[frozenset[Signal]] = frozenset({Signal.METRICS})
    exports: ClassVar[tuple[MetricDescriptor, ...]]
    # which counters of its enum probe_stat are events it could not record (exported as
    # otel_ebpf.probe.lost_events); the others are totals for its own use
    lost_stats: ClassVar[tuple[str, ...]] = ()
    # whether its program includes cgroup_filter.h (the workload filter applies to it)
    filters_cgroups: ClassVar[bool] = False
    # what its stack samples count (probes with the PROFILES signal)
    profile_type: ClassVar[ProfileType | None] = None
    # dotted keys of its section that the agent reads once, when it is wired: changing
    # them takes a restart (reload keeps their running values)
    wired_at_start: ClassVar[tuple[str, ...]] = ()

    config: C
    select_cgroups: bool = False
    _program: Program | None = None
    _selected: frozenset[int] = frozenset()
    _stats_seen: list[int] | None = None
    _cflags: list[str] | None = None

    def __init__(self, config: C, *, select_cgroups: bool = False) -> None:
        self.config = config
        self.select_cgroups = select_cgroups and self.filters_cgroups

    # ---- the declaration, read by the registry, the daemon, reload and doctor ----------

    @classmethod
    def create(cls, config: ProbeConfig, context: ProbeContext) -> Probe[Any]:
        """The probe for this section; every probe is built this way."""
        return cls(config, select_cgroups=context.select_cgroups)  # type: ignore[arg-type]

    @classmethod
    def produces(cls, config: ProbeConfig) -> frozenset[Signal]:
        """The signals it produces with this section (none when disabled)."""
        return cls.signals if config.enabled else frozenset()

    @classmethod
    def exemplars_per_series(cls, config: ProbeConfig) -> int:
        """How many of its spans each metric series keeps as exemplars."""
        return 0

    @classmethod
    def stat_names(cls) -> tuple[str, ...]:
        """Its counters, by index, from the enum probe_stat of its .bpf.c."""
        return _stat_names(cls.name)

    # ---- build -------------------------------------------------------------------------

    def program_flags(self) -> list[str]:
        """The -D switches of its program, from its config."""
        return []

    def cgroup_filter_specs(self) -> list[int | str]:
        """Cgroups (ids or paths) its own config restricts it to, beside the workload
        filter's."""
        return []

    def sample_frequency(self) -> int:
        """Samples per second per CPU, for a probe with a perf_event hook."""
        raise EngineError(f"{self.name}: a perf_event hook needs a sample frequency")

    def cflags(self) -> list[str]:
        if self._cflags is None:
            flags = self.program_flags()
            if self.filters_cgroups and (self.select_cgroups or self.cgroup_filter_specs()):
                flags.append("-DFILTER_CGROUP")
            self._cflags = flags
        return self._cflags

    def verify(self, engine: Engine) -> None:
        """Compile and pass the verifier without attaching (for `doctor`)."""
        engine.verify(self.name, self.cflags(), [(h.function, h.kind) for h in self.hooks])

    def start(self, engine: Engine) -> None:
        """Compile, load and attach. Raises EngineError with an actionable message."""
        program = engine.load(self.name, self.cflags())
        self._program = program
        try:
            self.prepare(program)
            if self.filters_cgroups and (self.select_cgroups or self.cgroup_filter_specs()):
                self._selected = frozenset()
                self._fill_cgroup_filter(program, set())
            for hook in self.hooks:
                self._attach(program, hook)
        except Exception:
            self.stop()
            raise

    def prepare(self, program: Program) -> None:
        """Between load and attach: fill its maps, open its event buffers."""

    def _attach(self, program: Program, hook: Hook) -> None:
        try:
            if hook.kind == "perf_event":
                program.attach_cpu_clock(hook.function, self.sample_frequency())
                return
            assert hook.event is not None
            if hook.kind == "raw_tracepoint":
                program.attach_raw_tracepoint(hook.event.rsplit("/", 1)[-1], hook.function)
            else:
                program.attach_tracepoint(hook.event.replace("/", ":"), hook.function)
        except EngineError as exc:
            if hook.required:
                raise
            log.warning("%s: optional hook %s not attached, running without it: %s",
                        self.name, hook, exc)

    # ---- run ---------------------------------------------------------------------------

    @abc.abstractmethod
    def collect(self) -> Collection:
        """Drain the kernel maps: the records since the previous call. Blocking (map
        syscalls); the daemon runs it on a thread of its own."""

    def take_stats(self) -> dict[str, int]:
        """How much each of the program's counters grew since the previous call."""
        if self._program is None:
            return {}
        totals = self._program.map("probe_stats").percpu_sums()
        seen = self._stats_seen or [0] * len(totals)
        self._stats_seen = totals
        return {name: total - before for name, total, before
                in zip(self.stat_names(), totals, seen, strict=True)}

    def lost(self, grown: dict[str, int]) -> dict[str, int]:
        """The lost events among counters that grew (take_stats)."""
        return {name: grown[name] for name in self.lost_stats if grown.get(name, 0) > 0}

    def set_cgroup_filter(self, cgroup_ids: set[int]) -> None:
        """Record only tasks in these cgroups (the workload filter), with those of its own
        config. A probe without the filter, or built without select_cgroups, ignores it."""
        if self._program is not None and self.select_cgroups:
            self._fill_cgroup_filter(self._program, cgroup_ids)

    def _fill_cgroup_filter(self, program: Program, cgroup_ids: set[int]) -> None:
        wanted = cgroup_ids | {cgroup_id(spec) for spec in self.cgroup_filter_specs()}
        self._selected = frozenset(update_set_map(program.map("cgroup_filter"),
                                                  set(self._selected), wanted))

    def settings(self) -> list[Setting]:
        """Its settings that readers of its data need (exported as gauges)."""
        return []

    def program_ids(self) -> list[int]:
        """The kernel ids of this probe's loaded programs, for logs and `bpftool`."""
        return self._program.program_ids() if self._program is not None else []

    def event_fds(self) -> list[int]:
        """Descriptors that poll readable when poll_spans has events to read."""
        return self._program.event_fds() if self._program is not None else []

    def poll_spans(self) -> list[SpanRecord]:
        """Events the kernel streamed since the previous call, as spans; never waits.
        Most probes have none."""
        return []

    def stop(self) -> None:
        """Detach and unload. Safe to call twice and after a failed start."""
        if self._program is not None:
            self._program.close()
            self._program = None


AnyProbe: TypeAlias = Probe[Any]  # a probe of whatever config, as the agent holds them
