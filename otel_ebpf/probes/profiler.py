"""What every stack-profile probe shares (cpu_profile, off_cpu): a program that records
(thread, stacks) samples with probes/stacks.h, walks user stacks with the agent's shared
DWARF unwinder (symbolize/unwind/shared.py) and announces each process it sees first on
its `new_tgids` ring buffer, so that its maps are read while it lives.

A profiler subclass declares its sample layout and decodes one sample (`decode`); this
class wires the stack maps, the unwinder and the announcements, drains, and stops.
"""

from __future__ import annotations

import abc
import threading
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import Field

from otel_ebpf.config_base import Duration, ProbeConfig, ProfilesProbeConfig
from otel_ebpf.kernel.engine import Program
from otel_ebpf.model import StackSample
from otel_ebpf.probes.base import Probe, ProbeContext, Signal
from otel_ebpf.probes.stacks import StackSamples
from otel_ebpf.symbolize.symbols import Symbolizer
from otel_ebpf.symbolize.unwind.loader import UnwindLoader
from otel_ebpf.symbolize.unwind.shared import SharedUnwinder


class StackProfileConfig(ProfilesProbeConfig):
    """The keys every stack profiler's section has."""

    # how often the kernel's sums are drained
    interval: Duration = 1.0
    # distinct stacks held in the kernel (1 KiB each, allocated as used)
    user_stack_entries: int = Field(default=16384, ge=256, le=1 << 20)
    kernel_stack_entries: int = Field(default=4096, ge=256, le=1 << 20)


S = TypeVar("S", bound=StackProfileConfig)


class StackProfiler(Probe[S], Generic[S]):
    signals = frozenset({Signal.PROFILES})
    filters_cgroups = True
    # the members of its struct sample_key and struct sample_value that decode() reads
    sample_key_fields: ClassVar[tuple[str, ...]]
    sample_value_fields: ClassVar[tuple[str, ...]]

    def __init__(self, config: S, symbolizer: Symbolizer | None = None,
                 select_cgroups: bool = False, unwinder: SharedUnwinder | None = None
                 ) -> None:
        super().__init__(config, select_cgroups=select_cgroups)
        self.symbolizer = symbolizer or Symbolizer()
        # the agent's is shared by every stack probe (ProbeContext)
        self.unwinder = unwinder or SharedUnwinder()
        self.unwind: UnwindLoader | None = None
        self._stacks: StackSamples | None = None  # made from the compiled program
        # the symbolizer is shared by the collecting thread and the thread that reads the
        # new-process announcements; held per sample, so announcements are never starved
        self._symbols_lock = threading.Lock()

    @classmethod
    def create(cls, config: ProbeConfig, context: ProbeContext) -> StackProfiler[Any]:
        return cls(config, select_cgroups=context.select_cgroups,  # type: ignore[arg-type]
                   unwinder=context.unwinder)

    def prepare(self, program: Program) -> None:
        c = self.config
        self._stacks = StackSamples(program, self.name, self.sample_key_fields,
                                    self.sample_value_fields, c.interval,
                                    c.user_stack_entries, c.kernel_stack_entries)
        self.unwind = self.unwinder.join(program)
        program.open_event_buffer("new_tgids", self._on_new_tgid, perf=False)

    def remember(self, tgid: int) -> None:
        """A process announced by the program (the symbols lock held): read what must be
        read while it lives."""
        self.symbolizer.remember(tgid)

    def _on_new_tgid(self, event: Any) -> None:
        with self._symbols_lock:
            self.remember(int(event.tgid))
        if self.unwind is not None:
            self.unwind.add(int(event.tgid))

    def poll_spans(self) -> list[Any]:
        # not spans: the new-process announcements, read as they come (and on another
        # thread than collect) so that short-lived processes have their maps captured
        # while they live
        if self._program is not None:
            self._program.poll_event_buffers()
        return []

    @abc.abstractmethod
    def decode(self, key: Any, value: Any) -> StackSample:
        """One drained sample (sample_key_fields, sample_value_fields) -> a symbolized
        one."""

    def drain(self) -> tuple[list[StackSample], dict[str, tuple[int, int]],
                             dict[str, int]]:
        """The samples since the last drain, the maps' fill, and the program's counters
        grown since (stacks aged out of a full map among them)."""
        assert self._stacks is not None and self._program is not None
        samples = [self.decode(key, value) for key, value in self._stacks.drain()]
        fill = self._stacks.end_drain(len(samples))
        if self.unwind is not None:
            self.unwind.sampled({s.workload.pid for s in samples})
        fill.update(self.unwinder.fill(self._program))
        grown = self.take_stats()
        for name, n in self._stacks.evicted.items():
            grown[name] += n
        return samples, fill, grown

    def stop(self) -> None:
        if self.unwind is not None and self._program is not None:
            self.unwinder.leave(self._program)
        self.unwind = None
        super().stop()
        self._stacks = None
