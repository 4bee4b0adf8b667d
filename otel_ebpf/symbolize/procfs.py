"""What the symbolizer and the unwinder read of a process in /proc, with as few system
calls as it takes: a new process costs these reads, and a churn of short-lived ones makes
them add up (Path.read_text takes 6-7 calls where open, read and close do)."""

from __future__ import annotations

import os

Identity = tuple[int, int, int]  # start time, the executable's device and inode
FileKey = tuple[int, int, int, int]  # a file's device, inode, mtime (ns) and size
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


def file_key(st: os.stat_result) -> FileKey:
    """What tells one file from another, a rewritten one included."""
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def mapped_file_key(pid: int, path: str, inode: int) -> FileKey | None:
    """The key of the file mapped from `path` in process `pid`, without opening it: a
    stat of the path as the process sees it (its container's root), when that still
    names the mapped inode; None when it does not (replaced or deleted since) or cannot
    be reached. A new file on a freed inode number (a program rebuilt) differs in mtime
    or size, so a key seen before names the same file."""
    try:
        st = os.stat(f"/proc/{pid}/root{path}")
    except (OSError, ValueError):
        return None
    return file_key(st) if st.st_ino == inode else None
