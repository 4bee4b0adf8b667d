"""A small writer of BTF blobs (include/uapi/linux/btf.h), for tests of the BTF reader and
of the struct offsets the TCP retransmit probe takes from it, without a kernel.

`kernel_like()` builds the types the probe reads, shaped as in Linux 6.x (anonymous unions
and structs included) but at offsets no real kernel uses, so a test passes only if the
offsets really come from the BTF.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST = range(1, 11)
RESTRICT, FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(11, 20)

# (name, type id, bit offset, bitfield bits)
MemberSpec = tuple[str, int, int, int]


@dataclass
class BtfWriter:
    endian: str = "<"
    _strings: bytearray = field(default_factory=lambda: bytearray(b"\0"))
    _offsets: dict[str, int] = field(default_factory=lambda: {"": 0})
    _types: list[bytes] = field(default_factory=list)

    def name(self, text: str) -> int:
        if text not in self._offsets:
            self._offsets[text] = len(self._strings)
            self._strings += text.encode() + b"\0"
        return self._offsets[text]

    def _add(self, kind: int, name: str, size_or_type: int, trailer: bytes = b"",
             vlen: int = 0, kind_flag: bool = False) -> int:
        info = (int(kind_flag) << 31) | (kind << 24) | vlen
        self._types.append(struct.pack(self.endian + "3I", self.name(name), info, size_or_type)
                           + trailer)
        return len(self._types)  # type ids start at 1

    def integer(self, name: str, size: int) -> int:
        return self._add(INT, name, size, struct.pack(self.endian + "I", size * 8))

    def ptr(self, to: int) -> int:
        return self._add(PTR, "", to)

    def typedef(self, name: str, to: int) -> int:
        return self._add(TYPEDEF, name, to)

    def qualifier(self, kind: int, to: int) -> int:
        return self._add(kind, "", to)

    def array(self, elem: int, index: int, nelems: int) -> int:
        return self._add(ARRAY, "", 0, struct.pack(self.endian + "3I", elem, index, nelems))

    def composite(self, name: str, size: int, members: list[MemberSpec], *,
                  union: bool = False) -> int:
        bitfields = any(m[3] for m in members)
        trailer = b"".join(
            struct.pack(self.endian + "3I", self.name(n), t,
                        (bf << 24 | bits) if bitfields else bits)
            for n, t, bits, bf in members)
        return self._add(UNION if union else STRUCT, name, size, trailer, len(members),
                         bitfields)

    def fwd(self, name: str) -> int:
        return self._add(FWD, name, 0)

    def enum(self, name: str, values: dict[str, int]) -> int:
        trailer = b"".join(struct.pack(self.endian + "Ii", self.name(k), v)
                           for k, v in values.items())
        return self._add(ENUM, name, 4, trailer, len(values))

    def enum64(self, name: str, values: dict[str, int]) -> int:
        trailer = b"".join(struct.pack(self.endian + "3I", self.name(k), v & 0xFFFFFFFF, v >> 32)
                           for k, v in values.items())
        return self._add(ENUM64, name, 8, trailer, len(values))

    def func_proto(self, ret: int, params: list[tuple[str, int]]) -> int:
        trailer = b"".join(struct.pack(self.endian + "2I", self.name(n), t) for n, t in params)
        return self._add(FUNC_PROTO, "", ret, trailer, len(params))

    def func(self, name: str, proto: int) -> int:
        return self._add(FUNC, name, proto, vlen=1)

    def var(self, name: str, type_id: int) -> int:
        return self._add(VAR, name, type_id, struct.pack(self.endian + "I", 1))

    def datasec(self, name: str, vars_: list[tuple[int, int, int]]) -> int:
        trailer = b"".join(struct.pack(self.endian + "3I", *v) for v in vars_)
        return self._add(DATASEC, name, sum(v[2] for v in vars_), trailer, len(vars_))

    def decl_tag(self, name: str, type_id: int, component: int) -> int:
        return self._add(DECL_TAG, name, type_id, struct.pack(self.endian + "i", component))

    def floating(self, name: str, size: int) -> int:
        return self._add(FLOAT, name, size)

    def raw(self, kind: int) -> int:
        """A record of a kind the reader may not know."""
        return self._add(kind, "", 0)

    def build(self) -> bytes:
        types = b"".join(self._types)
        header = struct.pack(self.endian + "HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types),
                             len(types), len(self._strings))
        return header + types + bytes(self._strings)


# Offsets of kernel_like(), in bytes: none of them is where Linux 6.x has the member.
CB_OFFSET = 56
GSO_SEGS_IN_CB = 12
SK_COMMON = {"skc_daddr": 8, "skc_rcv_saddr": 12, "skc_dport": 20, "skc_num": 22,
             "skc_family": 26, "skc_state": 29, "skc_v6_daddr": 64, "skc_v6_rcv_saddr": 80}
SK_PROTOCOL = 600


# where kernel_like() puts the members workload.h reads (no real kernel's offsets)
TASK_OFFSETS = {"mm": 1208, "exe_file": 904, "f_inode": 40, "f_path": 88, "d_name": 56}


def kernel_like(endian: str = "<", ipv6: bool = True) -> bytes:
    w = BtfWriter(endian)
    u8 = w.integer("unsigned char", 1)
    u16 = w.typedef("__u16", w.integer("short unsigned int", 2))
    u32 = w.typedef("__u32", w.integer("unsigned int", 4))
    w.integer("long int", 8)
    be16 = w.typedef("__be16", u16)
    be32 = w.typedef("__be32", u32)
    char = w.integer("char", 1)
    idx = w.integer("int", 4)

    # struct tcp_skb_cb: seq, end_seq, then the anonymous union { tcp_tw_isn; struct {
    # tcp_gso_segs; tcp_gso_size; } }, as in include/net/tcp.h
    gso = w.composite("", 4, [("tcp_gso_segs", u16, 0, 0), ("tcp_gso_size", u16, 16, 0)])
    union = w.composite("", 4, [("tcp_tw_isn", u32, 0, 0), ("", gso, 0, 0)], union=True)
    w.composite("tcp_skb_cb", 48, [
        ("seq", u32, 32, 0), ("end_seq", u32, 64, 0), ("", union, GSO_SEGS_IN_CB * 8, 0),
        ("eor", u8, 130 * 1, 1),
    ])
    cb = w.array(char, idx, 48)
    w.fwd("sk_buff")  # forward declarations are not the struct
    w.composite("sk_buff", 232, [("len", u32, 0, 0), ("cb", cb, CB_OFFSET * 8, 0)])

    in6 = w.composite("in6_addr", 16, [("s6_addr", w.array(u8, idx, 16), 0, 0)])
    addrpair = w.composite("", 8, [("skc_daddr", be32, 0, 0), ("skc_rcv_saddr", be32, 32, 0)])
    portpair = w.composite("", 4, [("skc_dport", be16, 0, 0), ("skc_num", u16, 16, 0)])
    members: list[MemberSpec] = [
        ("", w.composite("", 8, [("skc_addrpair", w.integer("long long unsigned int", 8), 0, 0),
                                 ("", addrpair, 0, 0)], union=True), SK_COMMON["skc_daddr"] * 8,
         0),
        ("", w.composite("", 4, [("skc_portpair", u32, 0, 0), ("", portpair, 0, 0)],
                         union=True), SK_COMMON["skc_dport"] * 8, 0),
        ("skc_family", w.typedef("sa_family_t", u16), SK_COMMON["skc_family"] * 8, 0),
        ("skc_state", w.qualifier(VOLATILE, u8), SK_COMMON["skc_state"] * 8, 0),
    ]
    if ipv6:
        members += [("skc_v6_daddr", in6, SK_COMMON["skc_v6_daddr"] * 8, 0),
                    ("skc_v6_rcv_saddr", w.qualifier(CONST, in6),
                     SK_COMMON["skc_v6_rcv_saddr"] * 8, 0)]
    common = w.composite("sock_common", 136, members)
    w.composite("sock", 800, [("__sk_common", common, 0, 0),
                              ("sk_protocol", u16, SK_PROTOCOL * 8, 0)])
    w.composite("request_sock", 232, [("__req_common", common, 0, 0)])

    # a task's executable, as probes/workload.h follows it: task_struct.mm ->
    # mm_struct.exe_file -> file.f_inode / file.f_path.dentry -> dentry.d_name.name
    ptr = w.ptr(w.fwd("opaque"))
    path = w.composite("path", 16, [("mnt", ptr, 0, 0), ("dentry", ptr, 64, 0)])
    qstr = w.composite("qstr", 16, [("hash_len", w.integer("long long unsigned int", 8),
                                      0, 0), ("name", ptr, 64, 0)])
    w.composite("task_struct", 4096, [("mm", ptr, TASK_OFFSETS["mm"] * 8, 0)])
    w.composite("mm_struct", 1024, [("exe_file", ptr, TASK_OFFSETS["exe_file"] * 8, 0)])
    w.composite("file", 256, [("f_inode", ptr, TASK_OFFSETS["f_inode"] * 8, 0),
                              ("f_path", path, TASK_OFFSETS["f_path"] * 8, 0)])
    w.composite("dentry", 192, [("d_name", qstr, TASK_OFFSETS["d_name"] * 8, 0)])
    return w.build()
