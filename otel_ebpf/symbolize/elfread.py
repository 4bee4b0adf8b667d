"""What symbolization reads of an ELF file - its header, section and program header tables,
one section's bytes, its GNU build id - with struct, nothing else.

Why not pyelftools here: to find one section by name it builds an object for every section,
and the object of a .hash or .gnu.hash section parses the whole table, entry by entry. That
was ~90 % of loading a library's symbols (50 ms for libLLVM's dynsym alone), and loading
the symbols of newly seen binaries was most of the agent's CPU at rest on a busy node.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import BinaryIO, NamedTuple

MAGIC = b"\x7fELF"
SHT_NOTE, SHT_NOBITS = 7, 8
PT_LOAD, PT_NOTE = 1, 4
PF_X = 1
SHN_UNDEF, SHN_XINDEX = 0, 0xFFFF
EM_ARM, EM_X86_64 = 40, 62
NT_GNU_BUILD_ID = 3
_MAX_TABLE = 1 << 22  # bytes of a section or program header table: 65k entries of 64 bytes


class Section(NamedTuple):
    name: str
    type: int
    addr: int
    offset: int
    size: int
    link: int
    addralign: int
    entsize: int


class Segment(NamedTuple):
    type: int
    flags: int
    offset: int
    vaddr: int
    filesz: int
    align: int


class ElfFile:
    """The tables of an open ELF file. ValueError or struct.error: not (readable) ELF."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        file.seek(0)
        head = file.read(64)
        if len(head) < 52 or head[:4] != MAGIC or head[4] not in (1, 2) or head[5] not in (1, 2):
            raise ValueError("not an ELF file")
        self.elfclass = 64 if head[4] == 2 else 32
        self.order = "<" if head[5] == 1 else ">"
        self.little_endian = head[5] == 1
        wide = self.elfclass == 64
        (_, self.machine, _, _, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum,
         shstrndx) = struct.unpack_from(self.order + ("HHIQQQIHHHHHH" if wide
                                                      else "HHIIIIIHHHHHH"), head, 16)
        self.segments = [self._segment(raw) for raw in self._table(
            phoff, phentsize, phnum, "IIQQQQQQ" if wide else "IIIIIIII")]
        layout = "IIQQQQIIQQ" if wide else "IIIIIIIIII"
        if shnum == 0 and shoff:  # more than 0xff00 sections: the count is in entry 0
            shnum = self._table(shoff, shentsize, 1, layout)[0][5]
        sections = self._table(shoff, shentsize, shnum, layout)
        if sections and shstrndx == SHN_XINDEX:
            shstrndx = sections[0][6]
        names = b""
        if 0 < shstrndx < len(sections):
            strtab = sections[shstrndx]
            names = self._read(strtab[4], strtab[5])
        self.sections = [
            Section(names[name:names.find(b"\0", name)].decode("utf-8", "replace"),
                    kind, addr, offset, size, link, align, entsize)
            for name, kind, _, addr, offset, size, link, _, align, entsize in sections]

    def _table(self, offset: int, entsize: int, count: int, layout: str
               ) -> list[tuple[int, ...]]:
        if offset == 0 or count == 0:
            return []
        entry = struct.Struct(self.order + layout)
        if entsize < entry.size or entsize * count > _MAX_TABLE:
            raise ValueError(f"implausible header table ({count} x {entsize} bytes)")
        data = self._read(offset, entsize * count)
        return [entry.unpack_from(data, i * entsize) for i in range(count)]

    def _segment(self, raw: tuple[int, ...]) -> Segment:
        if self.elfclass == 64:
            kind, flags, offset, vaddr, _, filesz, _, align = raw
        else:
            kind, offset, vaddr, _, filesz, _, flags, align = raw
        return Segment(kind, flags, offset, vaddr, filesz, align)

    def _read(self, offset: int, size: int) -> bytes:
        self._file.seek(offset)
        data = self._file.read(size)
        if len(data) != size:
            raise ValueError(f"truncated ELF file: {size} bytes at {offset} wanted")
        return data

    def section(self, name: str) -> Section | None:
        """The first section called `name`."""
        return next((s for s in self.sections if s.name == name), None)

    def data(self, section: Section) -> bytes:
        return b"" if section.type == SHT_NOBITS else self._read(section.offset, section.size)

    def build_id(self) -> str | None:
        """The GNU build id: from its note section, else (section headers stripped) from the
        PT_NOTE segments."""
        section = self.section(".note.gnu.build-id")
        if section is not None and section.type == SHT_NOTE:
            found = notes_build_id(self.data(section), self.order, section.addralign)
            if found is not None:
                return found
        for segment in self.segments:
            if segment.type == PT_NOTE:
                found = notes_build_id(self._read(segment.offset, segment.filesz), self.order,
                                       segment.align)
                if found is not None:
                    return found
        return None


def symbol_value(elf: ElfFile, name: str, table: str = ".dynsym") -> int | None:
    """The value of the defined symbol `name` in symbol table `table` (the dynamic one: what
    a file exports), or None. One scan of the table for the entry naming the string's
    offset: no name is decoded."""
    section = elf.section(table)
    if section is None or section.entsize == 0 or not 0 < section.link < len(elf.sections):
        return None
    strtab = elf.data(elf.sections[section.link])
    # every place the string ends the way `name` does: linkers store a name that is the
    # tail of another (PyDict_Next in _PyDict_Next) inside it
    wanted = name.encode() + b"\0"
    offsets = set()
    at = strtab.find(wanted)
    while at >= 0:
        offsets.add(at)
        at = strtab.find(wanted, at + 1)
    if not offsets:
        return None
    symbols = symbol_entries(elf, section)
    if symbols is None:
        return None
    entries, (name_i, _, shndx_i, value_i, _) = symbols
    for entry in entries:
        if entry[name_i] in offsets and entry[shndx_i] != SHN_UNDEF and entry[value_i]:
            return int(entry[value_i])
    return None


def symbol_entries(elf: ElfFile, section: Section
                   ) -> tuple[Iterator[tuple[int, ...]], tuple[int, int, int, int, int]] | None:
    """The raw entries of symbol table `section` and where each holds st_name, st_info,
    st_shndx, st_value and st_size (the 32- and 64-bit layouts order them differently);
    None when its entry size is not ELF's. Raw, not reordered: a table has 100k entries."""
    if elf.elfclass == 64:
        layout, fields = "IBBHQQ", (0, 1, 3, 4, 5)
    else:
        layout, fields = "IIIBBH", (0, 3, 5, 1, 2)
    entry = struct.Struct(elf.order + layout)
    if section.entsize != entry.size:
        return None
    data = elf.data(section)
    return entry.iter_unpack(data[:len(data) - len(data) % entry.size]), fields


def notes_build_id(data: bytes, order: str = "=", align: int = 4) -> str | None:
    """The GNU build id among raw ELF notes (`order`: a struct byte order), or None."""
    step = 8 if align == 8 else 4
    at = 0
    while at + 12 <= len(data):
        namesz, descsz, kind = struct.unpack_from(order + "III", data, at)
        at += 12
        name = data[at:at + namesz]
        at += -(-namesz // step) * step
        desc = data[at:at + descsz]
        at += -(-descsz // step) * step
        if kind == NT_GNU_BUILD_ID and name.rstrip(b"\0") == b"GNU" and desc:
            return desc.hex()
    return None
