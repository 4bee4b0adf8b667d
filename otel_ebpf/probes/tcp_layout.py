"""Where probes/tcp_retransmit.bpf.c finds what it reads in struct sk_buff and struct sock,
from the running kernel's BTF: -D flags for its compile. The headers BCC compiles with may
be another kernel's (see otel_ebpf.kernel.headers), so no offset comes from them.
"""

from __future__ import annotations

from otel_ebpf.kernel import btf as kbtf

# struct sock members the program reads: cflag -> (member path, size in bytes). All but
# the protocol sit in sock_common at the start of struct sock, read in one go.
SOCK_FIELDS: dict[str, tuple[str, int]] = {
    "SK_FAMILY_OFF": ("__sk_common.skc_family", 2),
    "SK_STATE_OFF": ("__sk_common.skc_state", 1),
    "SK_NUM_OFF": ("__sk_common.skc_num", 2),
    "SK_DPORT_OFF": ("__sk_common.skc_dport", 2),
    "SK_NET_OFF": ("__sk_common.skc_net", 8),
    "SK_RCV_SADDR_OFF": ("__sk_common.skc_rcv_saddr", 4),
    "SK_DADDR_OFF": ("__sk_common.skc_daddr", 4),
    "SK_V6_RCV_SADDR_OFF": ("__sk_common.skc_v6_rcv_saddr", 16),
    "SK_V6_DADDR_OFF": ("__sk_common.skc_v6_daddr", 16),
}
IPV6_FIELDS = ("SK_V6_RCV_SADDR_OFF", "SK_V6_DADDR_OFF")
# absent from kernels without the fields' feature: the program does without them
OPTIONAL_FIELDS = (*IPV6_FIELDS, "SK_NET_OFF")
MAX_SKC_READ = 256  # the one-read copy of the start of struct sock lives on the BPF stack


def segment_count_offset(btf: kbtf.Btf) -> int:
    """offsetof(struct sk_buff, cb) + offsetof(struct tcp_skb_cb, tcp_gso_segs): where
    tcp_skb_pcount() reads a buffer's segment count."""
    cb = btf.member("sk_buff", "cb")
    if cb.bitfield_size or cb.bit_offset % 8:
        raise kbtf.BtfError("sk_buff.cb is a bitfield in this kernel")
    cb_size = btf.struct_size("tcp_skb_cb")
    if cb_size > cb.size:
        raise kbtf.BtfError(f"tcp_skb_cb ({cb_size} bytes) does not fit sk_buff.cb "
                            f"({cb.size} bytes)")
    return cb.offset + btf.member_offset("tcp_skb_cb", "tcp_gso_segs", 2)


def offset_flags(btf: kbtf.Btf) -> list[str]:
    """-D flags for every struct offset the program reads, from the running kernel's BTF.
    Raises BtfError, with what is missing, when the kernel's layout cannot be known."""
    flags = [f"-DSKB_PCOUNT_OFF={segment_count_offset(btf)}",
             f"-DSK_PROTOCOL_OFF={btf.member_offset('sock', 'sk_protocol', 2)}"]
    read = 0
    for flag, (path, size) in SOCK_FIELDS.items():
        try:
            offset = btf.member_offset("sock", path, size)
        except kbtf.BtfError:
            if flag in OPTIONAL_FIELDS:
                continue  # no IPv6: no AF_INET6 sockets; no namespaces: one port space
            raise
        flags.append(f"-D{flag}={offset}")
        read = max(read, offset + size)
    # A request sock (a connection not yet accepted) starts with the same sock_common.
    req_common = btf.member_offset("request_sock", "__req_common",
                                    btf.struct_size("sock_common"))
    flags.append(f"-DREQ_COMMON_OFF={req_common}")
    if read > MAX_SKC_READ:
        raise kbtf.BtfError(f"struct sock's address fields end at byte {read}, beyond the "
                            f"{MAX_SKC_READ} bytes the probe copies")
    flags.append(f"-DSKC_READ={read}")
    return flags
