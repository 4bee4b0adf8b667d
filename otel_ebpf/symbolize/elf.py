"""Function symbols and load layout of one ELF file, for user-space symbolization.

otel_ebpf.symbolize.elfread reads the headers, notes and sections; the symbol entries are
decoded with `struct.iter_unpack`: walking them through pyelftools cost ~20 µs each, which is
seconds for binaries like node (100k+ symbols) instead of tens of milliseconds, and finding
a section by name through it parsed every hash table of the file.
"""

from __future__ import annotations

import lzma
import os
import struct
import threading
from array import array
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable
from io import BytesIO
from operator import itemgetter
from pathlib import Path
from typing import BinaryIO, NamedTuple
from weakref import WeakValueDictionary

from otel_ebpf.symbolize.elfread import (
    EM_ARM,
    PF_X,
    PT_LOAD,
    SHN_UNDEF,
    ElfFile,
    symbol_entries,
)
from otel_ebpf.symbolize.names import PackedNames
from otel_ebpf.symbolize.procfs import FileKey, file_key

STT_FUNC = 2
STT_GNU_IFUNC = 10
SHN_LORESERVE = 0xFF00
_BIND_RANK = {1: 0, 10: 1, 2: 1, 0: 2}  # GLOBAL, GNU_UNIQUE, WEAK, LOCAL
# Nesting is shallow (a function with a few labelled parts); looking further back for an
# enclosing function would only cost time on every miss.
_MAX_BACKSCAN = 8
DEBUG_ROOT = Path("/usr/lib/debug/.build-id")
# Sources with every function (not only the exported ones) worth sharing by build id.
_FULL = frozenset({"symtab", "debuginfo", "minidebuginfo"})


class ElfReadError(Exception):
    """The file is not a readable ELF file."""


class ElfSymbols:
    """Sorted, non-empty function extents of one file, in the file's own virtual addresses.

    `source` says where the names came from ("symtab", "debuginfo", "minidebuginfo",
    "dynsym" or "none"), so a caller can tell a stripped file from a missing function.
    Names stay undecoded in the string table until looked up: decoding 100k names up front
    would double the load time and memory for the few hundred that samples ever hit; the
    table itself is held compressed (otel_ebpf.symbolize.names).
    """

    __slots__ = ("__weakref__", "_name_at", "_names", "_segments", "_sizes", "_starts",
                 "build_id", "source")

    def __init__(self, build_id: str | None, source: str, segments: list[tuple[int, int, int]],
                 table: _Table | None = None) -> None:
        self.build_id = build_id
        self.source = source
        self._segments = segments  # (p_offset, p_vaddr, p_filesz) of executable PT_LOADs
        if table is None:
            table = _Table(array("Q"), array("I"), array("I"), b"")
        self._starts, self._sizes, self._name_at = table.starts, table.sizes, table.name_at
        self._names = PackedNames(table.names)

    def __len__(self) -> int:
        return len(self._starts)

    @property
    def nbytes(self) -> int:
        """Memory held by the table (what the cache's byte budget counts)."""
        return (self._names.nbytes + self._starts.itemsize * len(self._starts)
                + (self._sizes.itemsize + self._name_at.itemsize) * len(self._sizes))

    def vaddr_for_offset(self, file_offset: int) -> int | None:
        for p_offset, p_vaddr, p_filesz in self._segments:
            if p_offset <= file_offset < p_offset + p_filesz:
                return file_offset - p_offset + p_vaddr
        return None

    def lookup(self, vaddr: int) -> tuple[str, int] | None:
        """(name, start) of the function containing `vaddr`."""
        i = bisect_right(self._starts, vaddr) - 1
        # Nested symbols (a function with a local label symbol inside) make the nearest
        # start miss; the enclosing one is a few entries back.
        for j in range(i, max(i - _MAX_BACKSCAN, -1), -1):
            if vaddr < self._starts[j] + self._sizes[j]:
                return self._names.text(self._name_at[j]), self._starts[j]
        return None


class _Table(NamedTuple):
    starts: array[int]  # Q
    sizes: array[int]  # I (4 bytes: sizes are capped at _MAX_SIZE)
    name_at: array[int]  # I, into names
    names: bytes  # NUL-terminated function names


_MAX_SIZE = (1 << 32) - 1
# What the symbol tables of a node's busy binaries take (libc, python, a JIT runtime, a few
# large C++ servers: 1-6 MB each as raw names, 0.3-1.5 MB as held, names compressed); past it
# the least recently used are read again. One cache serves every probe (shared()).
DEFAULT_MAX_BYTES = 12 << 20


class ElfCache:
    """Symbol tables by file identity (dev, inode, mtime, size), least recently used first
    out once there are `max_files` of them or they hold `max_bytes` together (the newest
    one always stays); files of the same build id share one table. The counters feed
    self-metrics. Thread-safe: the probes' symbolizers share one (shared())."""

    def __init__(self, max_files: int = 512, debug_root: Path | None = DEBUG_ROOT,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self._max_files, self._max_bytes, self._debug_root = max_files, max_bytes, debug_root
        self.nbytes = 0
        self._files: OrderedDict[FileKey, ElfSymbols | None] = OrderedDict()
        # Weak: a table lives as long as the LRU or a process snapshot holds it.
        self._by_build_id: WeakValueDictionary[str, ElfSymbols] = WeakValueDictionary()
        self.hits = self.misses = self.errors = self.evictions = 0
        self._lock = threading.Lock()

    @staticmethod
    def _key(file: BinaryIO) -> FileKey:
        return file_key(os.fstat(file.fileno()))

    def cached(self, file: BinaryIO) -> tuple[bool, ElfSymbols | None]:
        """(True, table) when this file's table is loaded already; never loads."""
        key = self._key(file)
        with self._lock:
            return self._cached(key)

    def _cached(self, key: FileKey) -> tuple[bool, ElfSymbols | None]:
        if key in self._files:
            self.hits += 1
            self._files.move_to_end(key)
            return True, self._files[key]
        return False, None

    def get(self, file: BinaryIO) -> ElfSymbols | None:
        """The table of the open `file`; None for a file that is not readable ELF."""
        key = self._key(file)
        with self._lock:  # held while loading: another thread wanting it waits, not loads
            known, table = self._cached(key)
            return table if known else self._load(key, file)

    def _load(self, key: FileKey, file: BinaryIO) -> ElfSymbols | None:
        self.misses += 1
        try:
            table: ElfSymbols | None = load(file, self._by_build_id.get, self._debug_root)
        except ElfReadError:
            self.errors += 1
            table = None  # remembered too: an unreadable file is not retried per process
        if table is not None and table.build_id is not None and table.source in _FULL:
            self._by_build_id[table.build_id] = table
        self._files[key] = table
        self.nbytes += table.nbytes if table is not None else 0
        while len(self._files) > 1 and (len(self._files) > self._max_files
                                        or self.nbytes > self._max_bytes):
            _, evicted = self._files.popitem(last=False)
            self.nbytes -= evicted.nbytes if evicted is not None else 0
            self.evictions += 1
        return table


_shared: ElfCache | None = None
_shared_lock = threading.Lock()


def shared() -> ElfCache:
    """The process's one cache on the defaults: every probe's symbolizer reads a binary's
    table once and holds one copy of it (the CPU profile and slow-call stacks sample many
    of the same binaries)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = ElfCache()
        return _shared


def open_mapped(pid: int, start: int, end: int, path: str, dev: int, inode: int
                ) -> BinaryIO | None:
    """The file mapped at [start, end) in process `pid` (dev, inode as in its maps)."""
    # map_files is the mapped file itself, even deleted or outside our mount namespace; the
    # path routes may name another file by now, so their inode (and device, for the path
    # as seen from here) must still match the mapping's.
    if not path.startswith("/"):
        return None
    candidates = ((f"/proc/{pid}/map_files/{start:x}-{end:x}", False, False),
                  (f"/proc/{pid}/root{path}", True, False), (path, True, True))
    for candidate, check_inode, check_dev in candidates:
        try:
            file = open(candidate, "rb")  # noqa: SIM115 - returned open to the caller
        except OSError:
            continue
        st = os.fstat(file.fileno())
        if (check_inode and st.st_ino != inode) or (check_dev and st.st_dev != dev):
            file.close()
            continue
        return file
    return None


def load(file: BinaryIO, known: Callable[[str], ElfSymbols | None] | None = None,
         debug_root: Path | None = DEBUG_ROOT) -> ElfSymbols:
    """Read `file`; `known(build_id)` may return an already loaded table of the same build.

    Files without a .symtab get names from /usr/lib/debug/.build-id/ or MiniDebugInfo
    (.gnu_debugdata) when available, then from .dynsym.
    """
    try:
        elf = ElfFile(file)
        build_id = elf.build_id()
        if build_id is not None and known is not None:
            cached = known(build_id)
            if cached is not None and cached.source in _FULL:
                return cached  # same link output: same layout, and names need no re-read
        segments = [(s.offset, s.vaddr, s.filesz) for s in elf.segments
                    if s.type == PT_LOAD and s.flags & PF_X]
        for source, read in _SOURCES:
            table = read(elf, build_id, debug_root)
            if table is not None:
                return ElfSymbols(build_id, source, segments, table)
        return ElfSymbols(build_id, "none", segments)
    except (struct.error, OSError, ValueError, IndexError, lzma.LZMAError) as exc:
        raise ElfReadError(str(exc) or type(exc).__name__) from exc


def _from_symtab(elf: ElfFile, build_id: str | None, debug_root: Path | None) -> _Table | None:
    return _functions(elf, ".symtab")


def _from_debuginfo(elf: ElfFile, build_id: str | None, debug_root: Path | None
                    ) -> _Table | None:
    if build_id is None or debug_root is None or len(build_id) < 3:
        return None
    path = debug_root / build_id[:2] / f"{build_id[2:]}.debug"
    if not path.is_file():
        return None
    with path.open("rb") as f:
        return _functions(ElfFile(f), ".symtab")


def _from_minidebuginfo(elf: ElfFile, build_id: str | None, debug_root: Path | None
                        ) -> _Table | None:
    section = elf.section(".gnu_debugdata")
    if section is None:
        return None
    return _functions(ElfFile(BytesIO(lzma.decompress(elf.data(section)))), ".symtab")


def _from_dynsym(elf: ElfFile, build_id: str | None, debug_root: Path | None) -> _Table | None:
    return _functions(elf, ".dynsym")


# In order of preference; a later source is read only when the earlier ones had no function.
_SOURCES: tuple[tuple[str, Callable[[ElfFile, str | None, Path | None], _Table | None]], ...] = (
    ("symtab", _from_symtab), ("debuginfo", _from_debuginfo),
    ("minidebuginfo", _from_minidebuginfo), ("dynsym", _from_dynsym))


def file_build_id(file: BinaryIO) -> str | None:
    """The GNU build id of an open ELF file; None without one or when it is not ELF."""
    try:
        return ElfFile(file).build_id()
    except (struct.error, OSError, ValueError, IndexError):
        return None


def _functions(elf: ElfFile, name: str) -> _Table | None:
    """The defined functions in symbol table section `name`, or None when it has none."""
    section = elf.section(name)
    if section is None:
        return None
    table = symbol_entries(elf, section)
    if table is None:
        return None
    entries, (n_i, info_i, shndx_i, value_i, size_i) = table
    thumb = elf.machine == EM_ARM  # bit 0 of an ARM function address marks Thumb
    section_ends = [s.addr + s.size for s in elf.sections]
    reserved = min(SHN_LORESERVE, len(section_ends))
    raw: list[tuple[int, int, int, int, int]] = []  # value, size, section end, bind, name
    for entry in entries:
        info, shndx, value = entry[info_i], entry[shndx_i], entry[value_i]
        if info & 0xF not in (STT_FUNC, STT_GNU_IFUNC) or shndx == SHN_UNDEF or value == 0:
            continue
        if thumb:
            value &= ~1
        # A size-0 symbol (hand-written assembly) may only extend up to the end of its
        # section; one in no real section has no known extent and is dropped.
        limit = section_ends[shndx] if shndx < reserved else 0
        if entry[size_i] == 0 and limit <= value:
            continue
        raw.append((value, entry[size_i], limit, info >> 4, entry[n_i]))
    if not raw:
        return None
    raw.sort(key=itemgetter(0))
    return _extents(raw, elf.data(elf.sections[section.link]))


def _extents(raw: list[tuple[int, int, int, int, int]], strtab: bytes) -> _Table:
    # One entry per address: the preferred alias with the largest size of the group;
    # without any size it stops at the next function or at its section's end. Only the
    # kept names are copied out of the string table (which also holds every object,
    # file and section name), NUL-terminated, into a table of their own.
    table = _Table(array("Q"), array("I"), array("I"), b"")
    names = bytearray()
    i, count = 0, len(raw)
    while i < count:
        start, size, limit, _, name_at = raw[i]
        j = i + 1
        if j < count and raw[j][0] == start:
            while j < count and raw[j][0] == start:
                j += 1
            group = raw[i:j]
            size, limit = max(g[1] for g in group), max(g[2] for g in group)
            name_at = min(group, key=lambda g: _alias_preference(_text(strtab, g[4]), g[3]))[4]
        next_start = raw[j][0] if j < count else limit
        end = start + size if size else min(limit, next_start)
        if len(names) > _MAX_SIZE:
            break  # 4 GiB of names (offsets are 32-bit): no binary's; the rest is left out
        table.starts.append(start)
        table.sizes.append(min(end - start, _MAX_SIZE))
        table.name_at.append(len(names))
        names += strtab[name_at:strtab.find(b"\0", name_at) + 1]
        i = j
    return table._replace(names=bytes(names))


def _text(strtab: bytes, at: int) -> str:
    return strtab[at:strtab.find(b"\0", at)].decode("utf-8", "replace")


def _alias_preference(name: str, bind: int) -> tuple[int, int, str]:
    # Among aliases at one address the exported name is the one people know: global over
    # weak over local, then fewer leading underscores (getppid over __getppid).
    return _BIND_RANK.get(bind, 3), len(name) - len(name.lstrip("_")), name


def load_vdso() -> tuple[int, ElfSymbols] | None:
    """(size, table) of this process's vDSO: the kernel maps one image into every native
    process, so it names other processes' [vdso] frames without reading their memory."""
    try:
        with open("/proc/self/maps") as maps:
            spans = [line.split()[0] for line in maps if line.rstrip().endswith(" [vdso]")]
        if not spans:
            return None
        start, end = (int(x, 16) for x in spans[0].split("-"))
        with open("/proc/self/mem", "rb", buffering=0) as mem:
            mem.seek(start)
            image = mem.read(end - start)
        return end - start, load(BytesIO(image), debug_root=None)
    except (OSError, ElfReadError):
        return None
