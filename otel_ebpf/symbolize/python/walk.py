"""The walk probes/python_stack.h does, done from user space on a live process's memory:
thread states and their frames (code object, instruction, entry flag), leaf first.

It checks a layout against a running interpreter without BPF (tests/unit run it on every
CPython installed here), and it is the reference the BPF walk follows.
"""

from __future__ import annotations

from typing import NamedTuple

from otel_ebpf.symbolize.python.code import ProcessMemory
from otel_ebpf.symbolize.python.layouts import INSTR_POINTER, NONE, Layout
from otel_ebpf.symbolize.python.process import PythonProcess

MAX_THREADS = 32  # PY_MAX_THREADS
MAX_FRAMES = 64  # PY_MAX_FRAMES
OWNED_BY_CSTACK = 3


class PyFrame(NamedTuple):
    code: int
    instr: int
    entry: bool


def thread_states(mem: ProcessMemory, proc: PythonProcess) -> list[tuple[int, int, int]]:
    """(thread state, thread_id, native_thread_id or 0) of the main interpreter's threads."""
    layout = proc.layout
    interp = mem.u64(proc.runtime + layout.runtime_interpreters_head)
    ts = mem.u64(interp + layout.interp_tstate_head) if interp else 0
    out: list[tuple[int, int, int]] = []
    while ts and len(out) < MAX_THREADS:
        native = (mem.u64(ts + layout.tstate_native_thread_id)
                  if layout.tstate_native_thread_id != NONE else 0)
        out.append((ts, mem.u64(ts + layout.tstate_thread_id), native))
        ts = mem.u64(ts + layout.tstate_next)
    return out


def frames(mem: ProcessMemory, layout: Layout, tstate: int) -> list[PyFrame]:
    if layout.tstate_frame != NONE:
        frame = mem.u64(tstate + layout.tstate_frame)
    else:
        cframe = mem.u64(tstate + layout.tstate_cframe)
        frame = mem.u64(cframe + layout.cframe_current_frame) if cframe else 0
    out: list[PyFrame] = []
    for _ in range(2 * MAX_FRAMES):
        if not frame or len(out) >= MAX_FRAMES:
            break
        code = mem.u64(frame + layout.frame_code)
        previous = mem.u64(frame + layout.frame_previous)
        if layout.instr_kind == INSTR_POINTER:
            if mem.read(frame + layout.frame_owner, 1)[0] == OWNED_BY_CSTACK:
                if out:
                    out[-1] = out[-1]._replace(entry=True)
                frame = previous
                continue
            instr = mem.u64(frame + layout.frame_instr) - code - layout.code_adaptive
            instr = (instr + (1 << 31)) % (1 << 32) - (1 << 31)  # as the s32 BPF keeps
            entry = (layout.frame_is_entry != NONE
                     and mem.read(frame + layout.frame_is_entry, 1)[0] != 0)
        else:
            instr, entry = mem.i32(frame + layout.frame_instr), True
        out.append(PyFrame(code, instr, entry))
        frame = previous
    return out
