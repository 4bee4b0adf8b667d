"""Helper processes a test holds until the agent has seen them, and their CPU time.

Why hold them: on a loaded machine the agent's drain can come after a short helper has
exited, and a process gone before its mappings were read is sampled but never symbolized
(the agent reads them when it first sees the process, or at the drain). A helper stopped
half-way (SIGSTOP) stays readable for as long as the test waits for what the agent made of
it, then runs to its end.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path


@contextlib.contextmanager
def paused(procs: Sequence[subprocess.Popen[bytes]], after: float) -> Iterator[None]:
    """Let `procs` run for `after` seconds, stop them for the block, then let them go on."""
    try:
        time.sleep(after)
        for proc in procs:
            proc.send_signal(signal.SIGSTOP)
        yield
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGCONT)


def reap(proc: subprocess.Popen[bytes]) -> float:
    """Wait for `proc` to exit (its returncode set); the CPU seconds it used."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return float(usage.ru_utime + usage.ru_stime)


def sleeping(pid: int) -> bool:
    """Whether the process is asleep in the kernel (state S: blocked in a call)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "S"
