"""Decoder for probes/tcp_retransmit.bpf.c: retransmitted TCP segments -> counters.

The kernel counts segments, not tracepoint hits: under GSO/TSO one retransmitted buffer
carries many segments, and the kernel's own RetransSegs adds tcp_skb_pcount(skb) per
buffer. The program reads that count, and the socket's addresses, at struct offsets taken
from the running kernel's BTF (otel_ebpf.kernel.btf): the headers BCC compiles with may be
another kernel's. It hooks raw tracepoints, which the kernel never skips because another
tracing program happens to run on the CPU (classic tracepoints are; see the .bpf.c).

Ownership: the retransmit fires in softirq or timer context, where `current` is whoever
was interrupted. The program remembers, per socket, the process that connected it or
listened on it (inet_sock_set_state runs in that process's context); an accepted socket
takes its listener's owner. Nothing runs on sends and receives. A socket connected or
listening since before the probe started is counted under pid 0.

The default aggregation, per peer, keys a connection this host opened by the peer's
address and port and one it accepted by the peer's address and the local port: the
service's port either way, never an ephemeral one.
"""

from __future__ import annotations

import ctypes as ct
import errno
import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from otel_ebpf.clock import MonotonicClock
from otel_ebpf.config_base import ProbeConfig, Strict
from otel_ebpf.kernel import btf as kbtf
from otel_ebpf.kernel.engine import EngineError, Program
from otel_ebpf.kernel.tracefs import event_has_field
from otel_ebpf.model import AttributeValue, Collection, CounterDelta, MetricDescriptor, Workload
from otel_ebpf.probes.base import Hook, Probe
from otel_ebpf.probes.task_layout import offset_flags as task_offset_flags
from otel_ebpf.probes.tcp_layout import offset_flags

log = logging.getLogger(__name__)

AF_INET = 2
AF_INET6 = 10
# Sockets whose owner is remembered. An LRU: sockets that retransmit have just been
# written to, so they are the recently used ones that stay.
OWNER_ENTRIES = 65536
LISTENER_ENTRIES = 4096  # listening (namespace, port) pairs: each pod's own
EXE_NAMES = 4096  # executables that connected or listened, by id
PAGE = 4096
EVENT_RECORD_BYTES = 128  # sizeof(struct retransmit_event) + ring buffer header, rounded
MAX_RINGBUF_PAGES = 4096  # 16 MiB: beyond, a burst is counted as buffer_full instead

# include/net/tcp_states.h; names as in the semantic conventions' network.connection.state.
# NEW_SYN_RECV is the kernel's state of a connection still in the listener's request
# queue (its SYN-ACK retransmissions): for TCP, SYN_RECEIVED.
TCP_STATES = {
    1: "established", 2: "syn_sent", 3: "syn_received", 4: "fin_wait_1", 5: "fin_wait_2",
    6: "time_wait", 7: "close", 8: "close_wait", 9: "last_ack", 10: "listen",
    11: "closing", 12: "syn_received",
}

RETRANSMITS = MetricDescriptor(
    name="linux.tcp.retransmits",
    unit="{segment}",
    description="TCP segments retransmitted, as the kernel's RetransSegs counts them "
                "(segments, not buffers: one GSO buffer carries many; SYN-ACKs included), "
                "per connection or peer and owning workload.",
)
RETRANSMIT_FAILURES = MetricDescriptor(
    name="linux.tcp.retransmit.failures",
    unit="{segment}",
    description="TCP segments whose retransmission failed (err != 0: not sent, or refused "
                "below TCP), by error.type.",
)


class TcpRetransmitEvents(Strict):
    """An optional stream of individual retransmit events (rate limited in the kernel)."""

    enabled: bool = False
    rate_per_second: int = Field(default=100, ge=1, le=100_000)


class TcpRetransmitConfig(ProbeConfig):
    max_entries: int = Field(default=16384, ge=64, le=1 << 20)
    # connection: full 4-tuple; peer: peer address+port; workload: per owning process only
    aggregation: Literal["connection", "peer", "workload"] = "peer"
    # whose the counts are: the owner's workload (container, else cgroup, and executable)
    # or, opted in, the owning process (one series per pid)
    owner: Literal["workload", "process"] = "workload"
    events: TcpRetransmitEvents = Field(default_factory=TcpRetransmitEvents)


# ctypes mirrors of the .bpf.c structs. BCC hands back its own types for the maps; these
# exist for decoding without BCC (unit tests) and to check that the layouts agree.
class ConnKey(ct.Structure):
    _fields_ = [
        ("local_addr", ct.c_uint8 * 16),
        ("peer_addr", ct.c_uint8 * 16),
        ("local_port", ct.c_uint16),
        ("peer_port", ct.c_uint16),
        ("family", ct.c_uint16),
        ("state", ct.c_uint8),
        ("_pad", ct.c_uint8),
        ("err", ct.c_int32),
        ("tgid", ct.c_uint32),
        ("cgroup_id", ct.c_uint64),
        ("exe", ct.c_uint64),
    ]


class Owner(ct.Structure):
    _fields_ = [
        ("tgid", ct.c_uint32),
        ("flags", ct.c_uint32),
        ("cgroup_id", ct.c_uint64),
        ("exe", ct.c_uint64),
        ("comm", ct.c_char * 16),
    ]


class ConnValue(ct.Structure):
    _fields_ = [("segments", ct.c_uint64), ("comm", ct.c_char * 16), ("exe", ct.c_char * 32)]


class RetransmitEventStruct(ct.Structure):
    _fields_ = [
        ("time_ns", ct.c_uint64),
        ("cgroup_id", ct.c_uint64),
        ("local_addr", ct.c_uint8 * 16),
        ("peer_addr", ct.c_uint8 * 16),
        ("local_port", ct.c_uint16),
        ("peer_port", ct.c_uint16),
        ("family", ct.c_uint16),
        ("state", ct.c_uint8),
        ("_pad", ct.c_uint8),
        ("err", ct.c_int32),
        ("segments", ct.c_uint32),
        ("tgid", ct.c_uint32),
        ("_pad2", ct.c_uint32),
        ("comm", ct.c_char * 16),
    ]


@dataclass(frozen=True, slots=True)
class RetransmitEvent:
    """One retransmission attempt, from the rate-limited event stream."""

    time_unix_ns: int
    network_type: str
    local_address: str
    local_port: int
    peer_address: str
    peer_port: int
    state: str
    segments: int
    error_type: str | None  # None: the segments left the host
    workload: Workload

    def attributes(self) -> dict[str, AttributeValue]:
        attrs: dict[str, AttributeValue] = {
            "network.type": self.network_type,
            "network.local.address": self.local_address,
            "network.local.port": self.local_port,
            "network.peer.address": self.peer_address,
            "network.peer.port": self.peer_port,
            "linux.tcp.state": self.state,
            "linux.tcp.segments": self.segments,
        }
        if self.error_type is not None:
            attrs["error.type"] = self.error_type
        return attrs


def format_address(family: int, raw: bytes | Any) -> tuple[str, str]:
    """(network.type, address) of a 16-byte address from the kernel.

    AF_INET addresses arrive IPv4-mapped (the tracepoint's layout); IPv4-mapped addresses
    of AF_INET6 sockets are IPv4 on the wire. Both are reported as plain IPv4, so one peer
    is one series whichever kind of socket reached it."""
    addr = ipaddress.IPv6Address(bytes(raw))
    mapped = addr.ipv4_mapped
    if mapped is not None:
        return "ipv4", str(mapped)
    if family == AF_INET:
        # not mapped although AF_INET: the kernel wrote the plain 4 bytes first
        return "ipv4", str(ipaddress.IPv4Address(bytes(raw)[:4]))
    return "ipv6", str(addr)


def network_type(family: int) -> str:
    return "ipv4" if family == AF_INET else "ipv6" if family == AF_INET6 else f"family_{family}"


def state_name(state: int) -> str:
    return TCP_STATES.get(state, f"state_{state}")


def error_type(err: int) -> str | None:
    """The errno name of a failed attempt (EPERM: a firewall on this host refused it;
    EBUSY: the original is still queued in the host; ENOBUFS/ENOMEM: memory)."""
    if err == 0:
        return None
    return errno.errorcode.get(-err, f"errno_{-err}")


def _comm(raw: bytes) -> str:
    return bytes(raw).split(b"\0", 1)[0].decode(errors="replace")


def retransmit_has_err(root: Path | None = None) -> bool:
    """Whether tcp_retransmit_skb carries `err` (6.17+). Before, it fired for successful
    retransmissions only, and failures are not visible to this probe."""
    return event_has_field("tcp/tcp_retransmit_skb", "err", root)


def ringbuf_pages(rate_per_second: int, burst: int, interval_s: float) -> int:
    """Enough room for a burst plus two collection intervals at the full rate, as a power
    of two pages (what BPF ring buffers require)."""
    records = burst + int(rate_per_second * max(interval_s, 1.0) * 2)
    pages = max(1, records * EVENT_RECORD_BYTES // PAGE)
    return min(MAX_RINGBUF_PAGES, 1 << (pages - 1).bit_length())


class TcpRetransmit(Probe[TcpRetransmitConfig]):
    name = "tcp_retransmit"
    summary = ("retransmitted TCP segments per connection / peer and owning process, "
               "counted in the kernel")
    config_class = TcpRetransmitConfig
    # owners first, so that sockets connected from now on are attributed before their
    # first retransmit is counted
    hooks = (
        Hook("raw_tracepoint", "sock/inet_sock_set_state", "on_state",
             note="owner at connect() and listen(), accepted sockets, forgotten at close"),
        Hook("raw_tracepoint", "tcp/tcp_retransmit_skb", "on_retransmit"),
        Hook("raw_tracepoint", "tcp/tcp_retransmit_synack", "on_synack",
             note="SYN-ACKs of unaccepted connections"),
    )
    exports = (RETRANSMITS, RETRANSMIT_FAILURES)
    # events that were not recorded (exactly); hits, inserts and no_owner are totals
    lost_stats = ("map_full", "pcount_unreadable", "rate_limited", "buffer_full")

    def __init__(self, config: TcpRetransmitConfig, btf: kbtf.Btf | None = None,
                 clock: MonotonicClock | None = None, select_cgroups: bool = False) -> None:
        super().__init__(config, select_cgroups=select_cgroups)
        self._btf = btf
        self._clock = clock
        self._inserted_keys = 0
        self._drained_keys = 0
        self._evicted_reported = 0
        self._pending: list[RetransmitEvent] = []

    # ---- build -------------------------------------------------------------------------

    @property
    def event_burst(self) -> int:
        # One second's worth: a short storm is seen whole, a long one at the steady rate.
        return self.config.events.rate_per_second

    @property
    def ringbuf_pages(self) -> int:
        return ringbuf_pages(self.config.events.rate_per_second, self.event_burst,
                             self.config.interval)

    def program_flags(self) -> list[str]:
        flags = [f"-DMAX_ENTRIES={self.config.max_entries}", f"-DOWNER_ENTRIES={OWNER_ENTRIES}",
                 f"-DLISTENER_ENTRIES={LISTENER_ENTRIES}", f"-DEXE_NAMES={EXE_NAMES}"]
        if self.config.owner == "process":
            flags.append("-DOWNER_PROCESS")
        try:
            btf = self._btf or kbtf.vmlinux()
            flags += offset_flags(btf) + task_offset_flags(btf)
        except kbtf.BtfError as exc:
            raise EngineError(
                f"{self.name}: cannot know this kernel's struct layouts: {exc}. The probe "
                "reads sk_buff and sock members at offsets from /sys/kernel/btf/vmlinux "
                "(CONFIG_DEBUG_INFO_BTF=y); disable it with probes.tcp_retransmit.enabled: "
                "false where there is none") from exc
        if retransmit_has_err():
            flags.append("-DHAVE_ERR")
        if self.config.aggregation == "connection":
            flags.append("-DKEY_CONNECTION")
        elif self.config.aggregation == "peer":
            flags.append("-DKEY_PEER")
        events = self.config.events
        if events.enabled:
            flags += ["-DEVENTS", f"-DEVENT_RATE={events.rate_per_second}ULL",
                      f"-DEVENT_BURST={self.event_burst}ULL",
                      f"-DRINGBUF_PAGES={self.ringbuf_pages}"]
        return flags

    def prepare(self, program: Program) -> None:
        if self.config.events.enabled:
            if self._clock is None:
                self._clock = MonotonicClock()
            program.open_event_buffer("events", self._on_event, perf=False,
                                      pages=self.ringbuf_pages)

    # ---- read --------------------------------------------------------------------------

    def collect(self) -> Collection:
        if self._program is None:
            return Collection(self.name)
        # Stats before the drain: every key inserted before this read is either drained
        # now (or earlier) or was evicted, so inserts - drained never over-reports.
        grown = self.take_stats()
        entries = self._program.map("retransmits").drain()
        self._drained_keys += len(entries)
        records: list[CounterDelta] = []
        for key, value in entries:
            record = self.decode(key, value)
            if record is not None:
                records.append(record)
        lost = self.lost(grown)
        self._inserted_keys += grown["inserts"]
        evicted = self._inserted_keys - self._drained_keys
        if evicted > self._evicted_reported:
            lost["map_evicted"] = evicted - self._evicted_reported
            self._evicted_reported = evicted
        return Collection(self.name, list(records), lost,
                          map_fill={"retransmits": (len(entries), self.config.max_entries)})

    def attributes(self, key: Any) -> dict[str, AttributeValue]:
        """The data point attributes of a key, as far as the aggregation kept them: all
        of the 4-tuple (connection); the peer address and the port of the service - the
        peer's for connections this host opened, the local one for connections it
        accepted (peer); neither (workload)."""
        family = int(key.family)
        attrs: dict[str, AttributeValue] = {"network.type": network_type(family)}
        mode = self.config.aggregation
        if mode == "connection":
            _, attrs["network.local.address"] = format_address(family, key.local_addr)
        if mode in ("connection", "peer"):
            if mode == "connection" or key.local_port:
                attrs["network.local.port"] = int(key.local_port)
            _, attrs["network.peer.address"] = format_address(family, key.peer_addr)
            if mode == "connection" or key.peer_port:
                attrs["network.peer.port"] = int(key.peer_port)
        attrs["linux.tcp.state"] = state_name(int(key.state))
        err = error_type(int(key.err))
        if err is not None:
            attrs["error.type"] = err
        return attrs

    def decode(self, key: Any, value: Any) -> CounterDelta | None:
        segments = int(value.segments)
        if segments == 0:
            return None  # inserted, then the add lost a race with the drain
        descriptor = RETRANSMITS if int(key.err) == 0 else RETRANSMIT_FAILURES
        attributes = self.attributes(key)
        if self.config.owner == "process":
            workload = Workload(int(key.tgid), _comm(value.comm), int(key.cgroup_id))
        else:
            exe = _comm(value.exe)
            workload = Workload(0, exe or _comm(value.comm), int(key.cgroup_id))
            if exe:
                attributes["process.executable.name"] = exe
        return CounterDelta(descriptor, workload, attributes, segments)

    def counters(self) -> dict[str, int]:
        """The program's own counters since load (hits, inserts, no_owner, ...)."""
        if self._program is None:
            return {}
        return dict(zip(self.stat_names(), self._program.map("probe_stats").percpu_sums(),
                        strict=True))
    def _on_event(self, ev: Any) -> None:
        # ev is only valid during this call: copy what is kept.
        family = int(ev.family)
        net, local = format_address(family, ev.local_addr)
        _, peer = format_address(family, ev.peer_addr)
        assert self._clock is not None
        self._pending.append(RetransmitEvent(
            time_unix_ns=self._clock.to_unix_ns(int(ev.time_ns)),
            network_type=net,
            local_address=local,
            local_port=int(ev.local_port),
            peer_address=peer,
            peer_port=int(ev.peer_port),
            state=state_name(int(ev.state)),
            segments=int(ev.segments),
            error_type=error_type(int(ev.err)),
            workload=Workload(int(ev.tgid), _comm(ev.comm), int(ev.cgroup_id)),
        ))

    def events(self) -> list[RetransmitEvent]:
        """Retransmit events streamed since the previous call (empty unless
        events.enabled). Blocking only for the copy; never waits for new events."""
        if self._program is None or not self.config.events.enabled:
            return []
        self._program.poll_event_buffers()
        out, self._pending = self._pending, []
        return out

    def poll_spans(self) -> list[Any]:
        # The event stream (events.enabled) goes to the agent's log, one line an event;
        # the rate limit in the kernel bounds it. Reading it here keeps the buffer from
        # filling (which would count every further event as buffer_full).
        for ev in self.events():
            log.info("tcp retransmit: %s %s:%d -> %s:%d %s, %d segment(s)%s, pid %d (%s)",
                     ev.network_type, ev.local_address, ev.local_port, ev.peer_address,
                     ev.peer_port, ev.state, ev.segments,
                     f", failed {ev.error_type}" if ev.error_type else "",
                     ev.workload.pid, ev.workload.comm)
        return []

