"""Container and pod identity from cgroup paths: the real-world corpus, the cgroup id ->
path map over a directory tree, and the resolver's id-first, /proc-second order."""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from pathlib import Path

import pytest

from otel_ebpf.enrich.container import (
    CgroupIdentity,
    CgroupPaths,
    ContainerResolver,
    parse_cgroup_path,
    parse_proc_cgroup,
)
from otel_ebpf.kernel.cgroupfs import cgroup2_root

CORPUS_DIR = Path(__file__).parent.parent / "fixtures" / "cgroups"


def cid(case: str) -> str:
    """The container id written into the corpus file of `case` (ids are sha256 digests)."""
    return hashlib.sha256(case.encode()).hexdigest()


def uid(case: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, case))


UUID, MD5 = "uuid", "md5"  # the pod UID forms: a UUID, or a static pod's config hash
# case -> (runtime, is a container, pod UID form, QoS class, systemd unit)
CORPUS: dict[str, tuple[str | None, bool, str | None, str | None, str | None]] = {
    "docker-v2-systemd": ("docker", True, None, None, None),
    "docker-v2-cgroupfs": ("docker", True, None, None, None),
    "docker-v1-cgroupfs": ("docker", True, None, None, None),
    "docker-v1-systemd": ("docker", True, None, None, None),
    # hybrid host whose runc left the v2 path at containerd.service: the v1 lines tell
    "docker-hybrid-cgroupfs": ("docker", True, None, None, None),
    "docker-hybrid-systemd": ("docker", True, None, None, None),
    "docker-in-docker-v1": ("docker", True, None, None, None),  # the inner container
    "docker-in-docker-v2": ("docker", True, None, None, None),
    "docker-systemd-inside": ("docker", True, None, None, None),
    "docker-rootless": ("docker", True, None, None, None),
    "k8s-containerd-v2-burstable": ("containerd", True, UUID, "burstable", None),
    "k8s-containerd-v2-besteffort": ("containerd", True, UUID, "besteffort", None),
    "k8s-containerd-v2-guaranteed": ("containerd", True, UUID, "guaranteed", None),
    "k8s-containerd-v1-systemd": ("containerd", True, UUID, "besteffort", None),
    "k8s-containerd-service-path": ("containerd", True, UUID, "burstable", None),
    # cgroupfs driver: the bare id does not say which runtime
    "k8s-cgroupfs-v1-burstable": (None, True, UUID, "burstable", None),
    "k8s-cgroupfs-v2-besteffort": (None, True, UUID, "besteffort", None),
    "k8s-cgroupfs-v2-guaranteed": (None, True, UUID, "guaranteed", None),
    "k8s-static-pod": ("containerd", True, MD5, "burstable", None),
    "k8s-dockershim": ("docker", True, UUID, "burstable", None),
    "k8s-kind-nested": ("containerd", True, UUID, "besteffort", None),
    "k8s-private-cgroupns": ("containerd", True, UUID, "burstable", None),
    "crio-v2": ("cri-o", True, UUID, "besteffort", None),
    "crio-v1-cgroupfs": ("cri-o", True, UUID, "burstable", None),
    "podman-rootful-v2": ("podman", True, None, None, None),
    "podman-rootful-v2-split": ("podman", True, None, None, None),
    "podman-rootless": ("podman", True, None, None, None),
    "podman-rootless-pod": ("podman", True, None, None, None),
    "podman-v1-cgroupfs": ("podman", True, None, None, None),
    "nerdctl-v2": ("containerd", True, None, None, None),
    "ecs-task-v1": (None, True, None, None, None),
    # the runtimes' monitors sit next to the container, they are not in it
    "crio-conmon": ("systemd", False, UUID, "burstable", f"crio-conmon-{cid('crio-conmon')}.scope"),
    "podman-conmon": ("systemd", False, None, None, f"libpod-conmon-{cid('podman-conmon')}.scope"),
    "podman-rootless-conmon": (
        "systemd", False, None, None, f"libpod-conmon-{cid('podman-rootless-conmon')}.scope"),
    "systemd-service-v2": ("systemd", False, None, None, "nginx.service"),
    "systemd-template-v2": ("systemd", False, None, None, "getty@tty1.service"),
    "systemd-session-v2": ("systemd", False, None, None, "session-3.scope"),
    "systemd-docker-daemon": ("systemd", False, None, None, "docker.service"),
    "systemd-service-v1": ("systemd", False, None, None, "sshd.service"),
    "root-v2": (None, False, None, None, None),
    # a 32-hex directory (this sandbox's memory cgroup) is no container id
    "sandbox-hybrid": (None, False, None, None, None),
}


def test_corpus_has_a_file_for_every_case_and_a_case_for_every_file() -> None:
    assert {p.stem for p in CORPUS_DIR.glob("*.txt")} == set(CORPUS)


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_corpus(case: str) -> None:
    runtime, is_container, pod_form, qos, unit = CORPUS[case]
    ident = parse_proc_cgroup((CORPUS_DIR / f"{case}.txt").read_text())
    pod = {UUID: uid(case), MD5: hashlib.md5(case.encode()).hexdigest(), None: None}[pod_form]
    assert (ident.runtime, ident.container_id, ident.pod_uid, ident.qos, ident.systemd_unit) == (
        runtime, cid(case) if is_container else None, pod, qos, unit)
    if is_container:
        assert ident.container_id is not None and len(ident.container_id) == 64
        assert ident.container_id in ident.path


def test_attributes_follow_the_semantic_conventions() -> None:
    pod = uid("p")
    ident = parse_cgroup_path(f"/kubepods.slice/kubepods-pod{pod.replace('-', '_')}.slice/"
                              f"crio-{cid('c')}.scope")
    assert ident.attributes() == {"container.id": cid("c"), "container.runtime.name": "cri-o",
                                  "k8s.pod.uid": pod}
    assert parse_cgroup_path("/system.slice/nginx.service").attributes() == {}
    assert parse_cgroup_path(f"/kubepods/pod{pod}/{cid('c')}").attributes() == {
        "container.id": cid("c"), "k8s.pod.uid": pod}  # no runtime: the path does not say


def test_single_paths() -> None:
    upper = cid("u").upper()
    assert parse_cgroup_path(f"/docker/{upper}").container_id == cid("u")
    assert parse_cgroup_path(f"/docker/{cid('x')[:63]}").container_id is None
    assert parse_cgroup_path(f"/system.slice/docker-{cid('x')}.scope.d/x").container_id is None
    # the pod's own slice: a pod, no container
    pod_slice = parse_cgroup_path(
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid('p')}.slice")
    assert (pod_slice.pod_uid, pod_slice.qos, pod_slice.container_id) == (
        uid("p"), "burstable", None)
    # "pod<uuid>" only counts below kubepods
    assert parse_cgroup_path(f"/srv/pod{uid('p')}").pod_uid is None
    assert parse_cgroup_path("/kubepods.slice") == CgroupIdentity("/kubepods.slice")
    assert parse_proc_cgroup("") == CgroupIdentity("/")


def make_tree(root: Path, paths: list[str]) -> dict[str, int]:
    root.mkdir(exist_ok=True)
    ids = {"/": os.stat(root).st_ino}
    for path in paths:
        (root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
        ids[path] = os.stat(root / path.lstrip("/")).st_ino
    return ids


TREE = [
    f"/system.slice/docker-{cid('d')}.scope",
    "/system.slice/containerd.service",
    "/system.slice/nginx.service",
    f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid('k').replace('-', '_')}"
    f".slice/cri-containerd-{cid('k')}.scope",
    f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid('o').replace('-', '_')}"
    f".slice/crio-{cid('o')}.scope",
    f"/machine.slice/libpod-{cid('p')}.scope/container",
    f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{cid('r')}.scope",
]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_cgroup_paths_maps_inodes_to_paths(tmp_path: Path) -> None:
    ids = make_tree(tmp_path, TREE)
    paths = CgroupPaths(tmp_path)
    for path, inode in ids.items():
        assert paths.lookup(inode) == path
    assert paths.scans == 1  # one walk answered them all
    ident = parse_cgroup_path(paths.lookup(ids[TREE[3]]) or "")
    assert (ident.runtime, ident.container_id, ident.pod_uid) == ("containerd", cid("k"), uid("k"))


def test_cgroup_paths_rescans_on_a_miss_at_most_every_interval(tmp_path: Path) -> None:
    clock = FakeClock()
    make_tree(tmp_path, TREE[:1])
    paths = CgroupPaths(tmp_path, rescan_interval=2.0, clock=clock)
    assert paths.lookup(1) is None and paths.scans == 1  # an id that is nowhere
    new = make_tree(tmp_path, [f"/system.slice/docker-{cid('new')}.scope"])
    inode = new[f"/system.slice/docker-{cid('new')}.scope"]
    assert paths.lookup(inode) is None and paths.scans == 1  # too soon after the last walk
    clock.now += 2.0
    assert paths.lookup(inode) == f"/system.slice/docker-{cid('new')}.scope"
    assert paths.scans == 2


def test_cgroup_paths_keeps_removed_cgroups_within_bounds(tmp_path: Path) -> None:
    clock = FakeClock()
    ids = make_tree(tmp_path, ["/a", "/b"])
    paths = CgroupPaths(tmp_path, max_entries=4, clock=clock)
    assert paths.lookup(ids["/a"]) == "/a"
    fresh = make_tree(tmp_path, ["/c"])  # before the rmdir: tmpfs reuses inode numbers
    (tmp_path / "a").rmdir()  # (kernfs, which cgroups live on, never does)
    clock.now += 10
    assert paths.lookup(fresh["/c"]) == "/c"
    assert paths.lookup(ids["/a"]) == "/a"  # gone, but its records may still arrive
    make_tree(tmp_path, ["/d"])  # now the live tree (/, b, c, d) alone fills the bound
    clock.now += 10
    paths.lookup(12345678)
    assert paths.lookup(ids["/b"]) == "/b"
    assert sorted(paths._paths.values()) == ["/", "/b", "/c", "/d"]  # /a made room


def write_proc(proc: Path, pid: int, text: str) -> None:
    (proc / str(pid)).mkdir(parents=True, exist_ok=True)
    (proc / str(pid) / "cgroup").write_text(text)


def test_resolver_prefers_the_cgroup_id(tmp_path: Path) -> None:
    ids = make_tree(tmp_path / "cg", TREE)
    proc = tmp_path / "proc"
    write_proc(proc, 10, "0::/system.slice/nginx.service\n")
    resolver = ContainerResolver(CgroupPaths(tmp_path / "cg"), proc=proc)
    # pid 99 has exited (no /proc entry): the id still names its container
    ident = resolver.identify(99, ids[TREE[0]])
    assert ident is not None and (ident.runtime, ident.container_id) == ("docker", cid("d"))
    ident = resolver.identify(10, 0)  # no cgroup id recorded: /proc
    assert ident is not None and ident.systemd_unit == "nginx.service"
    assert resolver.identify(99, 0) is None
    assert resolver.identify(0, 424242) is None


def test_resolver_falls_back_to_v1_lines_on_hybrid_hosts(tmp_path: Path) -> None:
    # runc with the cgroupfs driver on a hybrid host: the v2 cgroup (all the BPF side sees)
    # is containerd's service; only the v1 hierarchies name the container
    ids = make_tree(tmp_path / "cg", TREE)
    proc = tmp_path / "proc"
    text = (CORPUS_DIR / "docker-hybrid-cgroupfs.txt").read_text()
    write_proc(proc, 20, text)
    clock = FakeClock()
    resolver = ContainerResolver(CgroupPaths(tmp_path / "cg"), proc=proc, pid_ttl=10,
                                 clock=clock)
    service = ids["/system.slice/containerd.service"]
    ident = resolver.identify(20, service)
    assert ident is not None and ident.container_id == cid("docker-hybrid-cgroupfs")
    # the process exits: after the ttl its last identity is still served
    (proc / "20" / "cgroup").unlink()
    clock.now += 60
    assert resolver.identify(20, service) == ident
    # another pid in the same cgroup without a readable /proc: what the id says
    other = resolver.identify(21, service)
    assert other is not None and other.systemd_unit == "containerd.service"


def test_resolver_rereads_proc_after_the_ttl(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    write_proc(proc, 30, "0::/system.slice/a.service\n")
    clock = FakeClock()
    resolver = ContainerResolver(CgroupPaths(tmp_path), proc=proc, pid_ttl=10, clock=clock)
    assert (resolver.identify(30, 0) or CgroupIdentity("")).systemd_unit == "a.service"
    write_proc(proc, 30, f"0::/docker/{cid('reused')}\n")  # pid reused
    assert (resolver.identify(30, 0) or CgroupIdentity("")).systemd_unit == "a.service"
    clock.now += 10
    assert (resolver.identify(30, 0) or CgroupIdentity("")).container_id == cid("reused")


def own_v2_path() -> str | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


@pytest.mark.skipif(not os.path.exists("/proc/self/cgroup") or own_v2_path() is None,
                    reason="no cgroup v2 hierarchy on this machine")
def test_real_cgroup2_tree_maps_our_own_cgroup() -> None:
    # unified or hybrid (cgroup2 at /sys/fs/cgroup/unified): the mount is found either way
    root = cgroup2_root()
    path = own_v2_path()
    assert path is not None
    inode = os.stat(root / path.lstrip("/")).st_ino
    paths = CgroupPaths()
    assert paths.lookup(inode) == path
    # the walk takes ids from readdir (d_ino), not stat: kernfs must report the same
    for cgroup_id, relative in list(paths._paths.items()):
        with contextlib.suppress(FileNotFoundError):  # removed since the walk
            assert os.stat(root / relative.lstrip("/")).st_ino == cgroup_id, relative


def test_cgroup_paths_tell_a_gone_cgroup_from_an_unknown_one(tmp_path: Path) -> None:
    ids = make_tree(tmp_path, ["/a", "/b"])
    paths = CgroupPaths(tmp_path)
    assert paths.lookup(ids["/a"]) == "/a"
    assert paths.exists(ids["/a"]) is True
    (tmp_path / "b").rmdir()
    (tmp_path / "a").rename(tmp_path / "elsewhere")
    (tmp_path / "a").mkdir()  # the same path again, for a restarted unit: a new id
    assert os.stat(tmp_path / "a").st_ino != ids["/a"]
    assert paths.exists(ids["/a"]) is False
    assert paths.exists(ids["/b"]) is False  # removed
    assert paths.exists(987654321) is None  # never seen: not known to be gone
