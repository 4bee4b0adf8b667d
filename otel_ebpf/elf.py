"""Function symbols and load layout of one ELF file, for user-space symbolization.

pyelftools reads the headers, notes and sections; the symbol entries themselves are decoded
with `struct.iter_unpack` because walking them through pyelftools costs ~20 µs each, which is
seconds for binaries like node (100k+ symbols) instead of tens of milliseconds.
"""

from __future__ import annotations

import lzma
import struct
from bisect import bisect_right
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

STT_FUNC = 2
STT_GNU_IFUNC = 10
SHN_UNDEF = 0
SHN_LORESERVE = 0xFF00
PF_X = 1
# Among aliases at one address the exported (global) name is the one people know.
_BIND_RANK = {1: 0, 10: 1, 2: 1, 0: 2}  # GLOBAL, GNU_UNIQUE, WEAK, LOCAL
# A wrongly chosen enclosing symbol is rare; scanning back further only costs time.
_MAX_BACKSCAN = 8
DEBUG_ROOT = Path("/usr/lib/debug/.build-id")


class ElfReadError(Exception):
    """The file is not a readable ELF file."""


class ElfSymbols:
    """Sorted, non-empty function extents of one file, in the file's own virtual addresses.

    `source` says where the names came from ("symtab", "dynsym", "debuginfo", "minidebuginfo"
    or "none"), so a caller can tell a stripped file from a missing function.
    """

    __slots__ = ("__weakref__", "_ends", "_names", "_segments", "_starts", "build_id",
                 "source")

    def __init__(self, build_id: str | None, source: str,
                 segments: list[tuple[int, int, int]],
                 functions: list[tuple[int, int, str]]) -> None:
        self.build_id = build_id
        self.source = source
        self._segments = segments  # (p_offset, p_vaddr, p_filesz) of executable PT_LOADs
        self._starts = [f[0] for f in functions]
        self._ends = [f[1] for f in functions]
        self._names = [f[2] for f in functions]

    def __len__(self) -> int:
        return len(self._starts)

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
            if vaddr < self._ends[j]:
                return self._names[j], self._starts[j]
        return None

    def with_names_from(self, other: ElfSymbols) -> ElfSymbols:
        """This file's layout and build id with names from a separate debug file."""
        functions = list(zip(other._starts, other._ends, other._names, strict=True))
        return ElfSymbols(self.build_id, other.source, self._segments, functions)


def load(file: BinaryIO, known: Callable[[str], ElfSymbols | None] | None = None,
         debug_root: Path | None = DEBUG_ROOT) -> ElfSymbols:
    """Read `file`; `known(build_id)` may return an already loaded table of the same build.

    Files without a .symtab get names from /usr/lib/debug/.build-id/ or MiniDebugInfo
    (.gnu_debugdata) when available, then from .dynsym.
    """
    try:
        elf = ELFFile(file)
        build_id = _build_id(elf)
        if build_id is not None and known is not None:
            cached = known(build_id)
            if cached is not None and cached.source != "dynsym":
                return cached
        segments = [(s["p_offset"], s["p_vaddr"], s["p_filesz"]) for s in elf.iter_segments()
                    if s["p_type"] == "PT_LOAD" and s["p_flags"] & PF_X]
        table = ElfSymbols(build_id, "none", segments, [])
        for source, functions in _symbol_sources(elf, build_id, debug_root):
            if functions:
                return ElfSymbols(build_id, source, segments, functions)
        return table
    except (ELFError, struct.error, OSError, ValueError, lzma.LZMAError) as exc:
        raise ElfReadError(str(exc) or type(exc).__name__) from exc


def _symbol_sources(elf: ELFFile, build_id: str | None, debug_root: Path | None
                    ) -> list[tuple[str, list[tuple[int, int, str]]]]:
    # Lazily evaluated in order of preference: a later source is only read when every
    # earlier one had no functions.
    def symtab() -> list[tuple[int, int, str]]:
        return _functions(elf, ".symtab")

    def debuginfo() -> list[tuple[int, int, str]]:
        if build_id is None or debug_root is None or len(build_id) < 3:
            return []
        path = debug_root / build_id[:2] / f"{build_id[2:]}.debug"
        if not path.is_file():
            return []
        with path.open("rb") as f:
            return _functions(ELFFile(f), ".symtab")

    def minidebuginfo() -> list[tuple[int, int, str]]:
        section = elf.get_section_by_name(".gnu_debugdata")
        if section is None:
            return []
        return _functions(ELFFile(BytesIO(lzma.decompress(section.data()))), ".symtab")

    def dynsym() -> list[tuple[int, int, str]]:
        return _functions(elf, ".dynsym")

    out: list[tuple[str, list[tuple[int, int, str]]]] = []
    for name, read in (("symtab", symtab), ("debuginfo", debuginfo),
                       ("minidebuginfo", minidebuginfo), ("dynsym", dynsym)):
        functions = read()
        out.append((name, functions))
        if functions:
            break
    return out


def _build_id(elf: ELFFile) -> str | None:
    section = elf.get_section_by_name(".note.gnu.build-id")
    holders = [section] if section is not None else [
        s for s in elf.iter_segments() if s["p_type"] == "PT_NOTE"]
    for holder in holders:
        for note in holder.iter_notes():
            if note["n_type"] == "NT_GNU_BUILD_ID" and isinstance(note["n_desc"], str):
                return note["n_desc"]
    return None


def _functions(elf: ELFFile, name: str) -> list[tuple[int, int, str]]:
    """Sorted (start, end, name) of the defined functions in section `name`."""
    section = elf.get_section_by_name(name)
    if section is None or section["sh_entsize"] == 0:
        return []
    strtab = elf.get_section(section["sh_link"]).data()
    order = "<" if elf.little_endian else ">"
    if elf.elfclass == 64:
        layout, fields = order + "IBBHQQ", (0, 1, 3, 4, 5)
    else:
        layout, fields = order + "IIIBBH", (0, 3, 5, 1, 2)
    if struct.calcsize(layout) != section["sh_entsize"]:
        return []
    thumb = elf["e_machine"] == "EM_ARM"  # bit 0 of an ARM function address marks Thumb
    section_ends = [s["sh_addr"] + s["sh_size"] for s in elf.iter_sections()]
    find = strtab.find
    raw: list[tuple[int, int, int, str, int]] = []
    n_i, info_i, shndx_i, value_i, size_i = fields
    for entry in struct.iter_unpack(layout, section.data()):
        info, shndx, value = entry[info_i], entry[shndx_i], entry[value_i]
        if info & 0xF not in (STT_FUNC, STT_GNU_IFUNC) or shndx == SHN_UNDEF or value == 0:
            continue
        if thumb:
            value &= ~1
        name_at = entry[n_i]
        label = strtab[name_at:find(b"\0", name_at)].decode("utf-8", "replace")
        # A size-0 symbol (hand-written assembly) may only extend up to the end of its
        # section; one in no real section has no known extent and is dropped.
        limit = section_ends[shndx] if shndx < min(SHN_LORESERVE, len(section_ends)) else 0
        if entry[size_i] == 0 and limit <= value:
            continue
        rank = _BIND_RANK.get(info >> 4, 3)
        raw.append((value, rank, len(label) - len(label.lstrip("_")), label,
                    value + entry[size_i] if entry[size_i] else -limit))
    return _extents(sorted(raw))


def _extents(raw: list[tuple[int, int, int, str, int]]) -> list[tuple[int, int, str]]:
    # One entry per address (the preferred alias, the longest size); size-0 symbols (end
    # stored as -section_end) stop at the next function start.
    out: list[tuple[int, int, str]] = []
    i = 0
    while i < len(raw):
        start, _, _, label, end = raw[i]
        j = i + 1
        while j < len(raw) and raw[j][0] == start:
            end = max(end, raw[j][4]) if end > 0 and raw[j][4] > 0 else end if end > 0 \
                else raw[j][4] if raw[j][4] > 0 else end
            j += 1
        if end < 0:
            end = min(-end, raw[j][0]) if j < len(raw) else -end
        out.append((start, end, label))
        i = j
    return out
