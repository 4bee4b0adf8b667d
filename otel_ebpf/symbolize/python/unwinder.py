"""User space's half of probes/python_stack.h: tells the kernel which processes are
Python (py_procs, py_layouts), reads back the interned Python stacks (py_stacks), names
their code objects and merges them into the native stacks.

Naming: a live process's code objects are read from its memory (qualified name, file and
the line of the instruction, from the line table); a process gone by the collection, or a
code object freed since (its address now another's: the kernel's stamp tells), is named
from what the kernel copied when it first saw each code object (py_codes: name, file,
first line; the line is then unknown, 0).

Merging: each eval-loop C frame (_PyEval_EvalFrameDefault) of the native stack is
replaced by the Python frames it ran: 3.8-3.10 one frame per call, 3.11+ the frames up to
the next entry frame. Python frames the native stack did not reach (an interpreter built
without frame pointers truncates the native walk) go beneath the native frames, so every
stack still reaches the module's top level.
"""

from __future__ import annotations

import ctypes as ct
import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from otel_ebpf.kernel.maps import BpfMap, DrainAged
from otel_ebpf.symbolize.frames import CPYTHON, Frame
from otel_ebpf.symbolize.python.code import (
    CodeInfo,
    LineRanges,
    ProcessMemory,
    instr_offset,
    line_ranges,
    read_code,
)
from otel_ebpf.symbolize.python.layouts import Layout
from otel_ebpf.symbolize.python.process import Detector, PythonProcess
from otel_ebpf.symbolize.python.walk import PyFrame

log = logging.getLogger(__name__)

EVAL_FUNCTIONS = frozenset({"_PyEval_EvalFrameDefault"})
MAX_LAYOUTS = 16  # py_layouts entries
CODE_CACHE = 16384  # named code objects kept (per process and code address)
MAX_PROCESSES = 4096  # Python processes known (py_procs holds as many)


class PythonUnwinder:
    """Not thread-safe: the caller serializes (the probe's symbols lock)."""

    def __init__(self, procs: BpfMap, layouts: BpfMap, codes: BpfMap, stacks: BpfMap,
                 retain_drains: int) -> None:
        self._procs_map, self._layouts_map, self._codes_map = procs, layouts, codes
        self._stacks_map = stacks
        self._stack_ages = DrainAged(stacks, stacks.max_entries, retain_drains)
        self._detector = Detector()
        self._layout_ids: dict[Layout, int] = {}
        self._procs: dict[int, PythonProcess] = {}
        self._memories: OrderedDict[int, ProcessMemory | None] = OrderedDict()
        # (pid, its generation here, code address): a reused pid starts a new generation
        self._codes: OrderedDict[tuple[int, int, int], tuple[CodeInfo, LineRanges]] = \
            OrderedDict()
        self._generations: dict[int, int] = {}
        self._generation = 0
        self._stacks: dict[int, tuple[PyFrame, ...]] = {}
        # stack id -> its frames named (ids include the process): the common case, a
        # stack seen again, costs one lookup instead of a line-table walk per frame
        self._named: dict[int, list[tuple[Frame, bool]]] = {}

    # -- processes --------------------------------------------------------------------------

    def on_new_process(self, pid: int) -> PythonProcess | None:
        """Recognise a (new) process as Python and tell the kernel; None if it is not."""
        proc = self._detector.detect(pid)
        if proc is None:
            if self._procs.pop(pid, None) is not None:  # a reused pid
                self._procs_map.delete(ct.c_uint32(pid))
            return None
        layout_id = self._layout_ids.get(proc.layout)
        if layout_id is None:
            if len(self._layout_ids) >= MAX_LAYOUTS:
                log.warning("cpu_profile: more than %d CPython layouts in use; process %d "
                            "keeps only native frames", MAX_LAYOUTS, pid)
                return None
            layout_id = self._layout_ids[proc.layout] = len(self._layout_ids)
            self._layouts_map.set(ct.c_uint32(layout_id),
                                  proc.layout.bpf_value(self._layouts_map.value_type))
        value = self._procs_map.value_type()
        value.runtime, value.layout = proc.runtime, layout_id
        self._procs_map.set(ct.c_uint32(pid), value)
        self._procs.pop(pid, None)
        self._procs[pid] = proc
        self._generation += 1
        self._generations[pid] = self._generation
        while len(self._procs) > MAX_PROCESSES:
            old = next(iter(self._procs))
            self.forget(old)
        self._drop_memory(pid)
        return proc

    def _memory(self, pid: int) -> ProcessMemory | None:
        if pid in self._memories:
            self._memories.move_to_end(pid)
            return self._memories[pid]
        try:
            mem: ProcessMemory | None = ProcessMemory(pid)
        except OSError:
            mem = None
        self._memories[pid] = mem
        while len(self._memories) > 64:
            _, old = self._memories.popitem(last=False)
            if old is not None:
                old.close()
        return mem

    def _drop_memory(self, pid: int) -> None:
        mem = self._memories.pop(pid, None)
        if mem is not None:
            mem.close()

    # -- stacks -----------------------------------------------------------------------------

    def stack(self, stack_id: int) -> tuple[PyFrame, ...] | None:
        """The Python frames (leaf first) of an interned stack; None if the kernel no
        longer has it."""
        self._stack_ages.use(stack_id)
        known = self._stacks.get(stack_id)
        if known is None:
            value = self._stacks_map.get(ct.c_uint64(stack_id))
            if value is None:
                return None
            depth = min(int(value.depth), len(value.code))
            known = tuple(PyFrame(int(value.code[i]), int(value.instr[i]),
                                  bool(value.entries >> i & 1)) for i in range(depth))
            if len(self._stacks) >= self._stacks_map.max_entries:
                self._stacks.pop(next(iter(self._stacks)))
            self._stacks[stack_id] = known
        return known

    def end_drain(self) -> None:
        """Delete the kernel's copies of the stacks no sample used lately."""
        for stack_id in self._stack_ages.age():
            self._named.pop(stack_id, None)

    def named(self, pid: int, stack_id: int) -> list[tuple[Frame, bool]]:
        """The Python frames of an interned stack, named, with their entry flags."""
        known = self._named.get(stack_id)
        if known is not None:
            self._stack_ages.use(stack_id)
            return known
        stack = self.stack(stack_id)
        if not stack:
            return []
        named = self.frames(pid, stack)
        # kept once every frame has its name and line (a line of 0 may come later: the
        # process's memory was not readable this time)
        if all(f.function and f.line for f, _ in named):
            if len(self._named) >= self._stacks_map.max_entries:
                self._named.pop(next(iter(self._named)))
            self._named[stack_id] = named
        return named

    def frames(self, pid: int, stack: Sequence[PyFrame]) -> list[tuple[Frame, bool]]:
        """Each Python frame named, with its entry flag."""
        proc = self._procs.get(pid)
        out = []
        for f in stack:
            found = self._code(pid, f.code, proc)
            if found is None:
                frame = Frame(0, None, CPYTHON, None, 0)
            else:
                info, ranges = found
                line = (ranges.line(instr_offset(f.instr, proc.layout))
                        if proc is not None and ranges is not None else 0)
                frame = Frame(0, info.name, CPYTHON, None, 0, info.filename, line,
                              info.firstlineno)
            out.append((frame, f.entry))
        return out

    def _code(self, pid: int, code: int, proc: PythonProcess | None
              ) -> tuple[CodeInfo, LineRanges | None] | None:
        key = (pid, self._generations.get(pid, 0), code)
        known = self._codes.get(key)
        if known is not None:
            return known
        info: CodeInfo | None = None
        mem = self._memory(pid) if proc is not None else None
        if mem is not None and proc is not None:
            try:
                info = read_code(mem, code, proc.layout)
            except (OSError, ValueError):
                info = None
        if info is None:
            info = self._kernel_copy(pid, code)
            # not cached: the live process may be readable at the next collection
            return (info, None) if info is not None else None
        assert proc is not None
        known = self._codes[key] = (info, line_ranges(info, proc.layout.version))
        while len(self._codes) > CODE_CACHE:
            self._codes.popitem(last=False)
        return known

    def _kernel_copy(self, pid: int, code: int) -> CodeInfo | None:
        key = self._codes_map.key_type()
        key.tgid, key.code = pid, code
        value: Any = self._codes_map.get(key)
        if value is None or not value.flags & 1:
            return None
        name = bytes(value.name).split(b"\0", 1)[0].decode(errors="replace")
        file = (bytes(value.file).split(b"\0", 1)[0].decode(errors="replace")
                if value.flags & 2 else "")
        return CodeInfo(name, file, int(value.firstlineno), b"")

    def forget(self, pid: int) -> None:
        self._procs.pop(pid, None)
        self._generations.pop(pid, None)
        self._drop_memory(pid)

    def close(self) -> None:
        for mem in self._memories.values():
            if mem is not None:
                mem.close()
        self._memories.clear()


def merge(native: Sequence[Frame], python: Sequence[tuple[Frame, bool]]) -> tuple[Frame, ...]:
    """The native frames (leaf first) with each eval-loop frame replaced by the Python
    frames it ran; the Python frames left over go beneath (toward the root)."""
    groups: list[list[Frame]] = [[]]
    for frame, entry in python:
        groups[-1].append(frame)
        if entry:
            groups.append([])
    if not groups[-1]:
        groups.pop()
    out: list[Frame] = []
    g = 0
    for frame in native:
        if frame.function in EVAL_FUNCTIONS and g < len(groups):
            out.extend(groups[g])
            g += 1
        else:
            out.append(frame)
    for rest in groups[g:]:
        out.extend(rest)
    return tuple(out)
