"""Struct member offsets of the running kernel, read from its BTF (/sys/kernel/btf/vmlinux).

BCC compiles against whatever kernel headers it finds, and on many hosts those belong to
another kernel version: a struct layout taken from them can be wrong for the running kernel.
The kernel's own BTF describes the layouts it was built with, so probes that must read a
kernel struct resolve the member offsets here and pass them to the BPF program as -D flags.

A small pure-Python reader of the BTF format (include/uapi/linux/btf.h): one pass indexes
where each type record starts and the names of structs and unions; members are decoded
only for the types asked about. Anonymous unions and structs are searched through, as C
does: `tcp_skb_cb.tcp_gso_segs` sits in an anonymous struct inside an anonymous union.
"""

from __future__ import annotations

import struct
import threading
from array import array
from dataclasses import dataclass
from pathlib import Path

VMLINUX = Path("/sys/kernel/btf/vmlinux")

BTF_MAGIC = 0xEB9F

# BTF_KIND_* (include/uapi/linux/btf.h)
KIND_INT = 1
KIND_PTR = 2
KIND_ARRAY = 3
KIND_STRUCT = 4
KIND_UNION = 5
KIND_ENUM = 6
KIND_FWD = 7
KIND_TYPEDEF = 8
KIND_VOLATILE = 9
KIND_CONST = 10
KIND_RESTRICT = 11
KIND_FUNC = 12
KIND_FUNC_PROTO = 13
KIND_VAR = 14
KIND_DATASEC = 15
KIND_FLOAT = 16
KIND_DECL_TAG = 17
KIND_TYPE_TAG = 18
KIND_ENUM64 = 19

# Bytes that follow the 12-byte common header: (fixed, per vlen item). Every kind must be
# known, since record lengths are implicit: an unknown kind stops the walk.
_TRAILER: dict[int, tuple[int, int]] = {
    KIND_INT: (4, 0),
    KIND_PTR: (0, 0),
    KIND_ARRAY: (12, 0),
    KIND_STRUCT: (0, 12),
    KIND_UNION: (0, 12),
    KIND_ENUM: (0, 8),
    KIND_FWD: (0, 0),
    KIND_TYPEDEF: (0, 0),
    KIND_VOLATILE: (0, 0),
    KIND_CONST: (0, 0),
    KIND_RESTRICT: (0, 0),
    KIND_FUNC: (0, 0),
    KIND_FUNC_PROTO: (0, 8),
    KIND_VAR: (4, 0),
    KIND_DATASEC: (0, 12),
    KIND_FLOAT: (0, 0),
    KIND_DECL_TAG: (4, 0),
    KIND_TYPE_TAG: (0, 0),
    KIND_ENUM64: (0, 12),
}
# Kinds that only qualify or rename another type: looked through to find a layout.
_ALIASES = frozenset({KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG})
_COMPOSITES = frozenset({KIND_STRUCT, KIND_UNION})


class BtfError(Exception):
    """The BTF is unreadable, or does not have the struct or member asked for."""


@dataclass(frozen=True, slots=True)
class Member:
    """Where a member sits in its outermost struct. `offset` is in bytes; a bitfield
    (bitfield_size > 0) starts `bit_offset` bits into the struct and has no byte offset."""

    path: str
    offset: int
    size: int
    bit_offset: int
    bitfield_size: int = 0


@dataclass(frozen=True, slots=True)
class _Type:
    kind: int
    name_off: int
    vlen: int
    kind_flag: bool
    size_or_type: int
    pos: int  # where the kind-specific trailer starts


class Btf:
    """One parsed BTF blob (vmlinux's, or any standalone one)."""

    def __init__(self, data: bytes) -> None:
        if len(data) < 24:
            raise BtfError("BTF blob too short for a header")
        magic = struct.unpack_from("<H", data, 0)[0]
        if magic == BTF_MAGIC:
            self._end = "<"
        elif magic == 0x9FEB:
            self._end = ">"
        else:
            raise BtfError(f"not BTF: magic {magic:#06x}")
        hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
            self._end + "5I", data, 4)
        self._data = data
        self._types_start = hdr_len + type_off
        self._types_end = self._types_start + type_len
        self._str_start = hdr_len + str_off
        self._str_end = self._str_start + str_len
        if self._types_end > len(data) or self._str_end > len(data):
            raise BtfError("BTF section bounds run past the end of the blob")
        # where each type's record starts, by type id (id 0, void, has none): decoded on
        # demand, so the index is 4 bytes a type rather than an object each
        self._pos = array("I", [0])
        self._by_name: dict[str, list[int]] = {}
        self._ints: list[int] = []  # ids of the INT types, where `long int` is
        self._pointer_size: int | None = None
        self._index()

    @classmethod
    def load(cls, path: Path = VMLINUX) -> Btf:
        try:
            return cls(path.read_bytes())
        except OSError as exc:
            raise BtfError(f"cannot read BTF from {path}: {exc.strerror}. The kernel needs "
                           "CONFIG_DEBUG_INFO_BTF=y") from exc

    def _index(self) -> None:
        unpack = struct.Struct(self._end + "3I").unpack_from
        data, pos, end = self._data, self._types_start, self._types_end
        positions = self._pos
        while pos < end:
            name_off, info, _ = unpack(data, pos)
            kind = (info >> 24) & 0x1F
            trailer = _TRAILER.get(kind)
            if trailer is None:
                raise BtfError(f"unknown BTF kind {kind} at type {len(positions)}; "
                               "this reader predates the kernel's BTF")
            if kind in _COMPOSITES and name_off:
                self._by_name.setdefault(self._str(name_off), []).append(len(positions))
            elif kind == KIND_INT:
                self._ints.append(len(positions))
            positions.append(pos)
            pos += 12 + trailer[0] + trailer[1] * (info & 0xFFFF)

    def _str(self, off: int) -> str:
        start = self._str_start + off
        end = self._data.index(b"\0", start, self._str_end)
        return self._data[start:end].decode()

    def _type(self, type_id: int) -> _Type:
        if not 0 < type_id < len(self._pos):
            raise BtfError(f"type id {type_id} out of range")
        pos = self._pos[type_id]
        name_off, info, size_or_type = struct.unpack_from(self._end + "3I", self._data, pos)
        return _Type((info >> 24) & 0x1F, name_off, info & 0xFFFF, bool(info >> 31),
                     size_or_type, pos + 12)

    def _resolve(self, type_id: int) -> tuple[int, _Type | None]:
        """Look through typedefs and qualifiers (bounded: BTF may not loop, but a corrupt
        blob could)."""
        for _ in range(64):
            if type_id == 0:
                return 0, None
            t = self._type(type_id)
            if t.kind not in _ALIASES:
                return type_id, t
            type_id = t.size_or_type
        raise BtfError("typedef chain too long")

    def _members(self, t: _Type) -> list[tuple[str, int, int, int]]:
        """(name, type id, bit offset, bitfield size) of a struct or union."""
        out = []
        for i in range(t.vlen):
            name_off, type_id, offset = struct.unpack_from(self._end + "3I", self._data,
                                                           t.pos + 12 * i)
            if t.kind_flag:
                bits, bitfield = offset & 0xFFFFFF, offset >> 24
            else:
                bits, bitfield = offset, 0
            out.append((self._str(name_off) if name_off else "", type_id, bits, bitfield))
        return out

    def type_size(self, type_id: int) -> int:
        _, t = self._resolve(type_id)
        if t is None:
            raise BtfError("void has no size")
        if t.kind in (KIND_INT, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64, KIND_FLOAT):
            return t.size_or_type
        if t.kind == KIND_PTR:
            return self.pointer_size
        if t.kind == KIND_ARRAY:
            elem, _index, nelems = struct.unpack_from(self._end + "3I", self._data, t.pos)
            return int(nelems) * self.type_size(elem)
        raise BtfError(f"BTF kind {t.kind} has no size")

    @property
    def pointer_size(self) -> int:
        # BTF does not record it; the kernel's `long` is pointer-sized on every Linux ABI.
        if self._pointer_size is None:
            self._pointer_size = next(
                (t.size_or_type for t in map(self._type, self._ints)
                 if self._str(t.name_off) == "long int"), 8)
        return self._pointer_size

    def struct_ids(self, name: str) -> list[int]:
        """The type ids of the structs or unions called `name` (complete definitions only:
        forward declarations are another kind). Usually one; deduplication keeps several
        when compilation units disagreed on a layout."""
        ids = self._by_name.get(name)
        if not ids:
            raise BtfError(f"no struct or union named {name!r} in the kernel's BTF")
        return ids

    def struct_size(self, name: str) -> int:
        sizes = {self._type(i).size_or_type for i in self.struct_ids(name)}
        if len(sizes) > 1:
            raise BtfError(f"struct {name} has several layouts in the kernel's BTF")
        return sizes.pop()

    def member(self, struct_name: str, path: str) -> Member:
        """The member at a dotted path (e.g. "cb", "__sk_common.skc_family") of a struct,
        each step searched through anonymous unions and structs. Raises BtfError when
        the struct is missing, has no such member, or has several layouts that disagree
        on it."""
        found: set[Member] = set()
        errors: list[BtfError] = []
        for type_id in self.struct_ids(struct_name):
            try:
                found.add(self._member_in(type_id, struct_name, path))
            except BtfError as exc:
                errors.append(exc)
        if not found:
            raise errors[0]
        if len(found) > 1:
            raise BtfError(f"{struct_name}.{path} is at different offsets in different "
                           f"definitions of struct {struct_name}: {sorted(found, key=str)}")
        return found.pop()

    def _member_in(self, type_id: int, struct_name: str, path: str) -> Member:
        bits = 0
        parts = path.split(".")
        found: tuple[int, int, int] | None = None
        for i, part in enumerate(parts):
            _, t = self._resolve(type_id)
            if t is None or t.kind not in _COMPOSITES:
                raise BtfError(f"{struct_name}.{'.'.join(parts[:i])} is not a struct or union")
            found = self._find(t, part, 0)
            if found is None:
                raise BtfError(f"struct {struct_name} has no member {'.'.join(parts[:i + 1])!r}"
                               " in the running kernel's BTF")
            type_id, rel_bits, bitfield = found
            if bitfield and i < len(parts) - 1:
                raise BtfError(f"{struct_name}.{part} is a bitfield")
            bits += rel_bits
        assert found is not None
        bitfield = found[2]
        size = (bitfield + 7) // 8 if bitfield else self.type_size(type_id)
        return Member(path, -1 if bitfield else bits // 8, size, bits, bitfield)

    def _find(self, t: _Type, name: str, depth: int) -> tuple[int, int, int] | None:
        """(type id, bit offset, bitfield size) of member `name`, looking into anonymous
        members depth-first in declaration order, as the compiler does."""
        if depth > 16:
            raise BtfError("anonymous members nested too deep")
        for member_name, type_id, bits, bitfield in self._members(t):
            if member_name == name:
                return type_id, bits, bitfield
            if not member_name:
                _, inner = self._resolve(type_id)
                if inner is not None and inner.kind in _COMPOSITES:
                    hit = self._find(inner, name, depth + 1)
                    if hit is not None:
                        return hit[0], bits + hit[1], hit[2]
        return None

    def member_offset(self, struct_name: str, path: str, size: int | None = None) -> int:
        """Byte offset of a (non-bitfield) member from the start of the struct; with
        `size`, the member must be that many bytes (what a probe reads there)."""
        m = self.member(struct_name, path)
        if m.bitfield_size:
            raise BtfError(f"{struct_name}.{path} is a bitfield; it has no byte offset")
        if m.bit_offset % 8:
            raise BtfError(f"{struct_name}.{path} does not start on a byte boundary")
        if size is not None and m.size != size:
            raise BtfError(f"{struct_name}.{path} is {m.size} bytes, the probe reads {size}")
        return m.offset


_shared: Btf | None = None
_shared_lock = threading.Lock()


def vmlinux() -> Btf:
    """The running kernel's BTF, parsed once (5.5 MB, ~0.2 s here) and shared by the probes
    that start together, until forget() drops it: it is needed for their cflags only."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Btf.load(VMLINUX)
        return _shared


def forget() -> None:
    """Drop the shared parse (the blob and its index, ~7 MB) once the probes are built."""
    global _shared
    with _shared_lock:
        _shared = None
