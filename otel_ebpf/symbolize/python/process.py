"""Is a process CPython, which version, and where is its _PyRuntime.

A process is Python when one of its executable mappings is an ELF file exporting
`_PyRuntime` (the interpreter's executable, or a libpython, whatever either is called).
The version comes from `Py_Version` (3.11+) or else the file's name (`python3.9`,
`libpython3.9.so.1.0`); 3.13+ layouts are read from the file's own `_Py_DebugOffsets`.
Each file is examined once (cached by identity), so a node running many processes of
the same binaries pays one ELF read per file.
"""

from __future__ import annotations

import os
import re
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import BinaryIO

from otel_ebpf.symbolize import procfs
from otel_ebpf.symbolize.elf import open_mapped
from otel_ebpf.symbolize.elfread import PT_LOAD, ElfFile, symbol_value
from otel_ebpf.symbolize.procfs import FileKey
from otel_ebpf.symbolize.python.layouts import (
    DEBUG_OFFSETS_SIZE,
    Layout,
    from_debug_offsets,
    layout_for,
)

_VERSION_IN_NAME = re.compile(r"python(\d)\.(\d+)")
_PAGE = 4096


@dataclass(frozen=True, slots=True)
class Interpreter:
    """What one ELF file says about the CPython in it (None: not CPython)."""

    runtime_vaddr: int  # _PyRuntime in the file's virtual addresses
    first_vaddr: int  # the first PT_LOAD's p_vaddr - p_offset, page aligned
    layout: Layout


@dataclass(frozen=True, slots=True)
class PythonProcess:
    pid: int
    runtime: int  # address of _PyRuntime in the process
    layout: Layout
    path: str  # the file holding the interpreter


def _file_read(elf: ElfFile, file: BinaryIO, vaddr: int, size: int) -> bytes | None:
    for seg in elf.segments:
        if seg.type == PT_LOAD and seg.vaddr <= vaddr and vaddr + size <= seg.vaddr + seg.filesz:
            file.seek(vaddr - seg.vaddr + seg.offset)
            return file.read(size)
    return None


def examine(file: BinaryIO, path: str) -> Interpreter | None:
    """The CPython interpreter in this ELF file, or None (not one, or a version this
    unwinder has no layout for)."""
    try:
        elf = ElfFile(file)
        runtime = symbol_value(elf, "_PyRuntime")
        if runtime is None:
            return None
        version: tuple[int, int] | None = None
        at = symbol_value(elf, "Py_Version")
        raw = _file_read(elf, file, at, 4) if at is not None else None
        if raw is not None:
            hex_version = struct.unpack("<I", raw)[0]
            version = (hex_version >> 24 & 0xFF, hex_version >> 16 & 0xFF)
        else:
            found = _VERSION_IN_NAME.search(os.path.basename(path))
            version = (int(found.group(1)), int(found.group(2))) if found else None
        if version is None:
            return None
        layout: Layout | None
        if version >= (3, 13):
            data = _file_read(elf, file, runtime, DEBUG_OFFSETS_SIZE)
            layout = from_debug_offsets(data) if data is not None else None
        else:
            layout = layout_for(version)
        if layout is None:
            return None
        loads = [s for s in elf.segments if s.type == PT_LOAD]
        if not loads:
            return None
        first = min(loads, key=lambda s: s.offset)
        return Interpreter(runtime, (first.vaddr - first.offset) & ~(_PAGE - 1), layout)
    except (struct.error, OSError, ValueError):
        return None


class Detector:
    """Python processes among the processes it is shown; each file examined once, and
    opened once: a process of known files costs a read of its maps and a stat per file,
    no open (as the unwinder's KernelUnwindTables._seen)."""

    def __init__(self, max_files: int = 1024) -> None:
        self._files: OrderedDict[FileKey, Interpreter | None] = OrderedDict()
        self._max = max_files

    def detect(self, pid: int) -> PythonProcess | None:
        try:
            text = procfs.read(f"/proc/{pid}/maps")
        except OSError:
            return None
        # per mapped file: its lowest-offset mapping, and whether any of it is executable
        files: dict[tuple[int, int], tuple[int, int, int, str, bool]] = {}
        for line in text.splitlines():
            f = line.split(maxsplit=5)
            if len(f) < 6 or not f[5].startswith("/"):
                continue
            start, end = (int(x, 16) for x in f[0].split("-"))
            offset, inode = int(f[2], 16), int(f[4])
            major, minor = (int(x, 16) for x in f[3].split(":"))
            dev = os.makedev(major, minor)
            known = files.get((dev, inode))
            executable = "x" in f[1] or (known is not None and known[4])
            if known is None or offset < known[2]:
                files[(dev, inode)] = (start, end, offset, f[5], executable)
            elif executable != known[4]:
                files[(dev, inode)] = (*known[:4], executable)
        # the likely files first: most processes map no Python at all
        ordered = sorted(files.items(), key=lambda kv: "python" not in kv[1][3])
        for (dev, inode), (start, end, offset, path, executable) in ordered:
            if not executable:
                continue
            interp = self._examine(pid, start, end, path.removesuffix(" (deleted)"), dev,
                                   inode)
            if interp is not None:
                bias = start - offset - interp.first_vaddr
                return PythonProcess(pid, interp.runtime_vaddr + bias, interp.layout, path)
        return None

    def _examine(self, pid: int, start: int, end: int, path: str, dev: int, inode: int
                 ) -> Interpreter | None:
        seen = procfs.mapped_file_key(pid, path, inode)
        if seen is not None and seen in self._files:
            self._files.move_to_end(seen)
            return self._files[seen]
        file = open_mapped(pid, start, end, path, dev, inode)
        if file is None:
            return None
        with file:
            key = procfs.file_key(os.fstat(file.fileno()))
            if key in self._files:
                self._files.move_to_end(key)
                return self._files[key]
            interp = self._files[key] = examine(file, path)
        while len(self._files) > self._max:
            self._files.popitem(last=False)
        return interp
