"""cgroup v2 facts the probes and the workload filter need: where the v2 hierarchy is
mounted, its tree, and the id the kernel reports for a cgroup (bpf_get_current_cgroup_id
is the inode of its directory)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_ROOT = Path("/sys/fs/cgroup")


def cgroup2_mounts(mounts: Path = Path("/proc/self/mounts")) -> list[Path]:
    """Where cgroup2 is mounted, in mount order."""
    try:
        lines = mounts.read_text().splitlines()
    except OSError:
        return []
    return [Path(f[1]) for f in (line.split() for line in lines)
            if len(f) > 2 and f[2] == "cgroup2"]


def cgroup2_root(mounts: Path = Path("/proc/self/mounts")) -> Path:
    """The cgroup2 mount: /sys/fs/cgroup on unified hosts, /sys/fs/cgroup/unified on
    hybrid ones."""
    return next(iter(cgroup2_mounts(mounts)), DEFAULT_ROOT)


def cgroup_id(spec: int | str, root: Path | None = None) -> int:
    """A cgroup id given as an id, an absolute path, or a path below the cgroup2 root."""
    if isinstance(spec, int):
        return spec
    path = Path(spec)
    if not path.is_absolute():
        path = (root or cgroup2_root()) / spec
    try:
        return os.stat(path).st_ino
    except OSError as exc:
        raise ValueError(f"cgroup {spec!r}: {path} is not readable ({exc.strerror}); give a "
                         "cgroup v2 directory or its numeric id") from exc


def scan_cgroup_tree(root: Path) -> dict[int, str]:
    """Every cgroup below `root` (included) as inode -> path relative to it ("/", "/a/b").

    The inode is the id bpf_get_current_cgroup_id reports. Blocking: one getdents per
    cgroup directory and no stat per entry (DirEntry.inode and is_dir come from readdir),
    so run it in an executor. Directories that vanish mid-walk are skipped: containers come
    and go while we read.
    """
    try:
        found = {os.stat(root).st_ino: "/"}
    except OSError:
        return {}
    stack = [(str(root), "")]
    while stack:
        directory, relative = stack.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        child = f"{relative}/{entry.name}"
                        found[entry.inode()] = child
                        stack.append((entry.path, child))
        except OSError:
            continue
    return found
