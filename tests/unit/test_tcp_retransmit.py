"""The TCP retransmit decoder without a kernel: address formatting, the struct offsets it
takes from BTF, the aggregation modes, the probe's own counters."""

from __future__ import annotations

import ctypes as ct
import ipaddress
import re
from pathlib import Path
from typing import Any

import pytest

from otel_ebpf.kernel.btf import Btf, BtfError
from otel_ebpf.kernel.engine import EngineError
from otel_ebpf.model import CounterDelta, Workload
from otel_ebpf.probes import tcp_layout
from otel_ebpf.probes import tcp_retransmit as tr
from otel_ebpf.probes.tcp_retransmit import TcpRetransmitConfig, TcpRetransmitEvents
from tests.helpers import tcp_btf

BPF_SOURCE = Path(__file__).parents[2] / "probes" / "tcp_retransmit.bpf.c"


def v6(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


def mapped(v4: str) -> bytes:
    return v6(f"::ffff:{v4}")


# ---- address formatting ---------------------------------------------------------------

@pytest.mark.parametrize(("family", "raw", "expected"), [
    (tr.AF_INET, mapped("10.1.2.3"), ("ipv4", "10.1.2.3")),
    (tr.AF_INET, mapped("127.0.0.1"), ("ipv4", "127.0.0.1")),
    (tr.AF_INET6, v6("2001:db8::1"), ("ipv6", "2001:db8::1")),
    (tr.AF_INET6, v6("::1"), ("ipv6", "::1")),
    (tr.AF_INET6, v6("fe80::1:2:3:4"), ("ipv6", "fe80::1:2:3:4")),
    # a dual-stack AF_INET6 socket talking to an IPv4 peer speaks IPv4 on the wire
    (tr.AF_INET6, mapped("192.0.2.7"), ("ipv4", "192.0.2.7")),
    # AF_INET with the four bytes first (not the tracepoint's layout, but unambiguous)
    (tr.AF_INET, bytes([192, 0, 2, 9]) + b"\0" * 12, ("ipv4", "192.0.2.9")),
])
def test_format_address(family: int, raw: bytes, expected: tuple[str, str]) -> None:
    assert tr.format_address(family, raw) == expected


def test_format_address_takes_ctypes_arrays() -> None:
    key = tr.ConnKey()
    ct.memmove(key.peer_addr, mapped("203.0.113.5"), 16)
    assert tr.format_address(tr.AF_INET, key.peer_addr) == ("ipv4", "203.0.113.5")


def test_names_of_states_and_errors() -> None:
    assert tr.state_name(1) == "established"
    assert tr.state_name(2) == "syn_sent"
    assert tr.state_name(4) == "fin_wait_1"
    assert tr.state_name(12) == "syn_received"  # NEW_SYN_RECV: a SYN-ACK sent again
    assert tr.state_name(99) == "state_99"
    assert tr.error_type(0) is None
    assert tr.error_type(-1) == "EPERM"
    assert tr.error_type(-16) == "EBUSY"
    assert tr.error_type(-105) == "ENOBUFS"
    assert tr.error_type(-4000) == "errno_4000"
    assert tr.network_type(tr.AF_INET) == "ipv4"
    assert tr.network_type(tr.AF_INET6) == "ipv6"


# ---- offsets from BTF -----------------------------------------------------------------

def flag_values(flags: list[str]) -> dict[str, int]:
    return {m.group(1): int(m.group(2)) for f in flags if (m := re.match(r"-D(\w+)=(\d+)$", f))}


def test_offsets_come_from_btf_not_from_headers() -> None:
    flags = flag_values(tcp_layout.offset_flags(Btf(tcp_btf.kernel_like())))
    assert flags["SKB_PCOUNT_OFF"] == tcp_btf.CB_OFFSET + tcp_btf.GSO_SEGS_IN_CB
    assert flags["SK_PROTOCOL_OFF"] == tcp_btf.SK_PROTOCOL
    assert flags["SK_FAMILY_OFF"] == tcp_btf.SK_COMMON["skc_family"]
    assert flags["SK_STATE_OFF"] == tcp_btf.SK_COMMON["skc_state"]
    assert flags["SK_NUM_OFF"] == tcp_btf.SK_COMMON["skc_num"]
    assert flags["SK_DPORT_OFF"] == tcp_btf.SK_COMMON["skc_dport"]
    assert flags["SK_RCV_SADDR_OFF"] == tcp_btf.SK_COMMON["skc_rcv_saddr"]
    assert flags["SK_DADDR_OFF"] == tcp_btf.SK_COMMON["skc_daddr"]
    assert flags["SK_V6_DADDR_OFF"] == tcp_btf.SK_COMMON["skc_v6_daddr"]
    assert flags["SK_V6_RCV_SADDR_OFF"] == tcp_btf.SK_COMMON["skc_v6_rcv_saddr"]
    # one read of the start of struct sock covers every address field
    assert flags["SKC_READ"] == tcp_btf.SK_COMMON["skc_v6_rcv_saddr"] + 16
    assert flags["REQ_COMMON_OFF"] == 0


def test_a_kernel_without_ipv6_has_no_v6_offsets() -> None:
    flags = flag_values(tcp_layout.offset_flags(Btf(tcp_btf.kernel_like(ipv6=False))))
    assert "SK_V6_DADDR_OFF" not in flags and "SK_V6_RCV_SADDR_OFF" not in flags
    assert flags["SKC_READ"] == tcp_btf.SK_COMMON["skc_state"] + 1


def test_wrong_sized_member_is_refused() -> None:
    w = tcp_btf.BtfWriter()
    u32 = w.integer("unsigned int", 4)
    w.composite("tcp_skb_cb", 48, [("tcp_gso_segs", u32, 64, 0)])
    w.composite("sk_buff", 232, [("cb", w.array(w.integer("char", 1), u32, 48), 320, 0)])
    with pytest.raises(BtfError, match="tcp_gso_segs is 4 bytes"):
        tcp_layout.segment_count_offset(Btf(w.build()))


def test_the_real_kernel_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Against this machine's BTF where it has one: sane, and tcp_skb_cb fits in cb."""
    from otel_ebpf.kernel.btf import VMLINUX

    if not VMLINUX.is_file():
        pytest.skip("this kernel exposes no BTF")
    btf = Btf.load()
    offset = tcp_layout.segment_count_offset(btf)
    cb = btf.member("sk_buff", "cb")
    assert cb.offset < offset < cb.offset + cb.size


def test_no_btf_is_an_actionable_error(monkeypatch: pytest.MonkeyPatch) -> None:
    w = tcp_btf.BtfWriter()
    w.integer("int", 4)
    probe = tr.TcpRetransmit(TcpRetransmitConfig(), btf=Btf(w.build()))
    with pytest.raises(EngineError, match=r"sk_buff.*CONFIG_DEBUG_INFO_BTF"):
        probe.cflags()


# ---- cflags per configuration ---------------------------------------------------------

def cflags(monkeypatch: pytest.MonkeyPatch, has_err: bool = True, **config: Any) -> list[str]:
    monkeypatch.setattr(tr, "retransmit_has_err", lambda root=None: has_err)
    probe = tr.TcpRetransmit(TcpRetransmitConfig(**config), btf=Btf(tcp_btf.kernel_like()))
    return probe.cflags()


def test_cflags_per_aggregation(monkeypatch: pytest.MonkeyPatch) -> None:
    connection = cflags(monkeypatch, aggregation="connection")
    peer = cflags(monkeypatch)  # the default
    workload = cflags(monkeypatch, aggregation="workload")
    assert "-DKEY_CONNECTION" in connection and "-DKEY_PEER" not in connection
    assert "-DKEY_PEER" in peer and "-DKEY_CONNECTION" not in peer
    assert not {"-DKEY_PEER", "-DKEY_CONNECTION"} & set(workload)
    for flags in (connection, peer, workload):
        assert "-DHAVE_ERR" in flags
        assert "-DMAX_ENTRIES=16384" in flags
        assert not any(f.startswith("-DEVENT") for f in flags)
    assert "-DHAVE_ERR" not in cflags(monkeypatch, has_err=False)


def test_cflags_with_events(monkeypatch: pytest.MonkeyPatch) -> None:
    flags = cflags(monkeypatch, events=TcpRetransmitEvents(enabled=True, rate_per_second=50))
    assert {"-DEVENTS", "-DEVENT_RATE=50ULL", "-DEVENT_BURST=50ULL"} <= set(flags)
    pages = flag_values(flags)["RINGBUF_PAGES"]
    assert pages & (pages - 1) == 0


def test_every_cflag_the_program_reads_is_documented() -> None:
    source = BPF_SOURCE.read_text()
    header = source[:source.index("*/")]
    used = set(re.findall(r"#\s*if(?:n?def)?\s+!?\s*(?:defined\()?([A-Z_]+)", source))
    body = source[source.index("*/"):]
    used |= set(re.findall(r"\b((?:SK|SKB|REQ)_[A-Z0-9_]*OFF)\b", body))
    used |= {"SKC_READ", "MAX_ENTRIES", "OWNER_ENTRIES", "EVENT_RATE", "EVENT_BURST",
             "RINGBUF_PAGES"}
    assert "REQ_COMMON_OFF" in used and "SK_V6_DADDR_OFF" in used
    for name in sorted(used - {"__BYTE_ORDER__"}):
        assert name in header, f"{name} is not in the .bpf.c header comment"


@pytest.mark.parametrize(("rate", "burst", "interval", "pages"), [
    (100, 100, 5.0, 64),     # 1100 records of 128 B
    (1, 1, 5.0, 1),
    (100_000, 100_000, 5.0, tr.MAX_RINGBUF_PAGES),
])
def test_ringbuf_pages(rate: int, burst: int, interval: float, pages: int) -> None:
    assert tr.ringbuf_pages(rate, burst, interval) == pages


def test_err_field_detection(tmp_path: Path) -> None:
    fmt = tmp_path / "events" / "tcp" / "tcp_retransmit_skb" / "format"
    fmt.parent.mkdir(parents=True)
    fields = ("\tfield:const void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;\n"
              "\tfield:__u8 daddr_v6[16];\toffset:58;\tsize:16;\tsigned:0;\n")
    fmt.write_text(fields)
    assert not tr.retransmit_has_err(tmp_path)
    fmt.write_text(fields + "\tfield:int err;\toffset:76;\tsize:4;\tsigned:1;\n")
    assert tr.retransmit_has_err(tmp_path)
    assert not tr.retransmit_has_err(tmp_path / "nothing")


# ---- aggregation modes ----------------------------------------------------------------

def key(*, family: int = tr.AF_INET, local: bytes = mapped("10.0.0.1"), local_port: int = 0,
        peer: bytes = mapped("10.0.0.2"), peer_port: int = 0, state: int = 1, err: int = 0,
        tgid: int = 42, cgroup_id: int = 7) -> tr.ConnKey:
    k = tr.ConnKey(local_port=local_port, peer_port=peer_port, family=family, state=state,
                   err=err, tgid=tgid, cgroup_id=cgroup_id)
    ct.memmove(k.local_addr, local, 16)
    ct.memmove(k.peer_addr, peer, 16)
    return k


def value(segments: int, comm: bytes = b"curl") -> tr.ConnValue:
    return tr.ConnValue(segments=segments, comm=comm)


def probe(aggregation: str) -> tr.TcpRetransmit:
    return tr.TcpRetransmit(TcpRetransmitConfig(aggregation=aggregation,  # type: ignore[arg-type]
                                                owner="process"))


def test_connection_mode_keeps_the_4_tuple() -> None:
    record = probe("connection").decode(
        key(local_port=40000, peer_port=443), value(45))
    assert isinstance(record, CounterDelta)
    assert record.descriptor is tr.RETRANSMITS
    assert record.value == 45
    assert record.workload == Workload(42, "curl", 7)
    assert record.attributes == {
        "network.type": "ipv4",
        "network.local.address": "10.0.0.1", "network.local.port": 40000,
        "network.peer.address": "10.0.0.2", "network.peer.port": 443,
        "linux.tcp.state": "established",
    }


def test_peer_mode_keeps_the_service_port_of_either_side() -> None:
    p = probe("peer")
    # a connection this host opened: the kernel zeroed our ephemeral port
    opened = p.decode(key(local=bytes(16), peer_port=443), value(3))
    assert opened is not None and opened.attributes == {
        "network.type": "ipv4", "network.peer.address": "10.0.0.2",
        "network.peer.port": 443, "linux.tcp.state": "established"}
    # a connection it accepted: the client's ephemeral port was zeroed, ours kept
    accepted = p.decode(key(local=bytes(16), local_port=8080), value(2))
    assert accepted is not None and accepted.attributes == {
        "network.type": "ipv4", "network.local.port": 8080,
        "network.peer.address": "10.0.0.2", "linux.tcp.state": "established"}


def test_workload_mode_keeps_only_type_and_state() -> None:
    record = probe("workload").decode(
        key(family=tr.AF_INET6, local=bytes(16), peer=bytes(16), state=4), value(9))
    assert record is not None
    assert record.attributes == {"network.type": "ipv6", "linux.tcp.state": "fin_wait_1"}
    assert record.workload.pid == 42


def test_failures_are_their_own_metric_with_error_type() -> None:
    record = probe("peer").decode(key(peer_port=443, err=-1), value(44))
    assert record is not None
    assert record.descriptor is tr.RETRANSMIT_FAILURES
    assert record.descriptor.unit == tr.RETRANSMITS.unit == "{segment}"
    assert record.attributes["error.type"] == "EPERM"
    assert record.value == 44


def test_unowned_sockets_are_pid_0_and_empty_entries_are_skipped() -> None:
    p = probe("peer")
    record = p.decode(key(peer_port=22, tgid=0, cgroup_id=0), value(1, b""))
    assert record is not None and record.workload == Workload(0, "", 0)
    assert p.decode(key(peer_port=22), value(0)) is None


# ---- collect(): drained entries, own counters -----------------------------------------

class FakeMap:
    def __init__(self) -> None:
        self.entries: list[tuple[Any, Any]] = []
        self.sums: list[int] = [0] * len(tr.TcpRetransmit.stat_names())

    def drain(self) -> list[tuple[Any, Any]]:
        out, self.entries = self.entries, []
        return out

    def percpu_sums(self) -> list[int]:
        return list(self.sums)


class FakeProgram:
    def __init__(self) -> None:
        self.maps = {"retransmits": FakeMap(), "probe_stats": FakeMap()}

    def map(self, name: str) -> FakeMap:
        return self.maps[name]

    def close(self) -> None:
        pass


def stats(**values: int) -> list[int]:
    return [values.get(name, 0) for name in tr.TcpRetransmit.stat_names()]


def test_collect_reports_deltas_of_lost_events_and_evictions() -> None:
    p = probe("connection")
    program = FakeProgram()
    p._program = program  # type: ignore[assignment]
    retransmits, probe_stats = program.maps["retransmits"], program.maps["probe_stats"]

    retransmits.entries = [(key(local_port=1, peer_port=2), value(45)),
                           (key(local_port=1, peer_port=2, err=-16), value(45))]
    probe_stats.sums = stats(hits=3, inserts=2, rate_limited=1, no_owner=5)
    first = p.collect()
    assert all(isinstance(r, CounterDelta) for r in first.records)
    assert [(r.descriptor.name, r.value) for r in first.records  # type: ignore[union-attr]
            ] == [
        ("linux.tcp.retransmits", 45), ("linux.tcp.retransmit.failures", 45)]
    assert first.lost_events == {"rate_limited": 1}  # hits, inserts, no_owner are not losses

    # 5 keys inserted, 2 drained now, 2 before: at least one was evicted by the LRU
    retransmits.entries = [(key(local_port=3, peer_port=4), value(1))] * 2
    probe_stats.sums = stats(hits=9, inserts=5, rate_limited=1, map_full=2,
                             pcount_unreadable=1)
    second = p.collect()
    assert second.lost_events == {"map_full": 2, "pcount_unreadable": 1, "map_evicted": 1}

    probe_stats.sums = stats(hits=9, inserts=5, rate_limited=1, map_full=2,
                             pcount_unreadable=1)
    assert p.collect().lost_events == {}  # nothing new, and the eviction is not repeated
    assert p.counters()["hits"] == 9


def test_ctypes_mirrors_match_the_c_layout() -> None:
    assert ct.sizeof(tr.ConnKey) == 64
    assert ct.sizeof(tr.ConnValue) == 56
    assert ct.sizeof(tr.Owner) == 40
    assert ct.sizeof(tr.RetransmitEventStruct) == 88
    assert ct.sizeof(tr.RetransmitEventStruct) + 8 <= tr.EVENT_RECORD_BYTES
    source = BPF_SOURCE.read_text()
    for struct_name, mirror in (("conn_key", tr.ConnKey), ("conn_value", tr.ConnValue),
                                ("owner", tr.Owner),
                                ("retransmit_event", tr.RetransmitEventStruct)):
        body = re.search(rf"struct {struct_name} {{(.*?)}};", source, re.S)
        assert body, struct_name
        c_fields = re.findall(r"^\s*\w+ (\w+)(?:\[[A-Z_0-9]+\])?;", body.group(1), re.M)
        assert c_fields == [f[0] for f in mirror._fields_], struct_name
