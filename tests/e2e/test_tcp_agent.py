"""The agent as a process counting TCP retransmits: a lossy transfer in a private network
namespace, the agent's OTLP through rotel to the sink, compared with the kernel's count.

The namespace (tests/helpers/netns.py) has only its loopback, with Ethernet's MTU so that
GSO packs many segments into one buffer, and nftables dropping ~5 % of the packets sent to
the server's port: nothing leaves it. Its RetransSegs is the truth. The agent runs on the
host, where its programs see every namespace's sockets.
"""

from __future__ import annotations

import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.agent_config import agent_config
from tests.e2e.test_agent import AgentProcess
from tests.helpers.netns import Netns, NetnsUnavailable, leftover_namespaces, lossy_netns
from tests.peers.otlp_sink import OtlpSink, attrs_to_dict
from tests.peers.rotel import RotelCollector

pytestmark = [pytest.mark.e2e, pytest.mark.kernel]

HELPER = Path(__file__).parents[1] / "helpers" / "tcp_transfer.py"
NBYTES = 20 * 1024 * 1024
LO_MTU = 1500
DROP_PERCENT = 5
METRIC = "linux.tcp.retransmits"


@dataclass
class Transfer:
    client_pid: int
    client_port: int
    server_pid: int
    retrans_segs: int
    retrans_fail: int


@pytest.fixture
def tcp_agent(tmp_path: Path, rotel: RotelCollector) -> Iterator[AgentProcess]:
    config = agent_config({"tcp_retransmit": {"interval": "1s", "aggregation": "connection",
                                              "owner": "process"}})
    agent = AgentProcess(tmp_path, "--export-interval", "1s", config_text=config,
                         env=rotel.grpc_env)
    try:
        yield agent
    finally:
        agent.kill()


@pytest.fixture
def no_namespace_left_behind() -> Iterator[None]:
    before = set(leftover_namespaces())
    yield
    assert set(leftover_namespaces()) <= before, "a test namespace was not removed"


def lossy_transfer(ns: Netns) -> Transfer:
    before = ns.counters()
    server = ns.popen([sys.executable, str(HELPER), "server", "127.0.0.1", str(ns.port)],
                      stdout=subprocess.PIPE)
    assert server.stdout is not None
    listening = server.stdout.readline().split()
    assert listening[0] == "listening", listening
    client = ns.popen([sys.executable, str(HELPER), "client", "127.0.0.1", str(ns.port),
                       str(NBYTES)], stdout=subprocess.PIPE)
    out, _ = client.communicate(timeout=30)
    server_out, _ = server.communicate(timeout=30)
    assert out.splitlines()[-1] == f"sent {NBYTES} received 0", out
    assert server_out.strip() == f"received {NBYTES}"
    (connected,) = [line.split() for line in out.splitlines() if line.startswith("connected")]
    assert int(connected[1]) == client.pid  # `ip netns exec` execs in place
    ns.wait_settled()  # a FIN waiting for its ACK could still be retransmitted
    after = ns.counters()
    return Transfer(client.pid, int(connected[3]), int(listening[1]),
                    after["Tcp.RetransSegs"] - before["Tcp.RetransSegs"],
                    after["TcpExt.TCPRetransFail"] - before["TcpExt.TCPRetransFail"])


def latest_series(sink: OtlpSink, local_port: int, peer_port: int
                  ) -> list[tuple[dict[str, Any], dict[str, Any], int]]:
    """(resource, point attributes, latest cumulative value) of every series of the
    connection between the two ports, from either end."""
    ends = {(local_port, peer_port), (peer_port, local_port)}
    latest: dict[tuple[Any, ...], tuple[dict[str, Any], dict[str, Any], int]] = {}
    for resource, point in sink.metrics_points(METRIC):
        attrs = attrs_to_dict(point.attributes)
        if (attrs.get("network.local.port"), attrs.get("network.peer.port")) not in ends:
            continue
        key = (tuple(sorted(resource.items())), tuple(sorted(attrs.items())))
        latest[key] = (resource, attrs, int(point.as_int))  # arrival order: the last wins
    return list(latest.values())


def test_agent_exports_the_kernels_retransmit_count_per_connection(
        tcp_agent: AgentProcess, otlp_sink: OtlpSink, no_namespace_left_behind: None) -> None:
    agent = tcp_agent
    agent.wait_for_log("probe tcp_retransmit attached")
    port = random.randint(20000, 60000)  # the namespace is private: any port is free
    try:
        with lossy_netns(port, drop_percent=DROP_PERCENT, lo_mtu=LO_MTU) as ns:
            began = time.monotonic()
            run = lossy_transfer(ns)
            took = time.monotonic() - began
    except NetnsUnavailable as exc:
        pytest.fail(f"cannot make the test namespace: {exc}")
    truth = run.retrans_segs - run.retrans_fail
    assert run.retrans_fail == 0
    assert truth > 200, f"the drop rule did not bite: RetransSegs {run.retrans_segs}"

    def total() -> int:
        return sum(v for _, _, v in latest_series(otlp_sink, run.client_port, port))

    otlp_sink.wait_for(lambda: total() == truth, timeout=10)
    series = latest_series(otlp_sink, run.client_port, port)
    exported = sum(v for _, _, v in series)
    print(f"\ntransfer {NBYTES >> 20} MiB in {took:.1f} s: RetransSegs {run.retrans_segs}, "
          f"exported {exported} in {len(series)} series "
          f"{[(a['process.pid'], a['linux.tcp.state'], v) for _, a, v in series]}")
    assert abs(exported - truth) <= 0.01 * truth, (exported, truth, series,
                                                   "".join(agent.stderr))

    client = [(r, a, v) for r, a, v in series if a["network.local.port"] == run.client_port]
    assert sum(v for _, _, v in client) >= 0.9 * truth  # the data went client -> server
    for resource, attrs, _ in client:
        assert attrs["network.type"] == "ipv4"
        assert attrs["network.local.address"] == "127.0.0.1"
        assert attrs["network.peer.address"] == "127.0.0.1"
        assert attrs["network.peer.port"] == port
        assert attrs["linux.tcp.state"] in ("syn_sent", "established", "fin_wait_1"), attrs
        assert attrs["process.pid"] == run.client_pid, (attrs, run)
        assert resource["host.name"] == socket.gethostname()
    for _, attrs, _ in series:
        if attrs["network.local.port"] == port:  # the server's FIN, if its ACK was lost
            assert attrs["process.pid"] == run.server_pid, (attrs, run)

    code, _ = agent.stop()
    log = "".join(agent.stderr)
    assert code == 0, log
    assert "Traceback" not in log
