"""bpf_loop callbacks in programs BCC compiled.

BCC 0.26 compiles a callback (any function not `static`, named loop_callback_*) as a
function of its own and drops the relocation of its address in the program that passes it
to bpf_loop, leaving a 64-bit load of 0 (`r2 = 0 ll`; clang never emits that for a constant,
whose 0 is a 32-bit move). The engine appends the callback to the program as a subprogram,
makes that load a BPF_PSEUDO_FUNC reference, and gives the kernel the BTF function
information it requires of a program with subprograms (two FUNCs, no line info).
"""

from __future__ import annotations

import ctypes as ct
import struct

from otel_ebpf.kernel import bpfsys

CALLBACK_PREFIX = "loop_callback_"
_LD_IMM64 = 0x18
_PSEUDO_FUNC = 4
_BTF_LOAD = 18
_BTF_MAGIC = 0xEB9F
_KIND_INT, _KIND_PTR, _KIND_FUNC, _KIND_FUNC_PROTO = 1, 2, 12, 13


def link_callback(insns: bytes, callback: bytes) -> bytes:
    """`insns` with `callback` appended and every dropped function address pointing at it;
    `insns` unchanged when it takes no function's address."""
    out = bytearray(insns)
    end = len(insns) // 8
    linked = False
    i = 0
    while i < end:
        code, regs, _off, imm = struct.unpack_from("=BBhi", out, i * 8)
        if code == _LD_IMM64:
            high = struct.unpack_from("=i", out, i * 8 + 12)[0]
            if regs >> 4 == 0 and imm == 0 and high == 0:
                # src_reg = BPF_PSEUDO_FUNC; imm = the callback's first instruction,
                # counted from the instruction after this one
                out[i * 8 + 1] = (regs & 0x0F) | (_PSEUDO_FUNC << 4)
                struct.pack_into("=i", out, i * 8 + 4, end - i - 1)
                linked = True
            i += 2
        else:
            i += 1
    return bytes(out + callback) if linked else bytes(insns)


def func_info_btf(names: list[str]) -> bytes:
    """A BTF blob with `int f(void *)` for each of `names` (static linkage), type ids 4.."""
    strings = bytearray(b"\0int\0ctx\0")
    offsets = []
    for name in names:
        offsets.append(len(strings))
        strings += name.encode() + b"\0"
    types = bytearray()
    types += struct.pack("=IIII", 1, _KIND_INT << 24, 4, (1 << 24) | 32)  # 1: int
    types += struct.pack("=III", 0, _KIND_PTR << 24, 0)  # 2: void *
    types += struct.pack("=IIIII", 0, _KIND_FUNC_PROTO << 24 | 1, 1, 5, 2)  # 3: int (void *ctx)
    for offset in offsets:
        types += struct.pack("=III", offset, _KIND_FUNC << 24, 3)
    header = struct.pack("=HBBIIIII", _BTF_MAGIC, 1, 0, 24, 0, len(types), len(types),
                         len(strings))
    return header + bytes(types) + bytes(strings)


def load_btf(blob: bytes) -> int:
    """The fd of `blob` loaded into the kernel (OSError with the kernel's log)."""
    data = ct.create_string_buffer(blob, len(blob))
    log = ct.create_string_buffer(1 << 16)
    attr = ct.create_string_buffer(128)
    struct.pack_into("=QQIII", attr, 0, ct.addressof(data), ct.addressof(log), len(blob),
                     len(log), 1)
    try:
        return bpfsys.bpf(_BTF_LOAD, attr)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, log.value.decode(errors="replace")) from None
