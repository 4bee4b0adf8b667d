"""Code objects of a live CPython process, read through /proc/<pid>/mem: qualified name,
file, first line and line table; and the line of an instruction offset, per version.

Line tables (Objects/lnotab_notes.txt of each release):
- 3.8, 3.9 `co_lnotab`: (bytecode delta, signed line delta) byte pairs; f_lasti in bytes.
- 3.10 `co_linetable`: (bytecode delta, signed line delta, -128: no line) pairs; f_lasti in
  code units.
- 3.11+ location table: entries of a header byte (bit 7 set, code in bits 3-6, length - 1
  in code units in bits 0-2) and varints; the instruction is a code unit index.
"""

from __future__ import annotations

import struct
from array import array
from bisect import bisect_right
from dataclasses import dataclass

from otel_ebpf.symbolize.python.layouts import INSTR_POINTER, Layout

MAX_STRING = 4096
MAX_LINETABLE = 1 << 20
ADDRESS_BITS = 48  # PY_ADDRESS_BITS: a code word's address; a stamp above it


def code_word(code: int, firstlineno: int, name: int) -> int:
    """The word the kernel records for the code object at `code` with this first line
    and name pointer (py_code_word in probes/python_stack.h): the address and a stamp
    that tells a reused address's new code object from the freed one."""
    stamp = ((firstlineno & 0xFFFFFFFF) ^ name >> 4 ^ name >> 20 ^ name >> 36) & 0xFFFF
    return code | (stamp or 1) << ADDRESS_BITS


def code_address(word: int) -> int:
    return word & ((1 << ADDRESS_BITS) - 1)


class Replaced(ValueError):
    """The code object the kernel saw at an address is gone; another one lives there."""


@dataclass(frozen=True, slots=True)
class CodeInfo:
    name: str
    filename: str
    firstlineno: int
    linetable: bytes  # empty when not read (the process had exited)


class ProcessMemory:
    """Reads of another process's memory (needs ptrace access: CAP_SYS_PTRACE)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd = open(f"/proc/{pid}/mem", "rb", buffering=0)  # noqa: SIM115

    def read(self, addr: int, size: int) -> bytes:
        if not 0 < addr < 1 << 63:
            raise OSError(f"no user address: {addr:#x}")
        self._fd.seek(addr)
        data = self._fd.read(size)
        if data is None or len(data) != size:
            raise OSError(f"short read of {size} bytes at {addr:#x} in {self.pid}")
        return bytes(data)

    def u64(self, addr: int) -> int:
        return int(struct.unpack("<Q", self.read(addr, 8))[0])

    def i32(self, addr: int) -> int:
        return int(struct.unpack("<i", self.read(addr, 4))[0])

    def close(self) -> None:
        self._fd.close()


def read_str(mem: ProcessMemory, obj: int, layout: Layout) -> str:
    """A compact str object's text."""
    state = struct.unpack("<I", mem.read(obj + layout.unicode_state, 4))[0]
    length = mem.u64(obj + 16)  # PyASCIIObject.length, after the object header
    kind, compact, ascii_ = state >> 2 & 7, state >> 5 & 1, state >> 6 & 1
    if not compact or kind not in (1, 2, 4) or length > MAX_STRING:
        raise ValueError(f"not a compact str at {obj:#x}")
    if ascii_:
        return mem.read(obj + layout.unicode_ascii_size, length).decode("ascii", "replace")
    data = mem.read(obj + layout.compact_size, length * kind)
    return data.decode({1: "latin-1", 2: "utf-16-le", 4: "utf-32-le"}[kind], "replace")


def read_bytes(mem: ProcessMemory, obj: int, layout: Layout) -> bytes:
    size = mem.u64(obj + layout.bytes_size)
    if size > MAX_LINETABLE:
        raise ValueError(f"bytes object of {size} at {obj:#x}")
    return mem.read(obj + layout.bytes_data, size) if size else b""


def read_code(mem: ProcessMemory, word: int, layout: Layout) -> CodeInfo:
    """A code object's name (qualified where the version has co_qualname), file, first
    line and line table, from a code word the kernel recorded (or a bare address, which
    is not checked). Raises OSError or ValueError when it cannot be read, Replaced when
    the object at the address is not the one the word stamps."""
    code = code_address(word)
    firstlineno = mem.i32(code + layout.code_firstlineno)
    if word != code and code_word(code, firstlineno, mem.u64(code + layout.code_name)) != word:
        raise Replaced(f"code object at {code:#x} replaced in {mem.pid}")
    name = read_str(mem, mem.u64(code + layout.code_qualname), layout)
    filename = read_str(mem, mem.u64(code + layout.code_filename), layout)
    return CodeInfo(name, filename, firstlineno,
                    read_bytes(mem, mem.u64(code + layout.code_linetable), layout))


class LineRanges:
    """A line table decoded once: [start, end) ranges of instruction offsets (in the unit
    line_of looks them up in) and their lines (0: none). Flat arrays: as lists of ints the
    tables of a few hundred sampled code objects held 1.6 MB."""

    __slots__ = ("ends", "lines", "starts")

    def __init__(self) -> None:
        self.starts = array("q")
        self.ends = array("q")
        self.lines = array("q")

    def add(self, start: int, end: int, line: int) -> None:
        if self.starts and self.starts[-1] == start:  # the last entry for one offset wins
            self.ends[-1], self.lines[-1] = end, line
        else:
            self.starts.append(start)
            self.ends.append(end)
            self.lines.append(line)

    def line(self, at: int) -> int:
        i = bisect_right(self.starts, at) - 1
        return self.lines[i] if i >= 0 and at < self.ends[i] else 0


def line_ranges(info: CodeInfo, version: tuple[int, int]) -> LineRanges:
    if version < (3, 10):
        return _lnotab_ranges(info.linetable, info.firstlineno)
    if version < (3, 11):
        return _linetable_310_ranges(info.linetable, info.firstlineno)
    return _locations_ranges(info.linetable, info.firstlineno)


def instr_offset(instr: int, layout: Layout) -> int:
    """The BPF walk's instruction (f_lasti, or bytes from co_code_adaptive) in the unit of
    line_ranges: bytes for 3.8-3.10, code units for 3.11+."""
    if layout.version < (3, 10):
        return instr
    if layout.version < (3, 11):
        return instr * 2
    return max(instr // 2 if layout.instr_kind == INSTR_POINTER else instr, 0)


def line_of(info: CodeInfo, instr: int, layout: Layout) -> int:
    """The line of the instruction `instr` (as the BPF walk records it); 0 when unknown.
    Decodes the line table each call: callers that repeat keep line_ranges instead."""
    if not info.linetable:
        return 0
    return line_ranges(info, layout.version).line(instr_offset(instr, layout))


def _lnotab_ranges(table: bytes, line: int) -> LineRanges:
    out = LineRanges()
    addr = 0
    out.add(0, 1 << 62, line)
    for i in range(0, len(table) - 1, 2):
        addr += table[i]
        delta = table[i + 1]
        line += delta - 256 if delta >= 128 else delta
        out.add(addr, 1 << 62, line)  # up to the next change of line
    return out


def _linetable_310_ranges(table: bytes, line: int) -> LineRanges:
    out = LineRanges()
    start = 0
    for i in range(0, len(table) - 1, 2):
        end = start + table[i]
        delta = table[i + 1]
        if delta != 128:  # -128: no line for this range
            line += delta - 256 if delta > 128 else delta
        if end > start:
            out.add(start, end, line if delta != 128 else 0)
        start = end
    return out


def _varint(table: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while i < len(table):
        b = table[i]
        i += 1
        value |= (b & 63) << shift
        shift += 6
        if not b & 64:
            break
    return value, i


def _svarint(table: bytes, i: int) -> tuple[int, int]:
    value, i = _varint(table, i)
    return (-(value >> 1) if value & 1 else value >> 1), i


def _locations_ranges(table: bytes, line: int) -> LineRanges:
    out = LineRanges()
    addr, i = 0, 0
    while i < len(table):
        header = table[i]
        i += 1
        code, length = header >> 3 & 15, (header & 7) + 1
        delta, has_line = 0, True
        if code == 15:
            has_line = False
        elif code == 14:  # long form: line delta, end line delta, column, end column
            delta, i = _svarint(table, i)
            for _ in range(3):
                _, i = _varint(table, i)
        elif code == 13:  # no column
            delta, i = _svarint(table, i)
        elif code >= 10:  # one-line form: two column bytes
            delta, i = code - 10, i + 2
        else:  # short form: one column byte
            i += 1
        line += delta
        out.add(addr, addr + length, line if has_line else 0)
        addr += length
    return out
