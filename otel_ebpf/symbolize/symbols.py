"""Symbolization of sampled stacks: kernel frames from kallsyms, user frames from ELF files.

User frames are resolved through a snapshot of the process's executable mappings taken when
the process is first seen (`Symbolizer.remember`) and kept until `forget`, so a process that
exited before the collection tick is still symbolized. A snapshot holds the loaded symbol
tables of its files, so a file deleted or replaced since keeps the symbols of the build that
ran. An address that cannot be resolved keeps its address and mapping with no function: a
backend can still symbolize it from the mapping's file name and build id, and no name is ever
guessed. Not thread-safe: one collector thread owns a Symbolizer.
"""

from __future__ import annotations

import os
import time
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from otel_ebpf.symbolize import elf, procfs
from otel_ebpf.symbolize.elf import ElfSymbols
from otel_ebpf.symbolize.frames import KERNEL, NATIVE, Frame, Mapping
from otel_ebpf.symbolize.kallsyms import KALLSYMS, SYSFS, KernelSymbols
from otel_ebpf.symbolize.perfmap import PerfMaps

__all__ = ["KERNEL", "NATIVE", "Frame", "KernelSymbols", "Mapping", "Symbolizer",
           "SymbolizerStats", "parse_maps"]

# An address outside every kept mapping rereads the maps at most this often (seconds):
# garbage addresses in a broken stack must not make every sample read /proc.
_MAPS_REFRESH_AFTER = 5.0
# Kernel addresses remembered as unresolved by the current table: bounded, since a reload
# clears them and more than this many distinct misses means the table is badly stale anyway.
_MAX_KERNEL_MISSES = 4096
# mapped files held open until their first sampled address; past this, tables load at once
MAX_LAZY_FILES = 256


@dataclass(slots=True)
class SymbolizerStats:
    """Cumulative counters for self-metrics; file_* count loads of ELF files."""

    kernel_resolved: int = 0
    kernel_unresolved: int = 0
    user_resolved: int = 0
    user_unresolved: int = 0
    file_hits: int = 0
    file_misses: int = 0
    file_errors: int = 0
    file_evictions: int = 0
    process_snapshots: int = 0
    process_evictions: int = 0
    kernel_loads: int = 0


@dataclass(frozen=True, slots=True)
class MapsEntry:
    start: int
    end: int
    offset: int
    dev: int
    inode: int
    path: str  # "[vdso]", "[anon]" for unnamed memory; without the " (deleted)" suffix


def parse_maps(text: str) -> list[MapsEntry]:
    """The executable mappings in the text of /proc/<pid>/maps."""
    out: list[MapsEntry] = []
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 5 or "x" not in fields[1]:
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        major, minor = (int(x, 16) for x in fields[3].split(":"))
        path = fields[5].removesuffix(" (deleted)") if len(fields) > 5 else "[anon]"
        out.append(MapsEntry(start, end, int(fields[2], 16), os.makedev(major, minor),
                             int(fields[4]), path))
    return out


class _Region:
    """One executable mapping of a process. Its symbol table is loaded when the first
    sampled address falls in it (most libraries a process maps are never sampled, and
    loading every table of every new process was the profiler's main cost); until then
    the mapped file is held open, so it can still be read after the process exited."""

    __slots__ = ("__weakref__", "_file", "_loaded", "_mapping", "_table", "entry", "frames")
    open_files = 0  # files held open by regions not loaded yet, across all processes
    MAX_FRAMES = 8192  # resolved frames kept per region (hot code is sampled again and again)

    def __init__(self, entry: MapsEntry, table: ElfSymbols | None, file: BinaryIO | None
                 ) -> None:
        self.entry, self._table, self._file = entry, table, file
        self._loaded = file is None
        self._mapping: Mapping | None = None
        # (address << 1 | is a return address) -> its frame
        self.frames: dict[int, Frame] = {}
        if file is not None:
            _Region.open_files += 1

    def load(self, files: elf.ElfCache) -> tuple[Mapping, ElfSymbols | None]:
        if not self._loaded:
            file, self._file, self._loaded = self._file, None, True
            assert file is not None
            _Region.open_files -= 1
            with file:
                self._table = files.get(file)
        if self._mapping is None:
            e = self.entry
            build_id = self._table.build_id if self._table is not None else None
            self._mapping = Mapping(e.start, e.end, e.offset, e.path, build_id)
        return self._mapping, self._table

    def __del__(self) -> None:
        if self._file is not None:
            _Region.open_files -= 1
            self._file.close()


class _Snapshot:
    """One process's executable mappings, each with its file's symbol table (or None)."""

    __slots__ = ("checked_at", "identity", "regions", "starts")

    def __init__(self, identity: tuple[int, int, int], regions: list[_Region]) -> None:
        self.identity = identity
        self.regions = sorted(regions, key=lambda r: r.entry.start)
        self.starts = [r.entry.start for r in self.regions]
        self.checked_at = time.monotonic()  # when the maps were last read or found same

    def find(self, addr: int) -> _Region | None:
        i = bisect_right(self.starts, addr) - 1
        if i >= 0 and addr < self.regions[i].entry.end:
            return self.regions[i]
        return None


class ProcessMaps:
    """Mapping snapshots per process (pid, identity), kept until forgotten; bounded LRU."""

    def __init__(self, files: elf.ElfCache, stats: SymbolizerStats,
                 max_processes: int = 4096) -> None:
        self._files, self._stats, self._max = files, stats, max_processes
        self._snapshots: OrderedDict[int, _Snapshot] = OrderedDict()
        self._vdso = elf.load_vdso()

    def snapshot(self, pid: int) -> _Snapshot | None:
        """Read the process's mappings now unless a snapshot of this same process is kept
        (a reused pid or an exec replaces it); None when it is gone and none was kept."""
        kept = self.kept(pid)
        identity = procfs.identity(pid)
        if identity is None or (kept is not None and kept.identity == identity):
            return kept
        return self._read(pid, identity) or kept

    def kept(self, pid: int) -> _Snapshot | None:
        snap = self._snapshots.get(pid)
        if snap is not None:
            self._snapshots.move_to_end(pid)
        return snap

    def refresh(self, pid: int) -> _Snapshot | None:
        """Reread the mappings of a kept process that is still alive (dlopen since)."""
        kept = self.kept(pid)
        if kept is not None and procfs.identity(pid) == kept.identity:
            return self._read(pid, kept.identity, kept) or kept
        if kept is not None:
            kept.checked_at = time.monotonic()  # gone or replaced: this is all there is
        return kept

    def _read(self, pid: int, identity: tuple[int, int, int],
              previous: _Snapshot | None = None) -> _Snapshot | None:
        try:
            entries = parse_maps(procfs.read(f"/proc/{pid}/maps"))
        except OSError:
            return None
        # a refresh keeps the regions that did not change (their files, tables, frames):
        # a process with code outside any file (a JIT) is refreshed again and again
        unchanged = {r.entry: r for r in previous.regions} if previous is not None else {}
        if previous is not None and len(unchanged) == len(entries) and all(
                e in unchanged for e in entries):
            previous.checked_at = time.monotonic()
            return previous
        snap = _Snapshot(identity, [unchanged.get(entry) or self._region(pid, entry)
                                    for entry in entries])
        self._stats.process_snapshots += 1
        self._snapshots[pid] = snap
        self._snapshots.move_to_end(pid)
        while len(self._snapshots) > self._max:
            self._snapshots.popitem(last=False)
            self._stats.process_evictions += 1
        return snap

    def forget(self, pid: int) -> None:
        self._snapshots.pop(pid, None)

    def _region(self, pid: int, entry: MapsEntry) -> _Region:
        if entry.path == "[vdso]":
            # ours stands for theirs when the size matches (a 32-bit process has another)
            size_and_table = self._vdso
            if size_and_table is not None and size_and_table[0] == entry.end - entry.start:
                return _Region(entry, size_and_table[1], None)
            return _Region(entry, None, None)
        file = elf.open_mapped(pid, entry.start, entry.end, entry.path, entry.dev,
                               entry.inode)
        if file is None:
            return _Region(entry, None, None)
        known, table = self._files.cached(file)
        if known or _Region.open_files >= MAX_LAZY_FILES:
            # a table loaded already, or too many files held open: no reason to wait
            with file:
                return _Region(entry, table if known else self._files.get(file), None)
        return _Region(entry, None, file)


class Symbolizer:
    """Frames for the raw addresses of sampled stacks. Stacks are leaf first: every address
    after the first is a return address and is looked up one byte back."""

    def __init__(self, max_files: int | None = None, max_processes: int = 4096,
                 kallsyms: Path = KALLSYMS, sysfs: Path | None = SYSFS,
                 debug_root: Path | None = elf.DEBUG_ROOT,
                 reload_after: float = 30.0) -> None:
        # the symbol tables: the process's shared cache, unless other bounds are asked for
        self._stats = SymbolizerStats()
        self._files = (elf.shared() if max_files is None and debug_root == elf.DEBUG_ROOT
                       else elf.ElfCache(max_files or 512, debug_root))
        self._maps = ProcessMaps(self._files, self._stats, max_processes)
        self._kallsyms, self._sysfs, self._reload_after = kallsyms, sysfs, reload_after
        self._kernel: KernelSymbols | None = None
        self._kernel_loaded_at = 0.0
        self._kernel_misses: set[int] = set()  # unresolved by the table loaded last
        self._perf_maps = PerfMaps()

    def stats(self) -> SymbolizerStats:
        """A copy of the cumulative counters."""
        files = self._files
        return replace(self._stats, file_hits=files.hits, file_misses=files.misses,
                       file_errors=files.errors, file_evictions=files.evictions)

    def remember(self, pid: int) -> bool:
        """Snapshot the process's mappings now if not yet done; False when it is gone."""
        return self._maps.snapshot(pid) is not None

    def forget(self, pid: int) -> None:
        self._maps.forget(pid)
        self._perf_maps.forget(pid)

    def kernel_frames(self, addrs: Sequence[int]) -> list[Frame]:
        kernel = self._kernel_symbols(stale=False)
        frames = [kernel.resolve(a, i > 0) for i, a in enumerate(addrs)]
        missed = {a for a, f in zip(addrs, frames, strict=True) if f is None}
        if missed - self._kernel_misses and \
                time.monotonic() - self._kernel_loaded_at > self._reload_after:
            # a module or BPF program loaded since: reload, at most once per interval, and
            # only for an address the current table has not already failed to resolve
            # (one that never resolves would otherwise cost a reload every interval)
            kernel = self._kernel_symbols(stale=True)
            frames = [f or kernel.resolve(a, i > 0) for i, (a, f) in
                      enumerate(zip(addrs, frames, strict=True))]
            missed = {a for a, f in zip(addrs, frames, strict=True) if f is None}
        if len(self._kernel_misses) < _MAX_KERNEL_MISSES:
            self._kernel_misses |= missed
        unresolved = frames.count(None)
        self._stats.kernel_unresolved += unresolved
        self._stats.kernel_resolved += len(frames) - unresolved
        return [f or Frame(a, None, KERNEL, None, 0) for a, f in zip(addrs, frames, strict=True)]

    def user_frames(self, pid: int, addrs: Sequence[int]) -> list[Frame]:
        # The kept snapshot first: the pid may have been reused or exec'd since the samples
        # were taken, and remember() at first sight is what captures a new process.
        snap = self._maps.kept(pid) or self._maps.snapshot(pid)
        frames: list[Frame] = []
        for i, addr in enumerate(addrs):
            lookup = addr - 1 if i > 0 and addr > 0 else addr
            region = snap.find(lookup) if snap is not None else None
            if region is None and snap is not None and \
                    time.monotonic() - snap.checked_at > _MAPS_REFRESH_AFTER:
                snap = self._maps.refresh(pid)  # mapped after the snapshot (dlopen)
                region = snap.find(lookup) if snap is not None else None
            if region is None or region.entry.path.startswith("[anon"):
                # outside every file ([anon], or gone): JIT code, if the process says so
                jit = self._perf_maps.lookup(pid, lookup)
                if jit is not None:
                    mapping = region.load(self._files)[0] if region is not None else None
                    frames.append(Frame(addr, jit[0], jit[2], mapping, jit[1] + addr - lookup))
                    continue
            if region is None:
                frames.append(self._native(addr, lookup, None))
                continue
            key = addr << 1 | (lookup != addr)
            frame = region.frames.get(key)
            if frame is None:
                frame = self._native(addr, lookup, region)
                if len(region.frames) >= _Region.MAX_FRAMES:
                    region.frames.clear()
                region.frames[key] = frame
            frames.append(frame)
        return frames

    def _native(self, addr: int, lookup: int, region: _Region | None) -> Frame:
        mapping, table = region.load(self._files) if region is not None else (None, None)
        if mapping is not None and table is not None:
            vaddr = table.vaddr_for_offset(lookup - mapping.start + mapping.file_offset)
            found = table.lookup(vaddr) if vaddr is not None else None
            if found is not None and vaddr is not None:
                self._stats.user_resolved += 1
                name, start = found
                return Frame(addr, name, NATIVE, mapping, vaddr - start + addr - lookup)
        self._stats.user_unresolved += 1
        return Frame(addr, None, NATIVE, mapping, 0)

    def _kernel_symbols(self, stale: bool) -> KernelSymbols:
        if self._kernel is None or stale:
            try:
                self._kernel = KernelSymbols.load(self._kallsyms, self._sysfs)
            except OSError:
                self._kernel = KernelSymbols.empty()
            self._kernel_loaded_at = time.monotonic()
            self._kernel_misses.clear()
            self._stats.kernel_loads += 1
        return self._kernel
