"""Kernel header discovery order, against fake directory trees."""

from __future__ import annotations

from pathlib import Path

from otel_ebpf.kernel.headers import discover

RELEASE = "6.18.44-test"


def debian_pair(usr_src: Path, version: str) -> None:
    build = usr_src / f"linux-headers-{version}-amd64"
    common = usr_src / f"linux-headers-{version}-common"
    (build / "include" / "generated").mkdir(parents=True)
    (build / "include" / "generated" / "autoconf.h").write_text("")
    (build / "arch" / "x86" / "include" / "generated").mkdir(parents=True)
    (common / "include" / "linux").mkdir(parents=True)
    (common / "arch" / "x86" / "include" / "asm").mkdir(parents=True)


def layout(tmp_path: Path) -> dict[str, Path]:
    paths = {"modules_root": tmp_path / "modules", "kheaders": tmp_path / "kheaders.tar.xz",
             "usr_src": tmp_path / "src", "cache_dir": tmp_path / "cache"}
    paths["usr_src"].mkdir()
    return paths


def test_env_wins(tmp_path: Path) -> None:
    found = discover(RELEASE, env={"BCC_KERNEL_SOURCE": "/k"}, **layout(tmp_path))
    assert found is not None and (found.kind, str(found.path)) == ("env", "/k")


def test_modules_before_kheaders(tmp_path: Path) -> None:
    paths = layout(tmp_path)
    (paths["modules_root"] / RELEASE / "build").mkdir(parents=True)
    paths["kheaders"].write_text("")
    found = discover(RELEASE, env={}, **paths)
    assert found is not None and found.kind == "modules" and found.exact


def test_modules_linked_to_other_version_is_not_exact(tmp_path: Path) -> None:
    paths = layout(tmp_path)
    debian_pair(paths["usr_src"], "6.1.0-56")
    (paths["modules_root"] / RELEASE).mkdir(parents=True)
    (paths["modules_root"] / RELEASE / "build").symlink_to(
        paths["usr_src"] / "linux-headers-6.1.0-56-amd64")
    found = discover(RELEASE, env={}, **paths)
    assert found is not None and found.kind == "modules" and not found.exact
    assert "another kernel version" in found.describe()


def test_kheaders_before_distribution(tmp_path: Path) -> None:
    paths = layout(tmp_path)
    paths["kheaders"].write_text("")
    debian_pair(paths["usr_src"], "6.1.0-56")
    found = discover(RELEASE, env={}, **paths)
    assert found is not None and found.kind == "kheaders"


def test_newest_distribution_split_is_merged(tmp_path: Path) -> None:
    paths = layout(tmp_path)
    debian_pair(paths["usr_src"], "6.1.0-9")
    debian_pair(paths["usr_src"], "6.1.0-56")
    found = discover(RELEASE, env={}, **paths)
    assert found is not None and found.kind == "distribution" and not found.exact
    assert found.path.name == "linux-headers-6.1.0-56-amd64"  # 56 > 9 numerically
    merged = found.bcc_kernel_source
    assert merged is not None
    # one tree with both halves: generated headers from build, the rest from common
    assert (merged / "include" / "generated" / "autoconf.h").is_file()
    assert (merged / "include" / "linux").is_dir()
    assert (merged / "arch" / "x86" / "include" / "asm").is_dir()
    assert (merged / "arch" / "x86" / "include" / "generated").is_dir()
    # idempotent
    assert discover(RELEASE, env={}, **paths) == found


def test_nothing_found(tmp_path: Path) -> None:
    assert discover(RELEASE, env={}, **layout(tmp_path)) is None
