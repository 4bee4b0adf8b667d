"""The BTF reader: member offsets by name, through anonymous unions and structs, from
synthetic blobs (every record kind, both byte orders) and from this machine's vmlinux."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from otel_ebpf.kernel.btf import VMLINUX, Btf, BtfError
from tests.helpers import tcp_btf
from tests.helpers.tcp_btf import BtfWriter


@pytest.mark.parametrize("endian", ["<", ">"])
def test_members_inside_anonymous_unions_and_structs(endian: str) -> None:
    btf = Btf(tcp_btf.kernel_like(endian))
    segs = btf.member("tcp_skb_cb", "tcp_gso_segs")
    assert (segs.offset, segs.size, segs.bitfield_size) == (tcp_btf.GSO_SEGS_IN_CB, 2, 0)
    assert btf.member_offset("tcp_skb_cb", "tcp_gso_size") == tcp_btf.GSO_SEGS_IN_CB + 2
    assert btf.member_offset("tcp_skb_cb", "tcp_tw_isn") == tcp_btf.GSO_SEGS_IN_CB
    cb = btf.member("sk_buff", "cb")
    assert (cb.offset, cb.size) == (tcp_btf.CB_OFFSET, 48)
    assert btf.struct_size("tcp_skb_cb") == 48


def test_dotted_paths_typedefs_and_qualifiers() -> None:
    btf = Btf(tcp_btf.kernel_like())
    for name, offset in tcp_btf.SK_COMMON.items():
        assert btf.member_offset("sock", f"__sk_common.{name}") == offset, name
    assert btf.member("sock", "__sk_common.skc_family").size == 2  # sa_family_t -> __u16
    assert btf.member("sock", "__sk_common.skc_state").size == 1  # volatile unsigned char
    assert btf.member("sock", "__sk_common.skc_v6_rcv_saddr").size == 16  # const in6_addr
    assert btf.member_offset("sock", "sk_protocol") == tcp_btf.SK_PROTOCOL
    # a named member of an anonymous union is reachable, and so is the union's twin
    assert btf.member_offset("sock", "__sk_common.skc_addrpair") == 8


def test_bitfields_have_no_byte_offset() -> None:
    btf = Btf(tcp_btf.kernel_like())
    eor = btf.member("tcp_skb_cb", "eor")
    assert (eor.bit_offset, eor.bitfield_size) == (130, 1)
    with pytest.raises(BtfError, match="bitfield"):
        btf.member_offset("tcp_skb_cb", "eor")


def test_missing_struct_and_member_are_named() -> None:
    btf = Btf(tcp_btf.kernel_like())
    with pytest.raises(BtfError, match="no struct or union named 'tcp_sock'"):
        btf.member("tcp_sock", "snd_una")
    with pytest.raises(BtfError, match="no member 'tcp_gso_sgs'"):
        btf.member("tcp_skb_cb", "tcp_gso_sgs")
    with pytest.raises(BtfError, match=r"no member '__sk_common\.skc_nope'"):
        btf.member("sock", "__sk_common.skc_nope")
    with pytest.raises(BtfError, match="not a struct"):
        btf.member("sock", "sk_protocol.x")


def test_every_record_kind_is_skipped_by_its_length() -> None:
    w = BtfWriter()
    u32 = w.integer("unsigned int", 4)
    w.enum("e", {"A": 1, "B": -2})
    w.enum64("e64", {"BIG": 1 << 40})
    proto = w.func_proto(u32, [("a", u32), ("b", u32)])
    w.func("f", proto)
    v = w.var("v", u32)
    w.datasec(".data", [(v, 0, 4)])
    w.decl_tag("tag", u32, -1)
    w.floating("double", 8)
    w.ptr(u32)
    w.qualifier(tcp_btf.RESTRICT, u32)
    w.qualifier(tcp_btf.TYPE_TAG, u32)
    w.composite("after_all", 8, [("x", u32, 0, 0), ("y", u32, 32, 0)])
    assert Btf(w.build()).member_offset("after_all", "y") == 4


def test_unknown_kind_and_bad_magic_are_errors() -> None:
    w = BtfWriter()
    w.raw(31)
    with pytest.raises(BtfError, match="unknown BTF kind 31"):
        Btf(w.build())
    with pytest.raises(BtfError, match="not BTF"):
        Btf(b"\0" * 64)
    with pytest.raises(BtfError, match="too short"):
        Btf(b"\x9f\xeb")


def test_several_definitions_must_agree() -> None:
    w = BtfWriter()
    u16 = w.integer("short unsigned int", 2)
    w.composite("dup", 4, [("a", u16, 0, 0), ("b", u16, 16, 0)])
    w.composite("dup", 4, [("a", u16, 0, 0), ("c", u16, 16, 0)])
    btf = Btf(w.build())
    assert btf.member_offset("dup", "a") == 0  # same in both
    assert btf.member_offset("dup", "c") == 2  # only one has it
    w.composite("dup", 8, [("a", u16, 32, 0)])
    with pytest.raises(BtfError, match="different offsets"):
        Btf(w.build()).member("dup", "a")


def test_load_names_the_file_when_unreadable(tmp_path: Path) -> None:
    with pytest.raises(BtfError, match="CONFIG_DEBUG_INFO_BTF"):
        Btf.load(tmp_path / "vmlinux")


@pytest.mark.skipif(not VMLINUX.is_file(), reason="this kernel exposes no BTF")
def test_this_kernel_agrees_with_bpftool() -> None:
    """The reader against the running kernel, checked by an independent BTF decoder."""
    btf = Btf.load()
    cb = btf.member("sk_buff", "cb")
    segs = btf.member("tcp_skb_cb", "tcp_gso_segs")
    assert cb.size == 48 and segs.size == 2
    assert 0 < cb.offset < btf.struct_size("sk_buff")
    assert segs.offset + segs.size <= btf.struct_size("tcp_skb_cb") <= cb.size
    bpftool = shutil.which("bpftool") or "/usr/sbin/bpftool"
    if not Path(bpftool).exists():
        pytest.skip("bpftool not installed: only the sanity checks ran")
    dump = subprocess.run([bpftool, "btf", "dump", "file", str(VMLINUX), "format", "raw"],
                          capture_output=True, text=True, check=True).stdout

    def bits_of(struct_name: str, member: str) -> int:
        block = re.search(rf"STRUCT '{struct_name}' size=\d+ vlen=\d+\n((?:\t.*\n)+)", dump)
        assert block, struct_name
        found = re.search(rf"'{member}' type_id=\d+ bits_offset=(\d+)", block.group(1))
        assert found, member
        return int(found.group(1))

    assert cb.bit_offset == bits_of("sk_buff", "cb")
    assert btf.member("sock", "sk_protocol").bit_offset == bits_of("sock", "sk_protocol")
    assert btf.member("sock", "__sk_common").bit_offset == bits_of("sock", "__sk_common")
    assert btf.member("sock_common", "skc_family").bit_offset == bits_of("sock_common",
                                                                         "skc_family")
