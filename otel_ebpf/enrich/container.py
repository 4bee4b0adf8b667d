"""Container and pod identity from cgroup paths.

Every container runtime names the cgroup it puts a container in after the container id,
and the kubelet names pod cgroups after the pod UID, so the path alone says which container
and pod a process belongs to — without asking any runtime. The BPF side records the cgroup
v2 id (the cgroup directory's inode); `CgroupPaths` maps it back to a path, which still
works after the process exited. /proc/<pid>/cgroup is the fallback (and the only way on
hybrid hosts where a runtime placed the container in v1 hierarchies only).

Paths must be read from the host's cgroup namespace: in a private one the kernel shows them
relative to the reader (`/../../kubepods-...`), which parses, and the agent's cgroup2 mount
would show only its own subtree, which does not.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from otel_ebpf.kernel.cgroupfs import cgroup2_root, scan_cgroup_tree

_ID = r"[0-9a-f]{64}"
# <prefix>-<id>.scope from the systemd driver; CRI-O and podman use <prefix>-<id> with the
# cgroupfs driver too. Conmon scopes (crio-conmon-<id>, libpod-conmon-<id>) hold the
# runtime's monitor, not the container, and do not match: "conmon-" is not hex.
_SCOPED = re.compile(rf"(docker|cri-containerd|crio|libpod|nerdctl)-({_ID})(?:\.scope)?",
                     re.IGNORECASE)
# cgroupfs driver: the bare id (/docker/<id>, /kubepods/burstable/pod<uid>/<id>)
_BARE = re.compile(_ID, re.IGNORECASE)
# runc's systemd form "slice:prefix:id" shows up literally when the runtime's and the
# kubelet's cgroup drivers disagree (/system.slice/containerd.service/<slice>:cri-containerd:<id>)
_COLON = re.compile(rf"(.+\.slice):([\w-]+):({_ID})", re.IGNORECASE)
# systemd: kubepods-burstable-pod<uid with _>.slice, cgroupfs: pod<uid>; static pods'
# UIDs are 32-hex config hashes
_POD = re.compile(r"(?:.*-)?pod([0-9a-f]{8}(?:[-_][0-9a-f]{4}){3}[-_][0-9a-f]{12}|[0-9a-f]{32})"
                  r"(?:\.slice)?", re.IGNORECASE)
_QOS_IN_SLICE = re.compile(r"kubepods-(burstable|besteffort)-pod")
_QOS_SEGMENTS = ("burstable", "besteffort")
_UNIT_SUFFIXES = (".service", ".scope")

_PREFIX_RUNTIME = {"docker": "docker", "cri-containerd": "containerd",
                   "nerdctl": "containerd", "crio": "cri-o", "libpod": "podman"}
# a bare id says which runtime only through its parent directory
_PARENT_RUNTIME = {"docker": "docker", "libpod_parent": "podman"}

K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class CgroupIdentity:
    """What a cgroup path says about its processes.

    `runtime` is docker, containerd, cri-o or podman for a container (None when the path
    does not say, e.g. kubepods with the cgroupfs driver), "systemd" for a process in a
    plain unit, else None. `container_id` is the innermost container (docker-in-docker,
    kind); `systemd_unit` is set only outside containers.
    """

    path: str
    runtime: str | None = None
    container_id: str | None = None  # 64 hex, lowercase
    pod_uid: str | None = None  # with dashes
    qos: str | None = None  # guaranteed, burstable, besteffort
    systemd_unit: str | None = None

    def attributes(self) -> dict[str, str]:
        attrs: dict[str, str] = {}
        if self.container_id:
            attrs["container.id"] = self.container_id
            if self.runtime:
                attrs["container.runtime.name"] = self.runtime
        if self.pod_uid:
            attrs["k8s.pod.uid"] = self.pod_uid
        return attrs

    @property
    def rank(self) -> tuple[bool, bool, bool]:
        """Which of two readings of one process says more."""
        return (self.container_id is not None, self.pod_uid is not None,
                self.systemd_unit is not None)


def _segments(path: str) -> list[str]:
    out: list[str] = []
    for seg in path.split("/"):
        if seg in ("", ".", ".."):
            continue
        if m := _COLON.fullmatch(seg):
            out += [m[1], f"{m[2]}-{m[3]}.scope"]
        else:
            out.append(seg)
    return out


def _container_at(segs: list[str], i: int) -> tuple[str | None, str] | None:
    if m := _SCOPED.fullmatch(segs[i]):
        return _PREFIX_RUNTIME[m[1].lower()], m[2].lower()
    if _BARE.fullmatch(segs[i]):
        return (_PARENT_RUNTIME.get(segs[i - 1]) if i else None), segs[i].lower()
    return None


def _pod_at(segs: list[str], i: int) -> tuple[str, str] | None:
    m = _POD.fullmatch(segs[i])
    if m is None or not any("kubepods" in s for s in segs[: i + 1]):
        return None
    if q := _QOS_IN_SLICE.search(segs[i]):
        qos = q[1]
    elif i and segs[i - 1] in _QOS_SEGMENTS:
        qos = segs[i - 1]
    else:
        qos = "guaranteed"  # the kubelet gives guaranteed pods no QoS level
    return m[1].lower().replace("_", "-"), qos


def parse_cgroup_path(path: str) -> CgroupIdentity:
    """One cgroup path (v2, or one v1 hierarchy's) -> what it says. Pure."""
    segs = _segments(path)
    container: tuple[str | None, str] | None = None
    container_index = len(segs)
    for i in range(len(segs) - 1, -1, -1):
        if (container := _container_at(segs, i)) is not None:
            container_index = i
            break
    pod = next((p for i in range(container_index - 1, -1, -1)
                if (p := _pod_at(segs, i)) is not None), None)
    pod_uid, qos = pod if pod else (None, None)
    if container is not None:
        return CgroupIdentity(path, container[0], container[1], pod_uid, qos)
    unit = next((s for s in reversed(segs) if s.endswith(_UNIT_SUFFIXES)), None)
    return CgroupIdentity(path, "systemd" if unit else None, None, pod_uid, qos, unit)


def parse_proc_cgroup(text: str) -> CgroupIdentity:
    """/proc/<pid>/cgroup -> the most telling of its lines: the v2 `0::` line first, then
    name=systemd, then the v1 controllers, whichever first names a container (else a pod,
    else a unit). Hybrid hosts need the v1 lines: runtimes there may leave the v2 path at
    the runtime's service."""
    readings: list[tuple[int, CgroupIdentity]] = []
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, sep, path = rest.partition(":")  # paths may hold ':' themselves
        if not sep:
            continue
        if hierarchy == "0" and not controllers:
            order = 0
        else:
            order = 1 if "name=systemd" in controllers.split(",") else 2
        readings.append((order, parse_cgroup_path(path)))
    if not readings:
        return CgroupIdentity("/")
    readings.sort(key=lambda r: r[0])
    return max((ident for _, ident in readings), key=lambda ident: ident.rank)


class CgroupPaths:
    """cgroup v2 id (inode, as bpf_get_current_cgroup_id reports it) -> path below the
    cgroup2 mount (/sys/fs/cgroup/unified on hybrid hosts).

    Blocking: a miss walks the whole cgroup2 tree (see `last_scan_seconds`), so call
    `lookup` from an executor. Misses rescan at most every `rescan_interval` seconds, since
    new containers appear all the time but a walk per unknown id would be too many.
    Ids of removed cgroups are kept (they are never reused) until `max_entries`.
    """

    def __init__(self, root: Path | None = None, *, rescan_interval: float = 2.0,
                 max_entries: int = 65536,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.root = root if root is not None else cgroup2_root()
        self.rescan_interval = rescan_interval
        self.max_entries = max_entries
        self.scans = 0
        self.last_scan_seconds = 0.0
        self._clock = clock
        self._paths: dict[int, str] = {}
        self._scanned_at: float | None = None
        self._lock = threading.Lock()  # one walk at a time when several executor threads miss

    def lookup(self, cgroup_id: int) -> str | None:
        path = self._paths.get(cgroup_id)
        if path is not None:
            return path
        with self._lock:
            if cgroup_id not in self._paths and self._may_rescan():
                self._rescan()
        return self._paths.get(cgroup_id)

    def exists(self, cgroup_id: int) -> bool | None:
        """Whether the cgroup is still there (its directory, with this id: a path
        recreated for a restarted unit has a new id); None: not known here (never seen,
        or outside this agent's view of the hierarchy). One stat, no walk."""
        path = self._paths.get(cgroup_id)
        if path is None:
            return None
        try:
            return os.stat(self.root / path.lstrip("/")).st_ino == cgroup_id
        except OSError:
            return False

    def _may_rescan(self) -> bool:
        return (self._scanned_at is None
                or self._clock() - self._scanned_at >= self.rescan_interval)

    def _rescan(self) -> None:
        started = time.perf_counter()
        fresh = scan_cgroup_tree(self.root)
        self.last_scan_seconds = time.perf_counter() - started
        self.scans += 1
        self._scanned_at = self._clock()
        # records of a collection can name cgroups removed since: keep the newest gone ones
        gone = [(i, p) for i, p in self._paths.items() if i not in fresh]
        room = max(0, self.max_entries - len(fresh))
        merged = dict(gone[-room:] if room else [])
        merged.update(list(fresh.items())[: self.max_entries])
        self._paths = merged  # one assignment: readers in other threads see old or new


class ContainerResolver:
    """(pid, cgroup id) -> CgroupIdentity, by the cgroup id first (it outlives the process)
    and /proc/<pid>/cgroup second. Blocking (/proc reads, tree walks): use an executor.

    Answers by cgroup id are cached for good (ids are not reused). Answers from /proc are
    cached per (pid, cgroup id) for `pid_ttl` seconds, bounding the harm of pid reuse, and
    served stale once the process is gone: its last identity is still the right one.
    """

    def __init__(self, paths: CgroupPaths | None = None, *, proc: Path = Path("/proc"),
                 max_entries: int = 65536, pid_ttl: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.paths = paths if paths is not None else CgroupPaths()
        self.max_entries = max_entries
        self.pid_ttl = pid_ttl
        self._proc = proc
        self._clock = clock
        self._by_id: dict[int, CgroupIdentity] = {}
        self._by_pid: dict[tuple[int, int], tuple[float, CgroupIdentity]] = {}

    def identify(self, pid: int, cgroup_id: int) -> CgroupIdentity | None:
        """None: neither the id nor /proc said anything (both gone or unreadable)."""
        by_id = self._from_id(cgroup_id) if cgroup_id else None
        if by_id is not None and (by_id.container_id or by_id.pod_uid):
            return by_id
        by_pid = self._from_proc(pid, cgroup_id) if pid > 0 else None
        if by_pid is not None and (by_id is None or by_pid.rank > by_id.rank):
            return by_pid
        return by_id

    def _from_id(self, cgroup_id: int) -> CgroupIdentity | None:
        ident = self._by_id.get(cgroup_id)
        if ident is None and (path := self.paths.lookup(cgroup_id)) is not None:
            ident = parse_cgroup_path(path)
            bounded_put(self._by_id, cgroup_id, ident, self.max_entries)
        return ident

    def _from_proc(self, pid: int, cgroup_id: int) -> CgroupIdentity | None:
        key = (pid, cgroup_id)
        cached = self._by_pid.get(key)
        now = self._clock()
        if cached is not None and now - cached[0] < self.pid_ttl:
            return cached[1]
        try:
            text = (self._proc / str(pid) / "cgroup").read_text()
        except OSError:
            return cached[1] if cached else None
        ident = parse_proc_cgroup(text)
        bounded_put(self._by_pid, key, (now, ident), self.max_entries)
        return ident


def bounded_put(cache: dict[K, V], key: K, value: V, limit: int) -> None:
    """Insert-ordered dict as a bounded cache: evicts the least recently stored entry."""
    cache.pop(key, None)  # re-insert at the end: eviction drops the least recently stored
    if len(cache) >= limit:
        cache.pop(next(iter(cache)))
    cache[key] = value
