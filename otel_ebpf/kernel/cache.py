"""Compiled programs kept on disk, so that a restart on the same node needs no compiler.

BCC compiles in about a second per program, holding ~180 MB while it does; a DaemonSet pod
restarts far more often than its node changes kernel or the agent changes version. An
entry is what the compiler process returned (otel_ebpf.kernel.compiler.Image as JSON) plus
what it takes to recreate the maps BCC created: each map's bpf_map_info and the BTF they
were created with (task storage maps, for one, need it), which the compiler process reads
through BCC's own fd (the agent holds only the maps, and fetching a BTF object by id needs
CAP_SYS_ADMIN, which the agent does not hold). A hit creates the maps with bpf(2) and
hands back the same Image: nothing else differs from a compile.

The key covers every input of the compile: the source and the headers beside it, the
cflags, BCC's version, the kernel (release and build) and the header tree BCC reads.
Entries are written by the agent only (mode 0600 in a 0700 directory owned by it), and an
entry anyone else could have written is ignored: it is code the kernel will run.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import platform
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from otel_ebpf.kernel import bpfsys

log = logging.getLogger(__name__)

FORMAT = 1  # bump when an entry's layout or the loader's output changes
MAX_ENTRIES = 64  # ~20 KB each; the least recently used go first
DEFAULT_ROOT = Path("/var/cache/otel-ebpf")  # shared with headers.py's merged header trees
_HEADER_MARKERS = ("include/generated/autoconf.h", "include/generated/uapi/linux/version.h",
                   "include/config/kernel.release")


def root() -> Path | None:
    """$OTEL_EBPF_CACHE_DIR (default /var/cache/otel-ebpf), or None when
    $OTEL_EBPF_COMPILE_CACHE is off (which turns off every cache of compiled things under
    it: programs, unwind tables)."""
    if os.environ.get("OTEL_EBPF_COMPILE_CACHE", "").lower() in ("off", "no", "false", "0"):
        return None
    return Path(os.environ.get("OTEL_EBPF_CACHE_DIR") or DEFAULT_ROOT)


def directory() -> Path | None:
    """programs/ under root(), or None when the cache is off."""
    top = root()
    return None if top is None else top / "programs"


def _file_digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return "-"


def environment(header_tree: Path | None) -> dict[str, str]:
    """What the compile depends on beyond its source and cflags."""
    env = {"format": str(FORMAT), "kernel": f"{platform.release()} {platform.version()}",
           "machine": platform.machine(),
           "bcc_kernel_source": os.environ.get("BCC_KERNEL_SOURCE", "")}
    spec = importlib.util.find_spec("bcc")  # locates, does not import
    if spec is not None and spec.origin is not None:
        env["bcc"] = _file_digest(Path(spec.origin).with_name("version.py"))
    if header_tree is not None:
        tree = header_tree.resolve()
        env["headers"] = str(tree)
        for marker in _HEADER_MARKERS:
            env[marker] = _file_digest(tree / marker)
    return env


def owned_privately(st: os.stat_result) -> bool:
    return st.st_uid == os.geteuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


class ImageCache:
    """Compiled programs under `directory`; `read=False` only writes (doctor compiles for
    real, and leaves the agent a warm cache)."""

    def __init__(self, directory: Path, header_tree: Path | None, read: bool = True) -> None:
        self.directory = directory
        self.read = read
        self._environment = environment(header_tree)

    def key(self, text: str, cflags: Sequence[str]) -> str:
        digest = hashlib.sha256()
        includes = {}
        for flag in cflags:
            if flag.startswith("-I"):
                for header in sorted(Path(flag[2:]).glob("*.h")):
                    includes[str(header)] = _file_digest(header)
        digest.update(json.dumps([self._environment, text, list(cflags), includes],
                                 sort_keys=True).encode())
        return digest.hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def load(self, key: str) -> tuple[dict[str, Any], list[int]] | None:
        """The image and freshly created maps of an entry, or None (no entry, or one that
        cannot be used: then the caller compiles and stores it anew)."""
        if not self.read:
            return None
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                if not (owned_privately(os.fstat(f.fileno()))
                        and owned_privately(os.stat(self.directory))):
                    log.warning("compile cache: ignoring %s, which others could write", path)
                    return None
                entry = json.loads(f.read())
            os.utime(path)  # recently used: kept when the cache is trimmed
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.info("compile cache: cannot read %s (%s); compiling", path, exc)
            return None
        try:
            return entry["image"], _create_maps(entry["maps"], entry.get("btf"))
        except (OSError, KeyError, TypeError, ValueError) as exc:
            log.info("compile cache: cannot recreate the maps of %s (%s); compiling", path, exc)
            return None

    def store(self, key: str, image: dict[str, Any], fds: Sequence[int], btf: str | None
              ) -> None:
        """Keep a compile's result (`btf`: the maps' BTF, base64, as the compiler process
        read it); a failure only costs the next start a compile."""
        tmp: str | None = None
        try:
            infos = [bpfsys.map_info(fd) for fd in fds]
            if btf is None and any(info["btf_id"] for info in infos):
                log.info("compile cache: not storing a program whose maps' BTF the compiler "
                         "process did not hand over")
                return
            maps = [{"name": m["name"], "info": info} for m, info in zip(
                image["maps"], infos, strict=True)]
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.directory, suffix=".tmp",
                                             delete=False) as f:  # mode 0600
                tmp = f.name
                json.dump({"image": image, "maps": maps, "btf": btf}, f)
            os.replace(tmp, self._path(key))
            self._trim()
        except (OSError, ValueError) as exc:
            log.info("compile cache: cannot store in %s (%s)", self.directory, exc)
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


    def _trim(self) -> None:
        entries = sorted(self.directory.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for stale in entries[:-MAX_ENTRIES]:
            with contextlib.suppress(OSError):
                stale.unlink()


def _create_maps(maps: list[dict[str, Any]], btf: str | None) -> list[int]:
    btf_fd = bpfsys.btf_load(base64.b64decode(btf)) if btf else -1
    fds: list[int] = []
    try:
        for entry in maps:
            fds.append(bpfsys.map_create(entry["info"], entry["name"], btf_fd))
    except Exception:
        for fd in fds:
            os.close(fd)
        raise
    finally:
        if btf_fd >= 0:
            os.close(btf_fd)  # the maps hold their own reference
    return fds
