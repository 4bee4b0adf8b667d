"""One in-kernel unwinder for every program that walks user stacks with it.

What probes/user_stack.h's three maps hold (each file's rows, each process's mappings)
does not depend on which program walks a stack: the CPU profiler, the off-CPU profiler
and syscall_latency's slow-call stacks share one set, made here. Each program is compiled
with placeholder maps of one entry (COMPILE_FLAGS: the compiler never allocates 8 MiB of
rows per program) and adopts these before its functions are loaded; one UnwindLoader, fed
by all of their new processes and drains, fills them. A process loaded for one probe is
unwound whole by the others.

The maps live while a program uses them: the last program to leave closes them (a
reload that restarts every stack probe starts with empty tables, filled again from the
disk cache).
"""

from __future__ import annotations

import ctypes as ct
import os
import threading
from dataclasses import dataclass

from otel_ebpf.kernel import bpfsys
from otel_ebpf.kernel.engine import EngineError, Program
from otel_ebpf.kernel.maps import BpfMap
from otel_ebpf.symbolize.unwind import cfi
from otel_ebpf.symbolize.unwind import disk as unwind_disk
from otel_ebpf.symbolize.unwind.loader import UnwindLoader
from otel_ebpf.symbolize.unwind.tables import (
    _MAPPING,
    _PROC_HEAD,
    _TABLE,
    MAX_MAPPINGS,
    KernelUnwindTables,
)

DEFAULT_ROWS = 1 << 20  # 8 MiB: the tables of ~30 large binaries (libc, python, libcrypto)
DEFAULT_PROCESSES = 4096
TABLES = 1024  # files with rows in the kernel at once (UNWIND_TABLES)
# enum unwind_reason of probes/user_stack.h (from UNWIND_OK + 1), as each unwinding
# program counts it in its probe_stats from UNWIND_STAT_FIRST: user stacks kept but cut short
UNWIND_LOST = ("unwind_not_ready", "unwind_unsupported", "unwind_read_failed",
               "unwind_truncated", "unwind_bad_frame")
# the sizes every unwinding program is compiled with: its own maps are replaced
COMPILE_FLAGS = ("-DUNWIND_ROWS=1", "-DUNWIND_TABLES=1", "-DUNWIND_PROCS=1")

_ARRAY, _HASH = 2, 1
_MMAPABLE, _NO_PREALLOC = 0x400, 0x1


@dataclass(frozen=True)
class _Shape:
    name: str
    map_type: int
    value_size: int
    flags: int


# user_stack.h's declarations (key: a u32 row, table or tgid)
_SHAPES = (
    _Shape("unwind_rows", _ARRAY, cfi.ROW.size, _MMAPABLE),
    _Shape("unwind_tables", _ARRAY, _TABLE.size, 0),
    _Shape("unwind_procs", _HASH, _PROC_HEAD.size + MAX_MAPPINGS * _MAPPING.size,
           _NO_PREALLOC),
)


def _value(size: int) -> type[ct.Structure]:
    return type(f"UnwindValue{size}", (ct.Structure,), {"_fields_": [("b", ct.c_ubyte * size)]})


def create_maps(rows: int, processes: int) -> tuple[BpfMap, BpfMap, BpfMap]:
    """The three maps as user_stack.h declares them, at these sizes; the caller closes
    their fds."""
    fds: list[int] = []
    try:
        for shape, entries in zip(_SHAPES, (rows, TABLES, processes), strict=True):
            fds.append(bpfsys.map_create({
                "type": shape.map_type, "key_size": 4, "value_size": shape.value_size,
                "max_entries": entries, "flags": shape.flags, "btf_id": 0,
                "btf_key_type_id": 0, "btf_value_type_id": 0,
                "btf_vmlinux_value_type_id": 0, "map_extra": 0}, shape.name, -1))
    except OSError:
        for fd in fds:
            os.close(fd)
        raise
    made = [BpfMap(fd, ct.c_uint32, _value(shape.value_size))
            for fd, shape in zip(fds, _SHAPES, strict=True)]
    return made[0], made[1], made[2]


class SharedUnwinder:
    """The unwind maps and their loader, shared by the programs that join."""

    def __init__(self, rows: int = DEFAULT_ROWS, processes: int = DEFAULT_PROCESSES) -> None:
        self.rows, self.processes = rows, processes
        self._lock = threading.Lock()
        self._maps: tuple[BpfMap, BpfMap, BpfMap] | None = None
        self._loader: UnwindLoader | None = None
        self._members: list[Program] = []  # the programs using the maps, first joined first

    @property
    def loader(self) -> UnwindLoader | None:
        """The loader, while a program uses the maps."""
        return self._loader

    def join(self, program: Program) -> UnwindLoader:
        """Make `program` walk stacks with the shared maps (before it loads a function);
        the loader to announce its new processes and drains to."""
        with self._lock:
            if self._maps is None:
                try:
                    self._maps = create_maps(self.rows, self.processes)
                except OSError as exc:
                    raise EngineError(
                        f"{program.name}: cannot create the unwind tables ({self.rows} rows "
                        f"of 8 bytes, {self.processes} processes): {exc}. Lower "
                        "probes.cpu_profile.unwind_table_rows") from exc
                self._loader = UnwindLoader(KernelUnwindTables(
                    *self._maps, unwind_disk.default()))
            assert self._loader is not None
            try:
                for shape, shared in zip(_SHAPES, self._maps, strict=True):
                    program.adopt_map(shape.name, shared.fd)
            except EngineError:
                if not self._members:
                    self._close()
                raise
            self._members.append(program)
            return self._loader

    def fill(self, program: Program) -> dict[str, tuple[int, int]]:
        """The maps' fill (used, size) for `program`'s probe to report, when it is the
        first member (one probe reports them); else nothing."""
        with self._lock:
            if not self._members or self._members[0] is not program or not self._loader:
                return {}
            tables = self._loader.tables
        return {"unwind_rows": (tables.rows_used, self.rows),
                "unwind_processes": (tables.processes, self.processes)}

    def leave(self, program: Program) -> None:
        """`program` stops; the last to leave closes the loader and the maps."""
        with self._lock:
            if program in self._members:
                self._members.remove(program)
            if not self._members:
                self._close()

    def _close(self) -> None:
        """The loader and the maps, closed (the lock held)."""
        loader, maps = self._loader, self._maps
        self._loader, self._maps = None, None
        if loader is not None:
            loader.close()
        for m in maps or ():
            os.close(m.fd)
