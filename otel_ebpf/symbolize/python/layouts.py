"""Where CPython keeps what the unwinder reads, per minor version (3.8 to 3.13).

3.8 to 3.12 publish nothing: their offsets are the table below, checked against the debug
info of real builds of each release (tests/fixtures/python/layouts-3.*.json, made by
tests/fixtures/python/derive_layouts.py) and by walking live interpreters
(tests/unit/test_python_layouts.py). 3.13 publishes them in _PyRuntime.debug_offsets
(`_Py_DebugOffsets`, starting with the cookie "xdebugpy"): `from_debug_offsets` reads that
structure, so a 3.13 build with another layout is still read right.
"""

from __future__ import annotations

import ctypes as ct
import struct
from dataclasses import asdict, dataclass, fields, replace

NONE = 0xFFFFFFFF  # a member this version does not have (PY_NONE in python_stack.h)
INSTR_LASTI = 0  # PyFrameObject.f_lasti (3.8, 3.9: bytes; 3.10: code units)
INSTR_POINTER = 1  # a pointer into co_code_adaptive (3.11+)


@dataclass(frozen=True, slots=True)
class Layout:
    """Member offsets (bytes) the unwinder reads; NONE where the version has no such
    member. The first fields are struct py_layout of probes/python_stack.h, in order."""

    runtime_interpreters_head: int
    interp_tstate_head: int
    tstate_next: int
    tstate_thread_id: int
    tstate_native_thread_id: int
    tstate_frame: int  # the current frame, directly (3.8-3.10, 3.13+)
    tstate_cframe: int  # else through cframe->current_frame (3.11, 3.12)
    cframe_current_frame: int
    frame_previous: int
    frame_code: int
    frame_instr: int
    frame_is_entry: int
    frame_owner: int
    code_adaptive: int
    code_qualname: int  # co_qualname, else co_name (3.8-3.10 have no qualname)
    code_filename: int
    code_firstlineno: int
    unicode_state: int
    unicode_ascii_size: int
    instr_kind: int
    # read by user space only
    code_name: int
    code_linetable: int  # co_lnotab (3.8, 3.9), co_linetable (3.10+)
    bytes_size: int
    bytes_data: int
    version: tuple[int, int]

    def bpf_value(self, value_type: type[ct.Structure]) -> ct.Structure:
        """The py_layouts entry of this layout, in the compiled program's type."""
        value = value_type()
        for member in value_type._fields_:
            setattr(value, member[0], getattr(self, member[0]))
        return value

    def as_fixture(self) -> dict[str, int]:
        """The members a fixture file from derive_layouts.py names, by its field names."""
        out = {k: v for k, v in asdict(self).items()
               if isinstance(v, int) and v != NONE and k not in ("instr_kind", "code_qualname")}
        if self.version >= (3, 11):
            out["code_qualname"] = self.code_qualname
        return out

    @property
    def compact_size(self) -> int:
        """sizeof(PyCompactUnicodeObject): where a non-ASCII compact string's data is."""
        return self.unicode_ascii_size + (24 if self.version < (3, 12) else 16)


def _older(version: tuple[int, int], frame_instr: int, **extra: int) -> Layout:
    # 3.8-3.10: PyFrameObject chain from tstate->frame
    base = dict(runtime_interpreters_head=32, interp_tstate_head=8, tstate_next=8,
                tstate_thread_id=176, tstate_native_thread_id=NONE, tstate_frame=24,
                tstate_cframe=NONE, cframe_current_frame=NONE, frame_previous=24,
                frame_code=32, frame_instr=frame_instr, frame_is_entry=NONE,
                frame_owner=NONE, code_adaptive=NONE, code_qualname=112, code_filename=104,
                code_firstlineno=40, unicode_state=32, unicode_ascii_size=48,
                instr_kind=INSTR_LASTI, code_name=112, code_linetable=120, bytes_size=16,
                bytes_data=32)
    base.update(extra)
    return Layout(version=version, **base)


LAYOUTS: dict[tuple[int, int], Layout] = {
    (3, 8): _older((3, 8), frame_instr=104),
    (3, 9): _older((3, 9), frame_instr=104),
    (3, 10): _older((3, 10), frame_instr=96),
    (3, 11): Layout(
        runtime_interpreters_head=40, interp_tstate_head=16, tstate_next=8,
        tstate_thread_id=152, tstate_native_thread_id=160, tstate_frame=NONE,
        tstate_cframe=56, cframe_current_frame=8, frame_previous=48, frame_code=32,
        frame_instr=56, frame_is_entry=68, frame_owner=69, code_adaptive=184,
        code_qualname=128, code_filename=112, code_firstlineno=72, unicode_state=32,
        unicode_ascii_size=48, instr_kind=INSTR_POINTER, code_name=120, code_linetable=136,
        bytes_size=16, bytes_data=32, version=(3, 11)),
    (3, 12): Layout(
        runtime_interpreters_head=40, interp_tstate_head=72, tstate_next=8,
        tstate_thread_id=136, tstate_native_thread_id=144, tstate_frame=NONE,
        tstate_cframe=56, cframe_current_frame=0, frame_previous=8, frame_code=0,
        frame_instr=56, frame_is_entry=NONE, frame_owner=70, code_adaptive=192,
        code_qualname=128, code_filename=112, code_firstlineno=68, unicode_state=32,
        unicode_ascii_size=40, instr_kind=INSTR_POINTER, code_name=120, code_linetable=136,
        bytes_size=16, bytes_data=32, version=(3, 12)),
    # 3.13: what 3.13.0's _Py_DebugOffsets says; a process's own are read when it has them
    (3, 13): Layout(
        runtime_interpreters_head=632, interp_tstate_head=7344, tstate_next=8,
        tstate_thread_id=152, tstate_native_thread_id=160, tstate_frame=72,
        tstate_cframe=NONE, cframe_current_frame=NONE, frame_previous=8, frame_code=0,
        frame_instr=56, frame_is_entry=NONE, frame_owner=70, code_adaptive=200,
        code_qualname=128, code_filename=112, code_firstlineno=68, unicode_state=32,
        unicode_ascii_size=40, instr_kind=INSTR_POINTER, code_name=120, code_linetable=136,
        bytes_size=16, bytes_data=32, version=(3, 13)),
}

DEBUG_COOKIE = b"xdebugpy"
# _Py_DebugOffsets of 3.13 (Include/internal/pycore_runtime.h): u64 members; the byte
# offset in it of each member the unwinder needs
_DEBUG_MEMBERS_3_13 = {
    "version": 8, "runtime_interpreters_head": 40, "interp_tstate_head": 72,
    "tstate_next": 168, "tstate_frame": 184, "tstate_thread_id": 192,
    "tstate_native_thread_id": 200, "frame_previous": 232, "frame_code": 240,
    "frame_instr": 248, "frame_owner": 264, "code_filename": 280, "code_name": 288,
    "code_qualname": 296, "code_linetable": 304, "code_firstlineno": 312,
    "code_adaptive": 344, "bytes_size": 520, "bytes_data": 528, "unicode_state": 544,
    "unicode_ascii_size": 560,
}
DEBUG_OFFSETS_SIZE = 584


def from_debug_offsets(data: bytes) -> Layout | None:
    """The layout that a 3.13 _Py_DebugOffsets (the first bytes of _PyRuntime) gives;
    None when `data` is not one of a release this reader knows."""
    if len(data) < DEBUG_OFFSETS_SIZE or not data.startswith(DEBUG_COOKIE):
        return None
    at = {name: struct.unpack_from("<Q", data, offset)[0]
          for name, offset in _DEBUG_MEMBERS_3_13.items()}
    version = (at["version"] >> 24 & 0xFF, at["version"] >> 16 & 0xFF)
    if version != (3, 13):
        return None  # 3.14 moved the structure: not read rather than misread
    known = LAYOUTS[(3, 13)]
    return replace(known, **{f.name: at[f.name] for f in fields(Layout) if f.name in at
                             and f.name != "version"})


def layout_for(version: tuple[int, int]) -> Layout | None:
    return LAYOUTS.get(version)
