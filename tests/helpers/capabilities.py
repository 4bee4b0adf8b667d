"""Running the agent with a chosen set of capabilities, and CPU-bound helpers whose stacks
only a given capability lets the agent symbolize.

`with_capabilities(caps)` is the argv prefix that runs `python -m otel_ebpf` as uid 0
holding exactly `caps`: capsh (Debian libcap2-bin) drops every other capability from the
bounding set, and the exec of a uid 0 process then has exactly the bounding set as its
permitted and effective sets (none inheritable or ambient: this test process has none).

Each `Scenario` is a `cpu_hot` copy named after it, started so that one capability of the
agent's list is what its frames need (the others being held); its folded stacks, first
field its name, hold `marker` once symbolized.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from otel_ebpf.kernel.capabilities import BITS
from tests.helpers.processes import paused

NOBODY = 65534


def with_capabilities(caps: Iterable[str]) -> list[str]:
    """argv prefix: this interpreter's `-m otel_ebpf` as uid 0 holding exactly `caps`
    (["BPF", "PERFMON", ...]); append the subcommand and its arguments."""
    capsh = shutil.which("capsh")
    if capsh is None:
        raise RuntimeError("capsh is missing: run `make test-deps` (deploy/host-setup.sh "
                           "--test installs Debian's libcap2-bin)")
    keep = {BITS[name] for name in caps}
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    drop = ",".join(str(bit) for bit in range(last + 1) if bit not in keep)
    return [capsh, f"--drop={drop}", f"--shell={sys.executable}", "--", "-m", "otel_ebpf"]


def capability_sets(pid: int) -> dict[str, int]:
    """CapInh, CapPrm, CapEff, CapBnd, CapAmb of a process, as masks."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Cap"):
            out[key] = int(value, 16)
    return out


def mask(caps: Iterable[str]) -> int:
    return sum(1 << BITS[name] for name in caps)


@dataclass(frozen=True)
class Scenario:
    capability: str
    name: str  # the process's name, first in its folded stacks
    marker: str  # in its folded stacks once symbolized
    why: str


SCENARIOS = {s.capability: s for s in (
    Scenario("SYS_PTRACE", "hot_mntns", ";main;hot_a",
             "its binary is only in its own mount namespace, as in a container"),
    Scenario("SYSLOG", "hot_kernel", "_[k]",
             "it spends its time in write(2), in the kernel"),
    Scenario("DAC_READ_SEARCH", "hot_private", ";main;hot_a",
             "its binary is another user's, mode 0700"),
    Scenario("CHECKPOINT_RESTORE", "hot_deleted", ";main;hot_a",
             "its binary was deleted before it ran, as after an upgrade"),
)}


@contextlib.contextmanager
def held(cpu_hot: Path, workdir: Path, scenarios: Iterable[Scenario]) -> Iterator[None]:
    """Each scenario's helper (4 s) runs for two seconds, then is held stopped for the
    block (tests.helpers.processes.paused: the agent reads it however late its drain);
    wait in the block for what the agent made of them."""
    procs: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as cleanup:
        try:
            for scenario in scenarios:
                procs.append(_start(scenario.name, cpu_hot, workdir, "4", cleanup))
            with paused(procs, 2):
                yield
        finally:
            for proc in procs:
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    assert [p.returncode for p in procs] == [0] * len(procs)


def _start(name: str, cpu_hot: Path, workdir: Path, seconds: str,
           cleanup: contextlib.ExitStack) -> subprocess.Popen[bytes]:
    quiet = {"stdout": subprocess.DEVNULL}
    if name == "hot_mntns":  # a tmpfs over an empty directory, seen by it alone
        mount_point = workdir / "mntns"
        mount_point.mkdir()
        return subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             'mount -t tmpfs tmpfs "$1" && cp "$2" "$1/hot_mntns" && '
             'exec "$1/hot_mntns" split "$3"', "sh", str(mount_point), str(cpu_hot), seconds],
            **quiet)
    if name == "hot_kernel":
        binary = Path(shutil.copy(cpu_hot, workdir / name))
        return subprocess.Popen([str(binary), "syscalls", seconds], **quiet)
    if name == "hot_private":  # below /tmp: the test's own directories are root's, 0700
        directory = Path(tempfile.mkdtemp(prefix="otel-ebpf-private-", dir="/tmp"))
        cleanup.callback(shutil.rmtree, directory, ignore_errors=True)
        directory.chmod(0o755)
        binary = Path(shutil.copy(cpu_hot, directory / name))
        os.chown(binary, NOBODY, NOBODY)
        binary.chmod(0o700)
        return subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                                 "--clear-groups", str(binary), "split", seconds], **quiet)
    if name == "hot_deleted":  # exec'd through an fd: deleted before its first instruction
        (workdir / "deleted").mkdir()
        binary = Path(shutil.copy(cpu_hot, workdir / "deleted" / name))
        fd = os.open(binary, os.O_RDONLY)
        try:
            binary.unlink()
            # through a link of the same name: a task's name is the base name exec'd
            (workdir / name).symlink_to(f"/proc/self/fd/{fd}")
            return subprocess.Popen([str(workdir / name), "split", seconds], pass_fds=(fd,),
                                    **quiet)
        finally:
            os.close(fd)
    raise ValueError(name)


def folded_of(folded: Path, name: str) -> list[str]:
    """The folded stacks (`name;frame;... count`) of the processes called `name`."""
    try:
        text = folded.read_text()
    except FileNotFoundError:
        return []
    return [line for line in text.splitlines() if line.split(";", 1)[0] == name]
