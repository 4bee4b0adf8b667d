"""doctor's fixes for what a container lacks: the mount that brings the host path in.
(The image tier, tests/deploy/test_image.py, runs doctor in a real container without them.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from otel_ebpf.kernel import preflight as pf


@pytest.mark.parametrize(("marker", "env"), [
    ("run/.containerenv", {}), (".dockerenv", {}), (None, {"container": "podman"}),
    (None, {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}),
])
def test_container_markers(tmp_path: Path, marker: str | None, env: dict[str, str]) -> None:
    assert not pf.in_container(tmp_path, {})
    if marker:
        (tmp_path / marker).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / marker).touch()
    assert pf.in_container(tmp_path, env)


def test_mount_fix_names_the_mount_in_a_container_and_the_host_fix_outside() -> None:
    inside = pf.mount_fix("/sys/kernel/tracing", "mount -t tracefs ...", container=True)
    assert "-v /sys/kernel/tracing:/sys/kernel/tracing:ro" in inside
    assert "hostPath" in inside and "mount -t tracefs" not in inside
    outside = pf.mount_fix("/sys/kernel/tracing", "mount -t tracefs ...", container=False)
    assert outside.startswith("mount -t tracefs ...; in a container, mount the host's "
                              "/sys/kernel/tracing read-only")


def test_headers_link_into_a_missing_usr_src_names_it(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("container", "podman")
    release = "6.1.0-57-amd64"
    (tmp_path / release).mkdir()
    (tmp_path / release / "build").symlink_to(f"/usr/src/linux-headers-{release}-absent")
    check = pf.check_headers(None, modules=tmp_path, release=release)
    assert check.status == pf.FAIL
    assert check.detail == (f"{tmp_path}/{release}/build links to /usr/src/linux-headers-"
                            f"{release}-absent, which is not here")
    assert "mount the host's /usr/src into the container" in check.fix
    assert "-v /usr/src:/usr/src:ro" in check.fix


def test_no_headers_in_a_container_names_both_mounts(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("container", "podman")
    check = pf.check_headers(None, modules=tmp_path, release="6.1.0")
    assert check.status == pf.FAIL
    assert "-v /lib/modules:/lib/modules:ro -v /usr/src:/usr/src:ro" in check.fix


def test_cgroup_tree_missing_or_a_subtree_is_a_warning(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("container", "podman")
    mounts = tmp_path / "mounts"
    mounts.write_text("tmpfs /sys/fs/cgroup tmpfs rw 0 0\n")
    none = pf.check_cgroup(mounts)
    assert none.status == pf.WARN and none.detail.startswith("no cgroup2 mount")
    assert "-v /sys/fs/cgroup:/sys/fs/cgroup:ro" in none.fix
    # a directory that is not a hierarchy's root (inode 1) stands for a container's view
    mounts.write_text(f"cgroup2 {tmp_path} cgroup2 rw 0 0\n")
    sub = pf.check_cgroup(mounts)
    assert sub.status == pf.WARN and "is a subtree of the host's cgroups" in sub.detail
    assert "-v /sys/fs/cgroup:/sys/fs/cgroup:ro" in sub.fix
