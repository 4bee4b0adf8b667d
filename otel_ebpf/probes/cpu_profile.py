"""Decoder for probes/cpu_profile.bpf.c: drained stack counts -> symbolized stack samples.

Stack ids are deleted once read (BCC's StackTrace.clear() does nothing in 0.26), so the
stack maps hold one interval of stacks and collisions stay rare; the drain interval is
shortened where needed to keep them below ~0.5 % of samples.
"""

from __future__ import annotations

import ctypes as ct
import errno
import logging
import os
import threading
import time
from typing import Any

from otel_ebpf.config import CpuProfileConfig
from otel_ebpf.kernel.engine import Engine, Program, update_set_map
from otel_ebpf.model import Collection, MetricDescriptor, StackSample, Workload
from otel_ebpf.probes.base import Hook, Probe
from otel_ebpf.symbols import Frame, Symbolizer

log = logging.getLogger(__name__)

_STATS = ("idle", "user_stack_lost", "kernel_stack_lost", "map_full", "announce_lost",
          "samples")
# reported as lost events; idle samples are dropped by design and samples are a total
_LOSSES = ("user_stack_lost", "kernel_stack_lost", "map_full", "announce_lost")
STACK_CACHE_ENTRIES = 16384  # symbolized stacks kept across drains (hot stacks recur)
COLLISION_BUDGET = 0.005  # the share of samples that may lose a stack to a collision
MIN_DRAIN_S = 0.1

PROFILE_SAMPLES = MetricDescriptor(
    "cpu.samples", "{sample}",
    "On-CPU stack samples of the software cpu-clock (exported as OTLP profiles).")


def drain_interval(config: CpuProfileConfig, cpus: int) -> float:
    """The longest drain interval at which a new stack collides with at most
    COLLISION_BUDGET probability on average: a stack map holding U distinct stacks in B
    buckets refuses a newcomer with probability U/B, U grows to at most hz * cpus * t
    within an interval, so the mean stays below U/(2B) <= budget when
    t <= 2 * budget * B / (hz * cpus)."""
    buckets = 1 << (config.user_stack_entries - 1).bit_length()
    bound = 2 * COLLISION_BUDGET * buckets / (config.frequency * cpus)
    return max(MIN_DRAIN_S, min(config.interval, bound))


class CpuProfile(Probe):
    name = "cpu_profile"
    summary = "sampled on-CPU stacks (kernel + user) of every process, counted in the kernel"
    hooks = (Hook("perf_event", None, "software cpu-clock, one per CPU"),)
    exports = (PROFILE_SAMPLES,)

    def __init__(self, config: CpuProfileConfig, symbolizer: Symbolizer | None = None,
                 cpus: int | None = None, select_cgroups: bool = False) -> None:
        self.config = config
        self.select_cgroups = select_cgroups
        self._selected: set[int] = set()
        self.symbolizer = symbolizer or Symbolizer()
        self.cpus = cpus or os.cpu_count() or 1
        self.interval = drain_interval(config, self.cpus)
        self.period_ns = 1_000_000_000 // config.frequency
        self._program: Program | None = None
        self._stats_seen = [0] * len(_STATS)
        # the symbolizer is shared by the collecting thread and the thread that reads the
        # new-process announcements; held per sample, so announcements are never starved
        self._symbols_lock = threading.Lock()
        # (tgid, kernel addresses, user addresses) -> frames: a hot stack is read again
        # every drain (its id was deleted) but symbolized once
        self._stack_cache: dict[tuple[int, tuple[int, ...], tuple[int, ...]],
                                tuple[Frame, ...]] = {}

    def cflags(self) -> list[str]:
        c = self.config
        flags = [f"-DSAMPLE_HZ={c.frequency}", f"-DMAX_SAMPLES={c.max_samples}",
                 f"-DUSER_STACK_ENTRIES={c.user_stack_entries}",
                 f"-DKERNEL_STACK_ENTRIES={c.kernel_stack_entries}"]
        if c.keep_idle:
            flags.append("-DKEEP_IDLE")
        if self.select_cgroups:
            flags.append("-DFILTER_CGROUP")
        return flags

    def set_cgroup_filter(self, cgroup_ids: set[int]) -> None:
        if self._program is not None and self.select_cgroups:
            self._selected = update_set_map(self._program.map("cgroup_filter"),
                                            self._selected, cgroup_ids)

    def verify(self, engine: Engine) -> None:
        engine.verify(self.name, self.cflags(), [("on_cpu_sample", "perf_event")])

    def start(self, engine: Engine) -> None:
        program = engine.load(self.name, self.cflags())
        self._program = program
        try:
            program.open_event_buffer("new_tgids", self._on_new_tgid, perf=False)
            program.attach_cpu_clock("on_cpu_sample", self.config.frequency)
        except Exception:
            self.stop()
            raise
        if self.interval < self.config.interval:
            log.info("cpu_profile: draining every %.2fs (not %.2fs) to keep stack-map "
                     "collisions under %.1f%% at %d Hz on %d CPUs", self.interval,
                     self.config.interval, COLLISION_BUDGET * 100, self.config.frequency,
                     self.cpus)

    def _on_new_tgid(self, event: Any) -> None:
        with self._symbols_lock:
            self.symbolizer.remember(int(event.tgid))

    def poll_spans(self) -> list[Any]:
        # not spans: the new-process announcements, read often (and on another thread than
        # collect) so that short-lived processes have their maps captured while they live
        if self._program is not None:
            self._program.poll_event_buffers()
        return []

    def collect(self) -> Collection:
        if self._program is None:
            return Collection(self.name)
        began = time.monotonic()
        entries = self._program.map("samples").drain()
        user_stacks = self._program.map("user_stacks")
        kernel_stacks = self._program.map("kernel_stacks")
        samples = [self.decode(k, v, user_stacks, kernel_stacks) for k, v in entries]
        for ids, stacks in ((
                {int(k.user_stack_id) for k, _ in entries}, user_stacks), (
                {int(k.kernel_stack_id) for k, _ in entries}, kernel_stacks)):
            for stack_id in ids:
                if stack_id >= 0:
                    stacks.delete(ct.c_int(stack_id))
        totals = self._program.map("profile_stats").percpu_sums()
        deltas = {name: total - seen for name, total, seen
                  in zip(_STATS, totals, self._stats_seen, strict=True)}
        self._stats_seen = totals
        lost = {name: deltas[name] for name in _LOSSES if deltas[name] > 0}
        took = time.monotonic() - began
        if took > self.interval:
            log.info("cpu_profile: symbolizing %d stacks took %.2fs (longer than the %.2fs "
                     "interval)", len(entries), took, self.interval)
        return Collection(self.name, samples=samples, lost_events=lost,
                          period_ns=self.period_ns)

    def decode(self, key: Any, value: Any, user_stacks: Any, kernel_stacks: Any
               ) -> StackSample:
        tgid = int(key.tgid)
        kernel: list[Frame] = []
        user: list[Frame] = []
        kernel_addrs = (kernel_stacks.stack_addresses(int(key.kernel_stack_id))
                        if key.kernel_stack_id >= 0 else ())
        user_addrs = (user_stacks.stack_addresses(int(key.user_stack_id))
                      if key.user_stack_id >= 0 else ())
        frames = self._stack_cache.get((tgid, kernel_addrs, user_addrs))
        if frames is None:
            with self._symbols_lock:
                kernel = self.symbolizer.kernel_frames(kernel_addrs) if kernel_addrs else []
                user = self.symbolizer.user_frames(tgid, user_addrs) if user_addrs else []
            frames = tuple(kernel + user)  # leaf first: the kernel part sits on top
            # unresolved frames may resolve later (a library mapped after the snapshot)
            if all(f.function for f in frames):
                if len(self._stack_cache) >= STACK_CACHE_ENTRIES:
                    self._stack_cache.pop(next(iter(self._stack_cache)))
                self._stack_cache[(tgid, kernel_addrs, user_addrs)] = frames
        lost = [part for part, stack_id in (("user", key.user_stack_id),
                                           ("kernel", key.kernel_stack_id))
                if stack_id < 0 and stack_id != -errno.EFAULT]
        comm = key.comm.decode(errors="replace")
        return StackSample(
            workload=Workload(tgid, comm, int(value.cgroup_id)),
            thread_id=int(key.tid),
            thread_name=comm,
            frames=frames,
            count=int(value.count),
            lost_stacks=tuple(lost),
        )

    def stop(self) -> None:
        if self._program is not None:
            self._program.close()
            self._program = None
