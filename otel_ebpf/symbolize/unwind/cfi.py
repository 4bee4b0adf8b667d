"""DWARF call-frame information (.eh_frame, .debug_frame) of one x86_64 ELF file, compiled
into the compact rows the in-kernel unwinder (probes/user_stack.h) binary-searches.

A row holds, from its pc (the file's own virtual address) up to the next row's: how to
find the canonical frame address (CFA = rsp + N, rbp + N, the PLT's rule, none), where the
caller's rbp was saved (CFA + N, unchanged, unknown) and whether the frame is the outermost
one (return address undefined, as in _start). The return address is at CFA - 8 on x86_64.
Rows are 8 bytes (struct unwind_row): u32 pc, u16 CFA offset / 8, u8 kind, s8 rbp offset /8.

symbolize/elfread.py finds the sections and segments; records.py decodes the records and
their instructions (pyelftools' per-instruction objects cost ~6 s for python3.11's 10k FDEs,
and it rejects some of libc's opcodes; that loop takes 0.27 s).
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple

from otel_ebpf.symbolize.elfread import EM_X86_64, PF_X, PT_LOAD, SHT_NOBITS, ElfFile
from otel_ebpf.symbolize.unwind.records import (
    CFA_END,
    CFA_NONE,
    CFA_PLT,
    CFA_RBP,
    CFA_RSP,
    CFA_UNSUPPORTED,
    FDE_ROW,
    KIND_NAMES,
    RBP_SAME,
    RBP_UNKNOWN,
    Fde,
    Parser,
)

__all__ = ["CFA_END", "CFA_NONE", "CFA_PLT", "CFA_RBP", "CFA_RSP", "CFA_UNSUPPORTED",
           "KIND_NAMES", "RBP_SAME", "RBP_UNKNOWN", "ROW", "CfiError", "Row", "TooLarge",
           "UnwindTable", "bias", "compile_file", "decode_row"]

ROW = struct.Struct("<IHBb")


class Row(NamedTuple):
    pc: int
    kind: int
    cfa_offset: int  # bytes
    rbp: int  # RBP_SAME, RBP_UNKNOWN, or the bytes from the CFA where rbp was saved


@dataclass(frozen=True, slots=True)
class UnwindTable:
    """The rows of one file, sorted by pc, and the executable segments that map its file
    offsets to its virtual addresses."""

    rows: bytes
    segments: tuple[tuple[int, int, int], ...]  # (p_offset, p_vaddr, p_filesz)

    def __len__(self) -> int:
        return len(self.rows) // ROW.size

    def bias(self, map_start: int, map_offset: int) -> int | None:
        """address - bias = the file's virtual address, for a mapping of this file that
        starts at `map_start` with file offset `map_offset`; None if no segment holds it."""
        return bias(self.segments, map_start, map_offset)

    def row_for(self, vaddr: int) -> Row | None:
        """The row covering `vaddr` (what the BPF search finds), None before the first."""
        lo, hi = 0, len(self)
        while lo < hi:
            mid = (lo + hi) // 2
            if ROW.unpack_from(self.rows, mid * ROW.size)[0] <= vaddr:
                lo = mid + 1
            else:
                hi = mid
        if lo == 0:
            return None
        return decode_row(self.rows, lo - 1)


def bias(segments: tuple[tuple[int, int, int], ...], map_start: int, map_offset: int
         ) -> int | None:
    """UnwindTable.bias, from a table's segments alone."""
    for p_offset, p_vaddr, p_filesz in segments:
        if p_offset <= map_offset < p_offset + max(p_filesz, 1):
            return map_start - map_offset + p_offset - p_vaddr
    return None


def decode_row(rows: bytes, index: int) -> Row:
    pc, cfa8, kind, rbp8 = ROW.unpack_from(rows, index * ROW.size)
    rbp = rbp8 if rbp8 in (RBP_SAME, RBP_UNKNOWN) else rbp8 * 8
    return Row(pc, kind, cfa8 * 8, rbp)


# Rows per byte of CFI sections, a low estimate (measured: 0.16-0.23 on Debian 12's libc,
# python3.11, libcrypto, libLLVM, bash), to refuse a file that cannot fit before compiling
# it (LLVM's 5 MB of .eh_frame take 3 s).
_MIN_ROWS_PER_BYTE = 0.15


class CfiError(Exception):
    """The file is not a readable x86_64 ELF file."""


class TooLarge(Exception):
    """The file's table would take more rows than allowed: `rows` of them (at least)."""

    def __init__(self, rows: int, why: str) -> None:
        super().__init__(why)
        self.rows = rows


def compile_file(file: BinaryIO, max_rows: int = 1 << 32) -> UnwindTable | None:
    """The unwind rows of `file`; None when it has no call-frame information, or is Go
    code (which keeps frame pointers). TooLarge when it would exceed `max_rows`, judged
    from the size of its CFI before compiling it where that size says so already."""
    try:
        elf = ElfFile(file)
        if elf.machine != EM_X86_64 or elf.elfclass != 64:
            return None
        if elf.section(".gopclntab") is not None:
            return None
        segments = tuple((s.offset, s.vaddr, s.filesz) for s in elf.segments
                         if s.type == PT_LOAD and s.flags & PF_X)
        eh = elf.section(".eh_frame")
        debug = elf.section(".debug_frame")
        eh = eh if eh is not None and eh.type != SHT_NOBITS else None
        debug = debug if debug is not None and debug.type != SHT_NOBITS else None
        cfi_bytes = sum(s.size for s in (eh, debug) if s is not None)
        if cfi_bytes * _MIN_ROWS_PER_BYTE > max_rows:
            raise TooLarge(int(cfi_bytes * _MIN_ROWS_PER_BYTE), f"{cfi_bytes} bytes of CFI")
        fdes: list[Fde] = []
        if eh is not None:
            fdes += Parser(elf.data(eh), eh.addr, eh_frame=True).fdes()
        if debug is not None:
            covered = sorted((start, end) for start, end, _ in fdes)
            starts = [c[0] for c in covered]
            for start, end, rows in Parser(elf.data(debug), 0, eh_frame=False).fdes():
                i = bisect_right(starts, start) - 1
                if i < 0 or start >= covered[i][1]:  # .eh_frame's rows win where both are
                    fdes.append((start, end, rows))
    except (struct.error, OSError, ValueError, IndexError) as exc:
        raise CfiError(str(exc) or type(exc).__name__) from exc
    if not fdes:
        return None
    table = UnwindTable(_pack(fdes), segments)
    if len(table) > max_rows:
        raise TooLarge(len(table), f"{len(table)} rows")
    return table


def _pack(fdes: list[Fde]) -> bytes:
    """Rows of every FDE, sorted; a no-information row where an FDE ends and no other
    starts; a row equal to the one before it dropped."""
    fdes.sort(key=lambda f: f[0])
    out = bytearray()
    last: tuple[int, int, int] | None = None
    last_pc = -1
    for n, (start, end, rows) in enumerate(fdes):
        if start <= last_pc:  # overlapping FDEs (broken or duplicate): keep the first
            continue
        for pc, kind, cfa8, rbp8 in FDE_ROW.iter_unpack(rows):
            if pc >= end or pc > 0xFFFFFFFF:
                break
            rule = (kind, cfa8, rbp8)
            if rule != last:
                if pc == last_pc and out:
                    del out[-ROW.size:]  # superseded at the same pc
                out += ROW.pack(pc, cfa8, kind, rbp8)
                last, last_pc = rule, pc
        following = fdes[n + 1][0] if n + 1 < len(fdes) else None
        if following != end and end <= 0xFFFFFFFF and last != (CFA_NONE, 0, 0):
            out += ROW.pack(end, 0, CFA_NONE, 0)
            last, last_pc = (CFA_NONE, 0, 0), end
    return bytes(out)
