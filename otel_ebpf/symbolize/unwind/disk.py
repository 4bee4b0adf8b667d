"""Compiled unwind tables kept on disk, so that a restart on the same node compiles none
of the files it compiled before (python3.11 takes 0.3 s, libc 0.17 s, and a node's first
minutes would otherwise spend seconds of the compile budget on them again).

One file per mapped file, `<root>/unwind/<key>.<version>.rows`: the key is the file's
build id, else its (device, inode, mtime, size); the version covers the row encoding and
the compiler's own source, so a changed compiler never reads an old table. An entry is
the table's bytes as entry.py encodes them (header, segments, rows, CRC-32). What has no
table (no CFI, Go code) is kept too; a table too large for the configured row array is
not (that depends on the configuration, not the file).

The same trust rules as the program cache (otel_ebpf.kernel.cache): written by the agent
only, mode 0600 in a 0700 directory it owns; an entry or directory anyone else could
write is ignored, as is an entry that is truncated or corrupt (the file is compiled
again). Writes are atomic (temporary file, rename). The directory is held under
MAX_BYTES: the least recently used entries (by mtime, touched on every hit) go first,
checked at the first store of a run and then after every 1/16 of the bound written.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
import time
from pathlib import Path

from otel_ebpf.kernel import cache as program_cache
from otel_ebpf.symbolize.procfs import FileKey
from otel_ebpf.symbolize.unwind import cfi, entry, records
from otel_ebpf.symbolize.unwind.entry import FORMAT, Cached, decode, encode

log = logging.getLogger(__name__)

MAX_BYTES = 256 << 20
_TRIM_TO = 0.9  # of the bound, so that a full cache is not trimmed at every store
_STALE_TMP_S = 3600.0  # a temporary file this old is a write that died midway
_BUILD_ID = re.compile(r"[0-9a-f]{8,128}")


def _compiler_version() -> str:
    """FORMAT and a digest of the compiler's source: a table from other code is a miss."""
    digest = hashlib.sha256(str(FORMAT).encode())
    for module in (cfi, entry, records):
        try:
            digest.update(Path(module.__file__ or "").read_bytes())
        except OSError:
            digest.update(module.__name__.encode())  # no source (zipped): FORMAT alone
    return digest.hexdigest()[:16]


VERSION = _compiler_version()


def default() -> TableCache | None:
    """The cache under the agent's cache root, None when $OTEL_EBPF_COMPILE_CACHE is off."""
    top = program_cache.root()
    return None if top is None else TableCache(top / "unwind")


def entry_name(key: str | FileKey) -> str | None:
    """The entry's file name for a build id or file key; None for a build id that is
    not plain hex (never a path)."""
    if isinstance(key, str):
        return f"{key}.{VERSION}.rows" if _BUILD_ID.fullmatch(key) else None
    dev, inode, mtime, size = key
    return f"f{dev:x}-{inode:x}-{mtime:x}-{size:x}.{VERSION}.rows"


class TableCache:
    """Entries under `directory` (created 0700 at the first store)."""

    def __init__(self, directory: Path, max_bytes: int = MAX_BYTES) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._since_trim: int | None = None  # bytes stored since the last trim; None: none yet
        self._warned = False

    def load(self, key: str | FileKey) -> Cached | None:
        """The entry for `key`; None when there is none or it cannot be trusted or read."""
        name = entry_name(key)
        if name is None:
            return None
        path = self.directory / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None  # no entry (or a link: not ours)
        try:
            if not (program_cache.owned_privately(os.fstat(fd))
                    and self._directory_trusted()):
                self._warn(f"ignoring {path}, which others could write")
                return None
            size = os.fstat(fd).st_size
            data = os.read(fd, size + 1)  # +1: a file grown since fstat is not whole
            found = decode(data)
            os.utime(fd)  # recently used: kept when the directory is trimmed
            return found
        except (OSError, ValueError) as exc:
            log.info("unwind cache: cannot use %s (%s); compiling the file again", path, exc)
            return None
        finally:
            os.close(fd)

    def store(self, key: str | FileKey, table: cfi.UnwindTable | None,
              too_large_rows: int = 0) -> None:
        """Keep a file's table (None: it has none; with `too_large_rows`: the rows it
        takes, past the budget); a failure only costs a compile later."""
        name = entry_name(key)
        if name is None:
            return
        tmp: str | None = None
        data = encode(table, too_large_rows)
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not self._directory_trusted():
                self._warn(f"not storing in {self.directory}, which others could write")
                return
            fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")  # mode 0600
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.directory / name)
            tmp = None
        except OSError as exc:
            self._warn(f"cannot store in {self.directory} ({exc})")
            return
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        if self._since_trim is None or self._since_trim + len(data) >= self.max_bytes // 16:
            self.trim()
        else:
            self._since_trim += len(data)

    def trim(self) -> None:
        """Remove the least recently used entries past max_bytes (down to 90 % of it),
        and temporary files of writes that died."""
        self._since_trim = 0
        entries: list[tuple[float, int, str]] = []
        now = time.time()
        try:
            with os.scandir(self.directory) as it:
                for e in it:
                    try:
                        st = e.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if e.name.endswith(".rows"):
                        entries.append((st.st_mtime, st.st_size, e.path))
                    elif e.name.endswith(".tmp") and now - st.st_mtime > _STALE_TMP_S:
                        with contextlib.suppress(OSError):
                            os.unlink(e.path)
        except OSError:
            return
        total = sum(size for _, size, _ in entries)
        if total <= self.max_bytes:
            return
        entries.sort()
        for _, size, path in entries:
            if total <= self.max_bytes * _TRIM_TO:
                break
            with contextlib.suppress(OSError):
                os.unlink(path)
                total -= size

    def _directory_trusted(self) -> bool:
        try:
            return program_cache.owned_privately(os.stat(self.directory))
        except OSError:
            return False

    def _warn(self, message: str) -> None:
        if not self._warned:
            log.warning("unwind cache: %s (each restart compiles the files' tables again)",
                        message)
            self._warned = True
