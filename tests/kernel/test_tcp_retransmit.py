"""The TCP retransmit probe against the kernel's own count, in a private lossy namespace.

Client and server run inside a network namespace the test makes (loopback only, nothing
leaves it), where nftables drops ~5 % of the packets to the server port. The namespace's
RetransSegs (/proc/net/snmp) is the truth. The loopback MTU is set to Ethernet's 1500 so
that GSO packs ~45 segments into one buffer, as on a real NIC (at loopback's default 64 KiB
MTU every buffer is one segment and a naive tracepoint-hit counter would be right by
accident); offload settings stay at their defaults.

The drained counts go through the same store, OTLP builder and encoder as the daemon's,
so the assertions are on exported data points.
"""

from __future__ import annotations

import ctypes as ct
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics

from otel_ebpf.aggregate import CumulativeStore
from otel_ebpf.enrich.process import ProcessEnricher
from otel_ebpf.export.metrics import build_metrics_data
from otel_ebpf.kernel import headers
from otel_ebpf.kernel.engine import Engine
from otel_ebpf.model import Identity, Workload
from otel_ebpf.probes import tcp_retransmit as tr
from otel_ebpf.probes.tcp_retransmit import TcpRetransmit, TcpRetransmitConfig, TcpRetransmitEvents
from tests.helpers.netns import Netns, NetnsUnavailable, leftover_namespaces, lossy_netns

pytestmark = pytest.mark.kernel

HELPER = Path(__file__).parents[1] / "helpers" / "tcp_transfer.py"
NBYTES = 32 * 1024 * 1024
LO_MTU = 1500
DROP_PERCENT = 5
POINT_KEYS = ("process.pid", "process.executable.name")


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(headers.discover())


@pytest.fixture(autouse=True)
def _no_namespace_left_behind() -> Iterator[None]:
    before = set(leftover_namespaces())
    yield
    assert set(leftover_namespaces()) <= before, "a test namespace was not removed"


@pytest.fixture
def port() -> int:
    # the namespace is private: any port is free; a random one keeps the host's other
    # loopback traffic from ever matching the filters below
    return random.randint(20000, 60000)


@contextmanager
def started(engine: Engine, config: TcpRetransmitConfig) -> Iterator[TcpRetransmit]:
    probe = TcpRetransmit(config)
    probe.start(engine)
    try:
        yield probe
    finally:
        probe.stop()


@contextmanager
def namespace(port: int, **kwargs: int) -> Iterator[Netns]:
    try:
        with lossy_netns(port, **kwargs) as ns:
            yield ns
    except NetnsUnavailable as exc:
        pytest.fail(f"cannot make the test namespace: {exc}")


@dataclass
class Run:
    client_pid: int
    client_ports: list[int]
    server_pid: int
    delta: dict[str, int]  # the namespace's counters, after - before
    seconds: float

    @property
    def truth(self) -> int:
        """Segments the kernel retransmitted: RetransSegs also counts the attempts that
        failed after it counted them (TCPRetransFail); the probe counts those apart."""
        return self.delta["Tcp.RetransSegs"] - self.delta["TcpExt.TCPRetransFail"]


def transfer(ns: Netns, server_host: str, client_host: str, *, nbytes: int = NBYTES,
             connections: int = 1, echo: bool = False) -> Run:
    before = ns.counters()
    began = time.monotonic()
    server = ns.popen([sys.executable, str(HELPER), "server", server_host, str(ns.port),
                       str(connections), *(["echo"] if echo else [])], stdout=subprocess.PIPE)
    assert server.stdout is not None
    listening = server.stdout.readline().split()
    assert listening[0] == "listening", listening
    client = ns.popen([sys.executable, str(HELPER), "client", client_host, str(ns.port),
                       str(nbytes), str(connections)], stdout=subprocess.PIPE)
    out, _ = client.communicate(timeout=60)
    server_out, _ = server.communicate(timeout=60)
    lines = out.splitlines()
    echoed = nbytes * connections if echo else 0
    assert lines[-1] == f"sent {nbytes * connections} received {echoed}"
    assert server_out.strip() == f"received {nbytes * connections}"
    connected = [line.split() for line in lines if line.startswith("connected")]
    # `ip netns exec` execs in place: the pid Popen knows is the one the helper reports
    assert {int(c[1]) for c in connected} == {client.pid}
    ns.wait_settled()  # FINs still waiting for their ACK may yet be retransmitted
    after = ns.counters()
    return Run(client.pid, [int(c[3]) for c in connected], int(listening[1]),
               {k: after[k] - before.get(k, 0) for k in after}, time.monotonic() - began)


def exported(probe: TcpRetransmit, start_ns: int) -> list[tuple[str, dict[str, object], int]]:
    """Drain, fold, build and encode as the daemon does: (metric, point attributes, value)
    for every data point of the probe's metrics."""
    store = CumulativeStore()
    store.add(probe.collect().records, start_ns, time.time_ns())
    processes = ProcessEnricher()

    def identity_of(w: Workload) -> Identity:
        # the daemon's resolver minus containers: the process on the resource and points
        attrs = dict(processes.lookup(w).attributes()) if w.pid > 0 else {}
        return Identity(attrs, {k: attrs[k] for k in POINT_KEYS if k in attrs})

    request = encode_metrics(build_metrics_data(store.series(), identity_of))
    out = []
    for rm in request.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name not in (tr.RETRANSMITS.name, tr.RETRANSMIT_FAILURES.name):
                    continue
                assert metric.unit == "{segment}"
                assert metric.sum.is_monotonic
                assert metric.sum.aggregation_temporality == 2  # CUMULATIVE
                for p in metric.sum.data_points:
                    attrs = {kv.key: getattr(kv.value, kv.value.WhichOneof("value"))
                             for kv in p.attributes}
                    out.append((metric.name, attrs, p.as_int))
    return out


def ours(points: list[tuple[str, dict[str, object], int]], port: int, metric: str
         ) -> list[tuple[dict[str, object], int]]:
    return [(a, v) for m, a, v in points if m == metric
            and port in (a.get("network.local.port"), a.get("network.peer.port"))]


def report(label: str, run: Run, exported_segments: int, hits: int) -> None:
    print(f"\n{label}: RetransSegs {run.delta['Tcp.RetransSegs']}, TCPRetransFail "
          f"{run.delta['TcpExt.TCPRetransFail']}, exported {exported_segments}, tracepoint "
          f"hits {hits} ({100 * hits / max(1, exported_segments):.1f} % of the segments), "
          f"{run.seconds:.1f} s")


@pytest.mark.parametrize(("server_host", "client_host", "address", "net_type"), [
    ("127.0.0.1", "127.0.0.1", "127.0.0.1", "ipv4"),
    ("::1", "::1", "::1", "ipv6"),
    # a dual-stack AF_INET6 client socket: IPv4 on the wire, reported as IPv4
    ("127.0.0.1", "::ffff:127.0.0.1", "127.0.0.1", "ipv4"),
], ids=["ipv4", "ipv6", "ipv4-mapped"])
def test_segments_equal_the_kernels_count_per_connection_and_owner(
        engine: Engine, port: int, server_host: str, client_host: str, address: str,
        net_type: str) -> None:
    start_ns = time.time_ns()
    with started(engine, TcpRetransmitConfig(aggregation="connection", owner="process")) as probe:
        # the map layouts BCC compiled are the ones the decoder's mirrors describe
        assert probe._program is not None
        retransmits_map = probe._program.map("retransmits")
        assert ct.sizeof(retransmits_map.key_type) == ct.sizeof(tr.ConnKey)
        assert ct.sizeof(retransmits_map.value_type) == ct.sizeof(tr.ConnValue)
        before = probe.counters()
        with namespace(port, drop_percent=DROP_PERCENT, lo_mtu=LO_MTU) as ns:
            run = transfer(ns, server_host, client_host)
        hits = probe.counters()["hits"] - before["hits"]
        points = exported(probe, start_ns)
        after = probe.counters()

    retransmits = ours(points, port, tr.RETRANSMITS.name)
    total = sum(v for _, v in retransmits)
    report(f"{net_type} {client_host}", run, total, hits)
    assert run.delta["Tcp.RetransSegs"] > 300, "the drop rule did not bite"
    assert run.delta["TcpExt.TCPRetransFail"] == 0
    assert ours(points, port, tr.RETRANSMIT_FAILURES.name) == []
    assert abs(total - run.truth) <= 0.01 * run.truth, (total, run.delta, retransmits)
    # a counter of tracepoint hits would be far off: GSO buffers carry ~45 segments here
    assert hits < 0.2 * total, (hits, total)
    assert after["pcount_unreadable"] == before["pcount_unreadable"]

    (client_port,) = run.client_ports
    client = [(a, v) for a, v in retransmits if a["network.local.port"] == client_port]
    assert sum(v for _, v in client) >= 0.9 * run.truth  # the data went client -> server
    for attrs, _ in client:
        assert attrs["network.type"] == net_type
        assert attrs["network.local.address"] == address
        assert attrs["network.peer.address"] == address
        assert attrs["network.peer.port"] == port
        assert attrs["process.pid"] == run.client_pid
        assert attrs["linux.tcp.state"] in ("syn_sent", "established", "fin_wait_1")
    for attrs, _ in retransmits:  # the server's FIN, if its ACK was dropped
        assert attrs["process.pid"] in (run.client_pid, run.server_pid), attrs
        if attrs["process.pid"] == run.server_pid:
            assert attrs["network.local.port"] == port


def test_failed_attempts_are_counted_apart_with_their_errno(engine: Engine, port: int) -> None:
    """An output rule refuses some packets as they are sent: those retransmissions fail
    with EPERM. The kernel counts them in RetransSegs and in TCPRetransFail."""
    start_ns = time.time_ns()
    with started(engine, TcpRetransmitConfig(aggregation="connection", owner="process")) as probe:
        with namespace(port, drop_percent=DROP_PERCENT, output_drop_percent=20,
                       lo_mtu=LO_MTU) as ns:
            run = transfer(ns, "127.0.0.1", "127.0.0.1")
        points = exported(probe, start_ns)

    retransmits = sum(v for _, v in ours(points, port, tr.RETRANSMITS.name))
    failures = ours(points, port, tr.RETRANSMIT_FAILURES.name)
    refused = sum(v for a, v in failures if a["error.type"] == "EPERM")
    print(f"\nfailures: RetransSegs {run.delta['Tcp.RetransSegs']}, TCPRetransFail "
          f"{run.delta['TcpExt.TCPRetransFail']}, exported retransmits {retransmits}, "
          f"failures {sum(v for _, v in failures)} (EPERM {refused})")
    assert run.delta["TcpExt.TCPRetransFail"] > 0, "no retransmission was refused"
    assert abs(retransmits - run.truth) <= 0.01 * run.truth
    assert abs(refused - run.delta["TcpExt.TCPRetransFail"]) <= (
        0.01 * run.delta["TcpExt.TCPRetransFail"])
    for attrs, _ in failures:
        assert attrs["process.pid"] == run.client_pid
        assert attrs["network.local.port"] in run.client_ports


def test_default_peer_aggregation_keeps_no_ephemeral_port(engine: Engine, port: int) -> None:
    """Both directions lose packets; two connections from one client. Per peer, the
    client's series name the server's port and the server's series name its own port:
    neither carries an ephemeral port, so the two connections make one series a side."""
    start_ns = time.time_ns()
    with started(engine, TcpRetransmitConfig(owner="process")) as probe:
        assert probe.config.aggregation == "peer"
        with namespace(port, drop_percent=DROP_PERCENT, reply_drop_percent=DROP_PERCENT,
                       lo_mtu=LO_MTU) as ns:
            run = transfer(ns, "127.0.0.1", "127.0.0.1", nbytes=NBYTES // 2, connections=2,
                           echo=True)
        points = exported(probe, start_ns)

    retransmits = ours(points, port, tr.RETRANSMITS.name)
    total = sum(v for _, v in retransmits)
    print(f"\npeer: RetransSegs {run.delta['Tcp.RetransSegs']}, exported {total}, series "
          f"{[(a['process.pid'], a['linux.tcp.state'], v) for a, v in retransmits]}")
    assert abs(total - run.truth) <= 0.01 * run.truth
    client = [(a, v) for a, v in retransmits if a["process.pid"] == run.client_pid]
    server = [(a, v) for a, v in retransmits if a["process.pid"] == run.server_pid]
    assert client and server
    assert len(client) + len(server) == len(retransmits)
    for attrs, _ in client:
        assert attrs.keys() == {"network.type", "network.peer.address", "network.peer.port",
                                "linux.tcp.state", "process.pid", "process.executable.name",
                                }, attrs
        assert (attrs["network.peer.address"], attrs["network.peer.port"]) == ("127.0.0.1",
                                                                               port)
    for attrs, _ in server:
        assert "network.peer.port" not in attrs, attrs
        assert (attrs["network.peer.address"], attrs["network.local.port"]) == ("127.0.0.1",
                                                                                port)
    # one series per (side, state) although there were two connections
    assert len({a["linux.tcp.state"] for a, _ in client}) == len(client)
    assert len({a["linux.tcp.state"] for a, _ in server}) == len(server)


def test_handshake_retransmits_belong_to_the_connecting_and_listening_processes(
        engine: Engine, port: int) -> None:
    """Every SYN-ACK is lost: the client retransmits its SYN and the server its SYN-ACK,
    both from timers, in no process's context. The owners were recorded at connect() and
    listen(); the SYN-ACKs (another tracepoint) are in the kernel's count too."""
    start_ns = time.time_ns()
    with started(engine, TcpRetransmitConfig(owner="process")) as probe:
        with namespace(port, drop_percent=0, reply_drop_percent=100) as ns:
            before = ns.counters()
            server = ns.popen([sys.executable, str(HELPER), "server", "127.0.0.1", str(port)],
                              stdout=subprocess.PIPE)
            assert server.stdout is not None
            assert server.stdout.readline().split() == ["listening", str(server.pid)]
            client = ns.popen([sys.executable, str(HELPER), "connect", "127.0.0.1",
                               str(port), "2.5"], stdout=subprocess.PIPE)
            out, _ = client.communicate(timeout=30)
            assert out.split() == ["connecting", str(client.pid), "timeout"]
            delta = ns.counters()["Tcp.RetransSegs"] - before["Tcp.RetransSegs"]
        points = exported(probe, start_ns)

    retransmits = ours(points, port, tr.RETRANSMITS.name)
    print(f"\nhandshake: RetransSegs {delta}, exported {retransmits}")
    assert sum(v for _, v in retransmits) == delta
    by_pid = {a["process.pid"]: (a, v) for a, v in retransmits}
    assert by_pid.keys() == {client.pid, server.pid}
    syn, syns = by_pid[client.pid]
    assert syns >= 1  # once after 1 s (again only after 3 s)
    assert syn["linux.tcp.state"] == "syn_sent"
    assert (syn["network.peer.address"], syn["network.peer.port"]) == ("127.0.0.1", port)
    assert "network.local.port" not in syn  # the client's ephemeral port: not kept per peer
    synack, synacks = by_pid[server.pid]
    assert synacks >= 1
    assert synack["linux.tcp.state"] == "syn_received"
    assert (synack["network.peer.address"], synack["network.local.port"]) == ("127.0.0.1",
                                                                              port)
    assert "network.peer.port" not in synack  # the client's ephemeral port, again


def test_event_stream_is_rate_limited_in_the_kernel(engine: Engine, port: int) -> None:
    rate = 5  # a slow machine's 3 s transfer still makes well over 5 + 3 * 5 attempts
    config = TcpRetransmitConfig(aggregation="connection", owner="process",
                                 events=TcpRetransmitEvents(enabled=True, rate_per_second=rate))
    with started(engine, config) as probe:
        burst = probe.event_burst
        before = probe.counters()
        with namespace(port, drop_percent=DROP_PERCENT, lo_mtu=LO_MTU) as ns:
            run = transfer(ns, "127.0.0.1", "127.0.0.1", nbytes=NBYTES // 2, connections=4)
        events = probe.events()
        after = probe.counters()

    hits = after["hits"] - before["hits"]
    limited = after["rate_limited"] - before["rate_limited"]
    print(f"\nevents: {len(events)} of {hits} attempts in {run.seconds:.1f} s, {limited} "
          f"refused by the limit (rate {rate}/s, burst {burst})")
    # every attempt was either streamed or refused: nothing vanished
    assert len(events) + limited + after["buffer_full"] - before["buffer_full"] == hits
    assert limited > 0 and len(events) >= burst
    # GCRA: at most burst + rate * (t_j - t_i) events in any span [t_i, t_j]
    times = sorted(e.time_unix_ns for e in events)
    for i in range(len(times)):
        for j in range(i, len(times)):
            assert j - i + 1 <= burst + rate * (times[j] - times[i]) / 1e9 + 1e-6, (i, j)
    mine = [e for e in events if port in (e.local_port, e.peer_port)]
    assert mine
    for e in mine:
        assert e.local_port in run.client_ports or e.local_port == port
        if e.local_port in run.client_ports:
            assert (e.network_type, e.local_address, e.peer_address, e.peer_port) == (
                "ipv4", "127.0.0.1", "127.0.0.1", port)
            assert e.workload.pid == run.client_pid
            assert e.segments >= 1 and e.error_type is None
    assert abs(times[-1] - time.time_ns()) < 120e9  # wall clock, not monotonic


@pytest.mark.parametrize("aggregation", ["connection", "peer", "workload"])
@pytest.mark.parametrize("events", [False, True])
def test_every_variant_passes_the_verifier(engine: Engine, aggregation: str,
                                          events: bool) -> None:
    config = TcpRetransmitConfig(aggregation=aggregation,  # type: ignore[arg-type]
                                 events=TcpRetransmitEvents(enabled=events))
    TcpRetransmit(config).verify(engine)


def test_default_owner_is_the_workload(engine: Engine, port: int) -> None:
    """By default the counts belong to the owner's workload: no pid, the executable's name
    (the helpers are Python), and every segment still counted."""
    start_ns = time.time_ns()
    with started(engine, TcpRetransmitConfig()) as probe:
        assert probe.config.owner == "workload"
        with namespace(port, drop_percent=DROP_PERCENT, lo_mtu=LO_MTU) as ns:
            run = transfer(ns, "127.0.0.1", "127.0.0.1")
        points = exported(probe, start_ns)
    retransmits = ours(points, port, tr.RETRANSMITS.name)
    assert abs(sum(v for _, v in retransmits) - run.truth) <= 0.01 * run.truth
    python = os.path.basename(os.path.realpath(sys.executable))
    for attrs, _ in retransmits:
        assert "process.pid" not in attrs, attrs
        assert attrs["process.executable.name"] == python, attrs
