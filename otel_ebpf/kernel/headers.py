"""Kernel header discovery for BCC's run-time compilation.

BCC compiles every program when it loads and needs the headers of a kernel. Discovery goes,
in order: `BCC_KERNEL_SOURCE`, `/lib/modules/<release>/{build,source}`,
`/sys/kernel/kheaders.tar.xz` (BCC unpacks it itself), then the newest distribution
headers under `/usr/src`. The last are for another kernel version: fine for programs that
read only tracepoint arguments and helper results (which ours do), wrong for any program
that dereferences kernel structs, so the result says whether the headers are exact.
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

MODULES_ROOT = Path("/lib/modules")
KHEADERS = Path("/sys/kernel/kheaders.tar.xz")
USR_SRC = Path("/usr/src")


_OTHER = ("valid for these probes, which read tracepoint arguments, helper results and "
          "struct members at offsets from the running kernel's BTF, never header layouts")


@dataclass(frozen=True)
class HeaderSource:
    """Where BCC will find kernel headers.

    `bcc_kernel_source` is the value to put in BCC_KERNEL_SOURCE, or None when BCC finds the
    headers on its own (env already set, /lib/modules links, kheaders).
    """

    kind: str  # env | modules | kheaders | distribution
    path: Path
    exact: bool
    bcc_kernel_source: Path | None = None

    def describe(self) -> str:
        match self.kind:
            case "env":
                return f"BCC_KERNEL_SOURCE={self.path}"
            case "modules" if self.exact:
                return f"{self.path} (headers of the running kernel)"
            case "modules":
                return f"{self.path} (links to headers of another kernel version: {_OTHER})"
            case "kheaders":
                return f"{self.path} (in-kernel headers, unpacked by BCC)"
            case _:
                return f"{self.path} (distribution headers of another version: {_OTHER})"


def _is_header_tree(path: Path) -> bool:
    return (path / "include" / "linux").is_dir() and (
        path / "include" / "generated" / "autoconf.h"
    ).is_file()


def _has_build_tree(path: Path) -> bool:
    # A Debian-style split keeps generated headers in build/ and the rest in source/.
    return (path / "include" / "generated" / "autoconf.h").is_file() or (
        path / "include" / "config"
    ).is_dir()


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", name))


def _distribution_candidates(usr_src: Path) -> list[tuple[Path, Path | None]]:
    """(build tree, matching source tree or None) pairs, newest first."""
    if not usr_src.is_dir():
        return []
    found: list[tuple[Path, Path | None]] = []
    for entry in usr_src.iterdir():
        if not entry.name.startswith(("linux-headers-", "kernels")) or not entry.is_dir():
            continue
        if entry.name == "kernels":  # Fedora/RHEL keep one full tree per version below
            found.extend((tree, None) for tree in entry.iterdir() if _is_header_tree(tree))
        elif _is_header_tree(entry):
            found.append((entry, None))
        elif _has_build_tree(entry) and not entry.name.endswith("-common"):
            common = _matching_common(usr_src, entry.name)
            if common is not None:
                found.append((entry, common))
    found.sort(key=lambda pair: _version_key(pair[0].name), reverse=True)
    return found


def _matching_common(usr_src: Path, build_name: str) -> Path | None:
    # linux-headers-6.1.0-56-amd64 -> linux-headers-6.1.0-56-common
    stem = build_name.rsplit("-", 1)[0]
    for candidate in (usr_src / f"{stem}-common", usr_src / f"{stem}-common-rt"):
        if (candidate / "include" / "linux").is_dir():
            return candidate
    return None


def union_tree(target: Path, build: Path, source: Path) -> Path:
    """Make one header tree out of a build/source split, with symlinks only.

    BCC_KERNEL_SOURCE takes a single directory; where both halves hold a directory of the
    same name (include/, arch/x86/include/), a real directory is made and the merge recurses.
    Idempotent: an existing link is left as it is.
    """
    target.mkdir(parents=True, exist_ok=True)
    names = {p.name for p in build.iterdir()} | {p.name for p in source.iterdir()}
    for name in sorted(names):
        b, s, t = build / name, source / name, target / name
        if b.is_dir() and s.is_dir() and not b.is_symlink() and not s.is_symlink():
            union_tree(t, b, s)
        elif not t.exists() and not t.is_symlink():
            t.symlink_to(b if b.exists() else s)
    return target


def discover(
    release: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    modules_root: Path = MODULES_ROOT,
    kheaders: Path = KHEADERS,
    usr_src: Path = USR_SRC,
    cache_dir: Path | None = None,
) -> HeaderSource | None:
    """Find kernel headers for BCC, or None when there are none anywhere."""
    env = os.environ if env is None else env
    release = release or platform.release()

    if env.get("BCC_KERNEL_SOURCE"):
        return HeaderSource("env", Path(env["BCC_KERNEL_SOURCE"]), exact=False)

    modules = modules_root / release
    if (modules / "build").is_dir():
        build = (modules / "build").resolve()
        # A distribution package names its tree after its kernel release; a self-built tree
        # linked here is taken at its word.
        exact = release in build.name or not build.name.startswith("linux-headers-")
        return HeaderSource("modules", build, exact=exact)

    if kheaders.is_file():
        return HeaderSource("kheaders", kheaders, exact=True)

    for build, source in _distribution_candidates(usr_src):
        if source is None:
            return HeaderSource("distribution", build, exact=False, bcc_kernel_source=build)
        merged_root = cache_dir or Path(env.get("OTEL_EBPF_CACHE_DIR", "/var/cache/otel-ebpf"))
        merged = union_tree(merged_root / "kernel-headers" / build.name, build, source)
        return HeaderSource("distribution", build, exact=False, bcc_kernel_source=merged)
    return None
