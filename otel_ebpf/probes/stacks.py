"""User space's half of probes/stacks.h: the content-addressed stack maps of a program,
and what decoding a probe's (thread, stacks) samples with them takes.

The kernel interns stacks by content (id = hash of the addresses), so an id means the same
addresses for as long as it lives: user space reads each stack once, keeps it in a bounded
cache, and deletes a stack from the kernel only after no sample used it for RETAIN_S. A
steady workload then costs one batch drain per interval and no per-stack syscall.
"""

from __future__ import annotations

import ctypes as ct
import errno
import math
from array import array
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

from otel_ebpf.kernel.engine import BpfMap, EngineError, Program
from otel_ebpf.kernel.maps import DrainAged, unpacker
from otel_ebpf.model import Workload
from otel_ebpf.symbolize.frames import Frame

STACK_CACHE_ENTRIES = 16384  # symbolized stacks kept across drains (hot stacks recur)
RETAIN_S = 30.0  # a stack no sample used for this long leaves the kernel's map


class InternedStacks(DrainAged):
    """User space's half of a content-addressed stack map (user_stacks or kernel_stacks).

    Addresses are cached per id (as compact arrays, at most as many as the kernel map
    holds); the kernel's copy of a stack is deleted once no sample used it for
    `retain_drains` drains (sooner when the map fills up: DrainAged), so a stack that
    comes back is re-interned under the same id and the cache likely still holds it: even
    a sample taken while its stack was being deleted decodes.
    """

    def __init__(self, table: BpfMap, capacity: int, retain_drains: int) -> None:
        super().__init__(table, capacity, retain_drains)
        self._addresses: dict[int, array[int]] = {}

    def addresses(self, stack_id: int) -> array[int] | None:
        """The stack's addresses, leaf first; None if the kernel no longer has it."""
        known = self._addresses.get(stack_id)
        if known is None:
            value = self.table.get(ct.c_uint64(stack_id))
            if value is None:
                return None
            known = array("Q", bytes(value.ips))
            if 0 in known:  # the kernel zeroes the slots past the last frame
                del known[known.index(0):]
            if len(self._addresses) >= self.capacity:
                self._addresses.pop(next(iter(self._addresses)))
            self._addresses[stack_id] = known
        return known

    def end_drain(self) -> int:
        """Delete the kernel's copies of the stacks no sample used lately; how many."""
        return len(self.age())


class StackSamples:
    """A probe's samples map of (thread, user stack, kernel stack) keys, drained and
    decoded: the map's layout checked against the fields the decoder reads, both stack
    maps interned and aged, symbolized stacks and sampled workloads cached (bounded)."""

    def __init__(self, program: Program, probe: str, key_fields: Sequence[str],
                 value_fields: Sequence[str], interval_s: float, user_entries: int,
                 kernel_entries: int) -> None:
        self._samples = program.map("samples")
        try:
            self._keys = unpacker(self._samples.key_type, key_fields)
            self._values = unpacker(self._samples.value_type, value_fields)
        except ValueError as exc:
            raise EngineError(f"{probe}: the compiled samples map is not what the decoder "
                              f"reads: {exc} (a bug: report it)") from exc
        retain = max(1, math.ceil(RETAIN_S / interval_s))
        self.user = InternedStacks(program.map("user_stacks"), user_entries, retain)
        self.kernel = InternedStacks(program.map("kernel_stacks"), kernel_entries, retain)
        self._frames: dict[Hashable, tuple[Frame, ...]] = {}
        self._workloads: dict[tuple[int, bytes, int], Workload] = {}
        # stacks deleted under a late sample and no longer cached, by part, this drain
        self.evicted = {"user_stack_lost": 0, "kernel_stack_lost": 0}

    def drain(self) -> Iterator[tuple[Any, Any]]:
        """The entries counted since the last drain, unpacked (SAMPLE_KEY/VALUE_FIELDS)."""
        keys, values = self._samples.drain_bytes()
        self.evicted = {"user_stack_lost": 0, "kernel_stack_lost": 0}
        return zip(self._keys.iter_unpack(keys), self._values.iter_unpack(values),
                   strict=True)

    def frames(self, key: Hashable, kernel_id: int, user_id: int) -> tuple[Frame, ...] | None:
        """The symbolized stack cached under `key` (marking both stacks used)."""
        if user_id:
            self.user.use(user_id)
        if kernel_id:
            self.kernel.use(kernel_id)
        return self._frames.get(key)

    def addresses(self, kernel_id: int, user_id: int, weight: int, lost: list[str]
                  ) -> tuple[array[int] | tuple[()] | None, array[int] | tuple[()] | None]:
        """Both stacks' addresses, leaf first (() for none); a stack deleted under a late
        sample and no longer cached is None, named in `lost` and counted (`weight`), never
        faked."""
        kernel = self.kernel.addresses(kernel_id) if kernel_id else ()
        user = self.user.addresses(user_id) if user_id else ()
        for part, addrs in (("kernel", kernel), ("user", user)):
            if addrs is None:
                lost.append(part)
                self.evicted[f"{part}_stack_lost"] += weight
        return kernel, user

    def keep(self, key: Hashable, frames: tuple[Frame, ...]) -> None:
        """Cache a symbolized stack that no later look-up would name better."""
        if len(self._frames) >= STACK_CACHE_ENTRIES:
            self._frames.pop(next(iter(self._frames)))
        self._frames[key] = frames

    def workload(self, tgid: int, raw_comm: bytes, cgroup_id: int) -> Workload:
        workload = self._workloads.get((tgid, raw_comm, cgroup_id))
        if workload is None:
            if len(self._workloads) >= STACK_CACHE_ENTRIES:
                self._workloads.clear()
            workload = self._workloads[(tgid, raw_comm, cgroup_id)] = Workload(
                tgid, raw_comm.split(b"\0", 1)[0].decode(errors="replace"), cgroup_id)
        return workload

    def end_drain(self, samples: int) -> dict[str, tuple[int, int]]:
        """Age both stack maps; the fill of the three maps (used, capacity)."""
        self.user.end_drain()
        self.kernel.end_drain()
        return {"samples": (samples, self._samples.max_entries),
                "user_stacks": (len(self.user), self.user.capacity),
                "kernel_stacks": (len(self.kernel), self.kernel.capacity)}


def stack_errors(user_err: int, kernel_err: int) -> list[str]:
    """The parts whose walk failed (a fault reading a user stack is its normal end)."""
    return [part for part, err in (("user", user_err), ("kernel", kernel_err))
            if err and err != -errno.EFAULT]

