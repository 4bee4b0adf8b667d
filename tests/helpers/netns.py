"""A private network namespace that loses packets, for TCP retransmit tests.

`lossy_netns(port)` makes a namespace with `ip netns add`, brings its loopback up and loads
an nftables table inside it that drops a share of the TCP packets sent to `port` (input
hook: the sender saw them leave, so TCP retransmits them, as on a lossy link). Optionally
an output-hook rule drops a share of them as they are sent, which the sender sees as a
failed transmission (-EPERM), and an input rule drops a share of the server's replies.
Nothing leaves the namespace: it has no other interface.

Everything is removed on exit, also when the test fails: the processes started through
it, then the namespace (and the nftables table, which lives inside it).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

PREFIX = "otel-ebpf-tcp-"


class NetnsUnavailable(Exception):
    """The host cannot make the namespace (no `ip`, no `nft`, no privileges)."""


def _nft_rules(port: int, input_drop: int, output_drop: int, reply_drop: int) -> str:
    rules: dict[str, list[str]] = {"input": [], "output": []}
    for hook, match, percent in (("input", "dport", input_drop), ("output", "dport", output_drop),
                                 ("input", "sport", reply_drop)):
        if percent > 0:
            share = f"numgen random mod 100 lt {percent} " if percent < 100 else ""
            rules[hook].append(f"        meta l4proto tcp tcp {match} {port} {share}drop\n")
    chains = "".join(
        f"    chain {hook} {{\n"
        f"        type filter hook {hook} priority 0; policy accept;\n" + "".join(lines) +
        "    }\n"
        for hook, lines in rules.items() if lines)
    return "table inet otel_ebpf_test {\n" + chains + "}\n"


@dataclass
class Netns:
    name: str
    port: int
    _procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` as run inside the namespace. `ip netns exec` execs it in place, so the
        process's pid is the one Popen reports."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 30,
            **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(argv), check=check, timeout=timeout, text=True,
                              capture_output=True, **kwargs)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
        """Start a process inside; it is killed at cleanup if still running."""
        proc: subprocess.Popen[str] = subprocess.Popen(self.argv(argv), text=True, **kwargs)
        self._procs.append(proc)
        return proc

    def counters(self) -> dict[str, int]:
        """The namespace's SNMP and TcpExt counters ("Tcp.RetransSegs",
        "TcpExt.TCPRetransFail", ...): each namespace has its own."""
        out: dict[str, int] = {}
        for table in ("/proc/net/snmp", "/proc/net/netstat"):
            lines = self.run(["cat", table]).stdout.splitlines()
            for names, values in zip(lines[::2], lines[1::2], strict=False):
                group, _, keys = names.partition(":")
                _, _, nums = values.partition(":")
                for key, num in zip(keys.split(), nums.split(), strict=False):
                    out[f"{group}.{key}"] = int(num)
        return out

    def tcp_sockets(self) -> list[tuple[str, str, str]]:
        """(state, local, peer) of every TCP socket in the namespace."""
        lines = self.run(["ss", "-Htan"]).stdout.splitlines()
        return [(f[0], f[3], f[4]) for f in (line.split() for line in lines) if len(f) >= 5]

    def wait_settled(self, timeout: float = 20.0) -> None:
        """Until every TCP socket is listening or in TIME-WAIT: nothing is left that
        could still retransmit (a FIN waiting for its ACK, say)."""
        deadline = time.monotonic() + timeout
        while True:
            busy = [s for s in self.tcp_sockets() if s[0] not in ("LISTEN", "TIME-WAIT")]
            if not busy:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"TCP sockets in {self.name} still busy: {busy}")
            time.sleep(0.05)

    def _kill_all(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        # Anything else still inside was started by us (the namespace is ours): by pid.
        pids = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True,
                              text=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)


@contextlib.contextmanager
def lossy_netns(port: int, drop_percent: int = 5, *, output_drop_percent: int = 0,
                reply_drop_percent: int = 0, lo_mtu: int | None = None) -> Iterator[Netns]:
    """A namespace whose loopback drops `drop_percent` % of the TCP packets to `port`
    on input, `output_drop_percent` % of them on output, and `reply_drop_percent` % of
    the packets *from* `port` on input. `lo_mtu` changes the loopback MTU (offload
    settings are left at their defaults either way)."""
    name = f"{PREFIX}{os.getpid()}-{port}"
    try:
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True,
                       text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        raise NetnsUnavailable(f"ip netns add {name}: {detail}") from exc
    ns = Netns(name, port)
    try:
        ns.run(["ip", "link", "set", "lo", "up"])
        if lo_mtu is not None:
            ns.run(["ip", "link", "set", "lo", "mtu", str(lo_mtu)])
        try:
            ns.run(["nft", "-f", "-"], input=_nft_rules(port, drop_percent, output_drop_percent,
                                                        reply_drop_percent))
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", "") or exc
            raise NetnsUnavailable(f"nft in {name}: {detail}") from exc
        yield ns
    finally:
        try:
            ns._kill_all()
        finally:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def leftover_namespaces() -> list[str]:
    """Namespaces this helper made that still exist (any test run's)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]
