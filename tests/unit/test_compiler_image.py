"""What crosses from the compiler process to the agent: ctypes types as JSON, and
instructions whose map fds the agent patches with its own."""

from __future__ import annotations

import base64
import ctypes as ct
import json
import struct

from otel_ebpf.kernel.compiler import Image
from otel_ebpf.kernel.ctypes_json import build, describe
from otel_ebpf.kernel.loader import relocations


class Inner(ct.Union):
    _fields_ = [("v4", ct.c_uint32), ("v6", ct.c_ubyte * 16)]


class Key(ct.Structure):
    _pack_ = 1
    _anonymous_ = ("addr",)
    _fields_ = [("tgid", ct.c_uint32), ("flags", ct.c_uint32, 3), ("addr", Inner),
                ("comm", ct.c_char * 16), ("ips", ct.c_uint64 * 4)]


def test_a_type_survives_json_with_its_layout() -> None:
    rebuilt = build(json.loads(json.dumps(describe(Key))))
    assert ct.sizeof(rebuilt) == ct.sizeof(Key)
    assert [f[0] for f in rebuilt._fields_] == [f[0] for f in Key._fields_]
    for name in ("tgid", "flags", "addr", "comm", "ips"):
        assert getattr(rebuilt, name).offset == getattr(Key, name).offset
    key = Key(tgid=7, flags=5, comm=b"redis")
    key.v4 = 0x0100007F
    copy = rebuilt.from_buffer_copy(bytes(key))
    assert (copy.tgid, copy.flags, copy.v4, copy.comm) == (7, 5, 0x0100007F, b"redis")
    assert ct.sizeof(build(describe(ct.c_uint64))) == 8


def _insn(code: int, regs: int, imm: int) -> bytes:
    return struct.pack("=BBhi", code, regs, 0, imm)


def test_map_fds_are_found_and_replaced_by_the_agents() -> None:
    # r1 = map fd 5 (ld_imm64, src 1: two slots), call 1, r1 = value of map fd 9 (src 2),
    # r2 = 5 as a plain 64-bit constant (src 0: not a map), exit
    insns = b"".join([
        _insn(0x18, 0x11, 5), _insn(0, 0, 0), _insn(0x85, 0, 1),
        _insn(0x18, 0x21, 9), _insn(0, 0, 16),
        _insn(0x18, 0x02, 5), _insn(0, 0, 0), _insn(0x95, 0, 0)])
    relocs = relocations(insns, {5: 0, 9: 1})
    assert relocs == [[0, 0], [3, 1]]
    image = Image.from_json({"license": "GPL", "maps": [], "functions": {
        "fn": {"insns": base64.b64encode(insns).decode(), "relocations": relocs}}})
    patched = image.instructions("fn", [40, 41])
    imms = [struct.unpack_from("=i", patched, i * 8 + 4)[0] for i in range(8)]
    assert imms == [40, 0, 1, 41, 16, 5, 0, 0]
