"""User space's half of the in-kernel unwinder (probes/user_stack.h): each mapped file's
unwind rows (cfi.compile_file) loaded once into the kernel's row array, and each process's
executable mappings written where the BPF program finds them.

Rows live in one BPF array the agent writes through a memory mapping (BPF_F_MMAPABLE: a
file's rows are one copy, not a syscall each); a file's run of rows is found through unwind_tables
{first, count, generation}. The array is the bound (`max_rows`, 8 bytes a row): a file
that does not fit evicts the least recently used files' runs (their processes fall back to
frame pointers there, and are counted), and files are keyed by (device, inode, mtime,
size), so a file replaced on disk is compiled again. Compiled tables are kept on disk
(disk.py): a restart compiles nothing it compiled before.

A mapping is resolved first by a stat of its path as the process sees it: when that is
still the mapped inode and a file of the same (device, inode, mtime, size) was opened
before, its key is known, and a new process whose files are all known opens none of them
(under a churn of short-lived processes, opening every mapped file of each was the
unwinder's main cost). Not thread-safe: the probe serializes calls.
"""

from __future__ import annotations

import ctypes as ct
import logging
import mmap
import os
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple

from otel_ebpf.kernel.maps import BpfMap
from otel_ebpf.symbolize import elf, procfs
from otel_ebpf.symbolize.procfs import FileKey
from otel_ebpf.symbolize.symbols import parse_maps
from otel_ebpf.symbolize.unwind import cfi, disk
from otel_ebpf.symbolize.unwind.rowarea import RowArea
from otel_ebpf.symbolize.unwind.worker import CompileWorker

log = logging.getLogger(__name__)

MAX_MAPPINGS = 128  # UNWIND_MAPPINGS in user_stack.h
_MAPPING = struct.Struct("=QQQII")
_PROC_HEAD = struct.Struct("=II")
_TABLE = struct.Struct("=IIII")
REFRESH_S = 5.0  # a process's maps are reread at most this often (dlopen, exec, pid reuse)
MAX_NO_TABLE = 4096  # files remembered as having no usable table
MAX_IDENTITIES = 8192  # file keys remembered with their build id
NO_TABLE = 0xFFFFFFFF  # a mapping without a table (anonymous, vDSO): frame pointers there
# One file's rows take at most this share of the array: a few huge libraries (LLVM's, 1M
# rows) would otherwise evict every other table in turn (frame pointers do there).
MAX_TABLE_SHARE = 4


@dataclass(slots=True)
class _Loaded:
    table_id: int
    gen: int
    first: int
    count: int
    segments: tuple[tuple[int, int, int], ...]
    users: set[int]  # the processes whose mappings name it

    def bias(self, start: int, offset: int) -> int | None:
        return cfi.bias(self.segments, start, offset)


class _Known(NamedTuple):
    loaded: _Loaded | None  # None: the file has no usable table


@dataclass(slots=True)
class _Process:
    identity: procfs.Identity
    read_at: float  # when its maps were read
    checked_at: float  # when it was last found alive and the same process
    files: list[_Loaded]
    complete: bool  # False: files waited for the compile budget


@dataclass(slots=True)
class UnwindStats:
    """Cumulative counters: files compiled, rows written, evictions, failures."""

    files_compiled: int = 0
    files_cached: int = 0  # tables (or no-table findings) read from the disk cache
    files_opened: int = 0  # mapped files opened (a known (device, inode) is not)
    files_without_table: int = 0
    tables_evicted: int = 0
    table_too_large: int = 0
    processes_loaded: int = 0
    processes_full: int = 0  # the kernel's process map was full
    mappings_dropped: int = 0  # past MAX_MAPPINGS in one process
    compile_seconds: float = 0.0


class KernelUnwindTables:
    """The unwind maps of one loaded program, filled per file and per process."""

    def __init__(self, rows: BpfMap, tables: BpfMap, procs: BpfMap,
                 cache: disk.TableCache | None = None) -> None:
        self._rows_map, self._tables, self._procs = rows, tables, procs
        if rows.value_size != cfi.ROW.size:
            raise ValueError(f"unwind_rows holds {rows.value_size}-byte rows; the compiler "
                             f"writes {cfi.ROW.size}")
        self._area = RowArea(rows.max_entries)
        self._free_ids = list(range(tables.max_entries - 1, -1, -1))
        self._gen = 0
        # by build id (the same library in several virtualenvs or containers is one
        # table), else by file key
        self._files: OrderedDict[str | FileKey, _Loaded] = OrderedDict()
        self._no_table: OrderedDict[str | FileKey, None] = OrderedDict()
        self._identities: OrderedDict[FileKey, str | FileKey] = OrderedDict()
        self.cache = cache  # compiled tables on disk (None: off)
        self._processes: dict[int, _Process] = {}
        self.stats = UnwindStats()
        # whether a table may be compiled now (UnwindLoader holds compiles to a CPU share);
        # a process whose files had to wait is loaded without their tables, then again
        self.may_compile: Callable[[], bool] = lambda: True
        self._deferred = False
        self.compiler = CompileWorker()  # compiles in a child process (worker.py)

    @property
    def rows_used(self) -> int:
        return self._area.used

    @property
    def kernel_bytes(self) -> int:
        """Memory of the unwind maps in the kernel at most (the rows are preallocated)."""
        return (self._rows_map.max_entries * cfi.ROW.size + self._tables.max_entries
                * _TABLE.size + len(self._processes) * (_PROC_HEAD.size + MAX_MAPPINGS
                                                        * _MAPPING.size))

    def close(self) -> None:
        """Stop the compiler process (the maps are the program's)."""
        self.compiler.close()

    def rest(self) -> None:
        """Between requests: the compiler process exits once idle."""
        self.compiler.rest()

    def _write_rows(self, first: int, rows: bytes) -> None:
        """Copy rows into the array through a mapping of just their pages (unmapped
        again at once: the rows are the kernel's memory, not the agent's resident set)."""
        start = first * cfi.ROW.size
        page = start // mmap.PAGESIZE * mmap.PAGESIZE
        length = start + len(rows) - page
        with mmap.mmap(self._rows_map.fd, length, mmap.MAP_SHARED,
                       mmap.PROT_READ | mmap.PROT_WRITE, offset=page) as mem:
            mem[start - page:length] = rows

    # -- files -------------------------------------------------------------------------

    def _table(self, pid: int, start: int, end: int, path: str, dev: int, inode: int
               ) -> _Loaded | None:
        seen = self._seen(pid, path, inode)
        known = self._known(seen) if seen is not None else None
        if known is not None:
            return known.loaded
        file = elf.open_mapped(pid, start, end, path, dev, inode)
        if file is None:
            return None
        self.stats.files_opened += 1
        with file:
            key = self._identity_of(file, procfs.file_key(os.fstat(file.fileno())))
            known = self._known(key)
            if known is not None:
                return known.loaded
            if not self.may_compile():
                self._deferred = True  # over the compile budget: later
                return None
            return self._compile(file, key, path)

    def _known(self, key: str | FileKey) -> _Known | None:
        """The file's table if loaded, or known to be missing, or in the disk cache
        (loaded now: reading it costs no compile budget); None: it must be compiled."""
        loaded = self._files.get(key)
        if loaded is not None:
            self._files.move_to_end(key)
            return _Known(loaded)
        if key in self._no_table:
            return _Known(None)
        cached = self.cache.load(key) if self.cache is not None else None
        budget = self._area.size // MAX_TABLE_SHARE
        if cached is None or 0 < cached.too_large_rows <= budget:
            return None  # not cached, or too large only for a smaller budget than this one
        self.stats.files_cached += 1
        table = cached.table
        if cached.too_large_rows or (table is not None and len(table) > budget):
            self.stats.table_too_large += 1
            table = None
        return _Known(self._add_file(key, table))

    def _compile(self, file: BinaryIO, key: str | FileKey, path: str) -> _Loaded | None:
        began = time.monotonic()
        try:
            table = self.compiler.compile(file, self._area.size // MAX_TABLE_SHARE)
            if self.cache is not None:
                self.cache.store(key, table)
        except cfi.CfiError as exc:
            log.debug("unwind: %s: %s", path, exc)
            table = None
        except cfi.TooLarge as exc:
            log.debug("unwind: %s: too large (%s)", path, exc)
            self.stats.table_too_large += 1
            # stored with its size, so that a restart does not spend seconds and tens of MB
            # on it again, and a larger budget compiles it
            if self.cache is not None:
                self.cache.store(key, None, too_large_rows=exc.rows)
            table = None
        took = time.monotonic() - began
        log.debug("unwind: %s compiled in %.3fs (%d rows)", path, took,
                  len(table) if table is not None else 0)
        self.stats.compile_seconds += took
        self.stats.files_compiled += 1
        return self._add_file(key, table)

    def _add_file(self, key: str | FileKey, table: cfi.UnwindTable | None) -> _Loaded | None:
        loaded = self._load(table) if table is not None else None
        if loaded is None:
            self.stats.files_without_table += 1
            self._no_table[key] = None
            while len(self._no_table) > MAX_NO_TABLE:
                self._no_table.popitem(last=False)
            return None
        self._files[key] = loaded
        return loaded

    def _seen(self, pid: int, path: str, inode: int) -> str | FileKey | None:
        """The identity of the mapped file without opening it: known when a file of its
        key (procfs.mapped_file_key) was opened before."""
        key = procfs.mapped_file_key(pid, path, inode)
        identity = self._identities.get(key) if key is not None else None
        if identity is not None and key is not None:
            self._identities.move_to_end(key)
        return identity

    def _identity_of(self, file: BinaryIO, key: FileKey) -> str | FileKey:
        identity = self._identities.get(key)
        if identity is not None:
            self._identities.move_to_end(key)
        else:
            identity = elf.file_build_id(file) or key
            file.seek(0)
            self._identities[key] = identity
            while len(self._identities) > MAX_IDENTITIES:
                self._identities.popitem(last=False)
        return identity

    def _load(self, table: cfi.UnwindTable) -> _Loaded | None:
        count = len(table)
        if count == 0:
            return None
        first = self._area.allocate(count)
        while first is None or not self._free_ids:
            if not self._files:
                if first is not None:
                    self._area.release(first, count)
                return None
            self._evict()
            first = first if first is not None else self._area.allocate(count)
        table_id = self._free_ids.pop()
        self._write_rows(first, table.rows)
        self._gen += 1
        self._tables.set(ct.c_uint32(table_id), self._tables.value_type.from_buffer_copy(
            _TABLE.pack(first, count, self._gen, 0)))
        return _Loaded(table_id, self._gen, first, count, table.segments, set())

    def _evict(self) -> None:
        # the least recently loaded file no process uses, else the least recently loaded
        # (its processes step with frame pointers through it from now on)
        key = next((k for k, f in self._files.items() if not f.users), None)
        old = self._files.pop(key) if key is not None else self._files.popitem(last=False)[1]
        # first the table (the BPF program stops using the rows), then the rows
        self._tables.set(ct.c_uint32(old.table_id), self._tables.value_type.from_buffer_copy(
            _TABLE.pack(0, 0, 0, 0)))
        self._area.release(old.first, old.count)
        self._free_ids.append(old.table_id)
        if not self.stats.tables_evicted:
            log.warning("unwind: the unwind tables fill probes.cpu_profile.unwind_table_rows "
                        "(%d rows): the least recently loaded files' tables make room, and "
                        "stacks through them fall back to frame pointers. Fix: raise it "
                        "(8 bytes a row of kernel memory)", self._area.size)
        self.stats.tables_evicted += 1

    # -- processes ---------------------------------------------------------------------

    def add_process(self, pid: int) -> bool:
        """Write the process's mappings (compiling the tables of files not seen yet);
        False when it is gone or its entry cannot be written."""
        identity = procfs.identity(pid)  # first: the maps read next are that process's
        if identity is None or identity[1:] == procfs.NO_EXECUTABLE:
            return False
        try:
            entries = parse_maps(procfs.read(f"/proc/{pid}/maps"))
        except OSError:
            return False
        self._deferred = False
        # every executable mapping, those without a table too (anonymous JIT code, the
        # vDSO: frame pointers there), so that only code mapped since marks a miss
        with_table: list[tuple[int, int, int, int, int]] = []
        without: list[tuple[int, int, int, int, int]] = []
        files: list[_Loaded] = []
        for e in entries:
            loaded = (self._table(pid, e.start, e.end, e.path, e.dev, e.inode)
                      if e.path.startswith("/") else None)
            bias = loaded.bias(e.start, e.offset) if loaded is not None else None
            if loaded is None or bias is None:
                without.append((e.start, e.end, 0, NO_TABLE, 0))
                continue
            with_table.append((e.start, e.end, bias & 0xFFFFFFFFFFFFFFFF, loaded.table_id,
                               loaded.gen))
            files.append(loaded)
        if len(with_table) + len(without) > MAX_MAPPINGS:
            self.stats.mappings_dropped += len(with_table) + len(without) - MAX_MAPPINGS
        mappings = sorted((with_table + without)[:MAX_MAPPINGS])
        value = bytearray(_PROC_HEAD.size + MAX_MAPPINGS * _MAPPING.size)
        _PROC_HEAD.pack_into(value, 0, len(mappings), 0)
        for i, m in enumerate(mappings):
            _MAPPING.pack_into(value, _PROC_HEAD.size + i * _MAPPING.size, *m)
        try:
            self._procs.set(ct.c_uint32(pid), self._procs.value_type.from_buffer_copy(value))
        except OSError as exc:
            if not self.stats.processes_full:
                log.warning("unwind: cannot hold the mappings of process %d (%s): more "
                            "processes than probes.cpu_profile.unwind_processes? Their "
                            "stacks take frame pointers only (unwind_not_ready)", pid, exc)
            self.stats.processes_full += 1
            return False
        self.stats.processes_loaded += pid not in self._processes
        self._release(pid)
        for loaded in files:
            loaded.users.add(pid)
        now = time.monotonic()
        self._processes[pid] = _Process(identity, now, now, files, not self._deferred)
        return True

    def _release(self, pid: int) -> None:
        known = self._processes.pop(pid, None)
        for loaded in known.files if known is not None else ():
            loaded.users.discard(pid)

    def sampled(self, pids: set[int]) -> None:
        """After a drain: load the sampled processes not loaded yet (announcement lost, pid
        reused); reread those whose program missed a mapping (dlopen: one map lookup each)
        or that exec'd (checked every REFRESH_S), at most every REFRESH_S each; drop the
        processes that are gone (checked every REFRESH_S)."""
        now = time.monotonic()
        for pid in pids:
            known = self._processes.get(pid)
            if known is None or (not known.complete and self.may_compile()):
                self.add_process(pid)
                continue
            if now - known.read_at < REFRESH_S:
                continue
            if self._missed(pid):
                self.add_process(pid)
            elif now - known.checked_at >= REFRESH_S:
                known.checked_at = now
                if procfs.identity(pid) != known.identity:
                    self.add_process(pid)
        for pid in [p for p, proc in self._processes.items()
                    if now - proc.checked_at >= REFRESH_S and p not in pids]:
            # not sampled: only whether it is gone (or its pid reused) matters here; an
            # exec is noticed when it is sampled again
            if procfs.start_time(pid) != self._processes[pid].identity[0]:
                self.forget(pid)
            else:
                self._processes[pid].checked_at = now

    def _missed(self, pid: int) -> bool:
        value = self._procs.get(ct.c_uint32(pid))
        if value is None:
            return True
        return bool(_PROC_HEAD.unpack_from(bytes(value))[1])

    def forget(self, pid: int) -> None:
        if pid in self._processes:
            self._release(pid)
            self._procs.delete(ct.c_uint32(pid))

    @property
    def processes(self) -> int:
        return len(self._processes)

    def knows(self, pid: int) -> bool:
        """Whether the process's mappings are in the kernel."""
        return pid in self._processes

    def complete(self, pid: int) -> bool:
        """Whether they are, with a table for each file that has one."""
        known = self._processes.get(pid)
        return known is not None and known.complete

