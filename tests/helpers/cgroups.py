"""A cgroup v2 directory of a test's own, and running a helper inside it from its first
syscall: the machine is shared, and a probe's series (per workload) or kernel filter (per
cgroup) then holds this test's helpers and nothing else."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from otel_ebpf.kernel.cgroupfs import cgroup2_root


@contextlib.contextmanager
def own_cgroup(tag: str) -> Iterator[Path]:
    """A fresh cgroup below the v2 root, removed at exit (once its helpers are gone)."""
    path = cgroup2_root() / f"otel-ebpf-{tag}-{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir()
    try:
        yield path
    finally:
        deadline = time.monotonic() + 5
        while True:
            try:
                path.rmdir()
                break
            except OSError:  # a helper still exiting
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def run_in(cgroup: Path, argv: Sequence[str | Path], timeout: float = 60) -> tuple[int, str]:
    """Run argv inside `cgroup` from its first syscall on (the shell joins the cgroup,
    then execs it: same pid); its pid and output."""
    proc = subprocess.Popen(["sh", "-c", 'echo $$ > "$1" && shift && exec "$@"', "sh",
                             str(cgroup / "cgroup.procs"), *map(str, argv)],
                            stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return proc.pid, out
