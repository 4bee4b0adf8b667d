"""What the symbolizer and the unwinder read of a process in /proc, with as few system
calls as it takes: a new process costs these reads, and a churn of short-lived ones makes
them add up (Path.read_text takes 6-7 calls where open, read and close do)."""

from __future__ import annotations

import os

Identity = tuple[int, int, int]  # start time, the executable's device and inode
NO_EXECUTABLE = (0, 0)  # the (device, inode) of a process without a reachable executable


def read(path: str) -> str:
    """The whole text of a /proc file (OSError when the process is gone)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode(errors="replace")


def start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot): a reused pid changes it."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        try:
            stat = os.read(fd, 4096)  # ~300 bytes: the comm is at most 64
        finally:
            os.close(fd)
        return int(stat[stat.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def identity(pid: int) -> Identity | None:
    """(start time, executable's device, inode): a reused pid or an exec changes it.
    (start time, *NO_EXECUTABLE) for a kernel thread or an executable that cannot be
    reached; None when the process is gone."""
    started = start_time(pid)
    if started is None:
        return None
    try:
        exe = os.stat(f"/proc/{pid}/exe")
    except OSError:
        return started, *NO_EXECUTABLE
    return started, exe.st_dev, exe.st_ino
