"""One signal's on-disk spool: a FIFO of files, each one batch of serialized OTLP, bounded
in bytes, that outlives the agent.

The memory queue overflows here during a long outage (otel_ebpf/export/spill.py) and the
delivery reads from here first, oldest file first. Like the Collector's persistent queue
(exporterhelper with file_storage) a file leaves the spool only once the collector took
it, so a file in flight when the agent stops is delivered by the next run: at least once.
Unlike it, nothing is written while the memory queue has room (the spool is for outages,
not for every span), and every file is self-describing, so no index has to agree with
the files after a crash.

A file, `<sequence>.spool` (20 digits: names sort in age order):

    prefix  32 bytes, little-endian: magic b"OESP", version u16, reserved u16, items u32,
            meta length u32, body length u64, CRC-32 of meta + body u32, CRC-32 of the
            28 bytes before it u32
    meta    JSON: {"signal": ..., "created_ns": ..., "shares": [[[[key, value], ...], n]]}
            - whose the items are, as the drop counter names workloads
    body    the serialized OTLP request

It is written to a temporary name and renamed into place, so a crash leaves either the
whole file or a temporary one (removed at the next start). Files are not fsync'd: a
process crash loses nothing written, a power loss may leave a damaged file, which the
CRCs catch. A damaged or truncated file is counted (spool_corrupt: its items when the
prefix is readable, else one) and removed; it never stops the agent.

Memory: the spool keeps one small record per file (sequence, size, items); a file's meta
is read only to count its drops, its body only to deliver it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from otel_ebpf.export.queue import SPOOL_CORRUPT, SPOOL_FULL, Attrs, DropLedger

log = logging.getLogger(__name__)

MAGIC = b"OESP"
VERSION = 1
_HEAD = struct.Struct("<4sHHIIQI")  # everything the prefix CRC covers
PREFIX = _HEAD.size + 4
_NAME = re.compile(r"^(\d{20})\.spool$")
FIRST_SEQUENCE = 10**18  # room below for batches put back at the head
UNKNOWN: Attrs = frozenset()  # whose the items of an unreadable file are


class SpoolError(Exception):
    """The spool directory cannot be used; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class SpoolFile:
    seq: int
    nbytes: int  # the whole file
    items: int


@dataclass(frozen=True, slots=True)
class Spooled:
    """A file read back for delivery: its payload and whose its items are."""

    file: SpoolFile
    payload: bytes
    shares: dict[Attrs, int]


def encode(signal: str, payload: bytes, items: int, shares: Mapping[Attrs, int]) -> bytes:
    meta = json.dumps({"signal": signal, "created_ns": time.time_ns(),
                       "shares": [[sorted(k), n] for k, n in shares.items()]},
                      separators=(",", ":")).encode()
    crc = zlib.crc32(payload, zlib.crc32(meta))
    head = _HEAD.pack(MAGIC, VERSION, 0, items, len(meta), len(payload), crc)
    return head + struct.pack("<I", zlib.crc32(head)) + meta + payload


@dataclass(frozen=True, slots=True)
class _Prefix:
    items: int
    meta_len: int
    body_len: int
    crc: int


def _prefix(raw: bytes) -> _Prefix | None:
    if len(raw) < PREFIX:
        return None
    head = raw[:_HEAD.size]
    magic, version, _, items, meta_len, body_len, crc = _HEAD.unpack(head)
    (head_crc,) = struct.unpack_from("<I", raw, _HEAD.size)
    if magic != MAGIC or version != VERSION or head_crc != zlib.crc32(head):
        return None
    return _Prefix(items, meta_len, body_len, crc)


def _shares(meta: bytes, signal: str) -> dict[Attrs, int] | None:
    try:
        doc = json.loads(meta)
        if doc["signal"] != signal:
            return None
        return {frozenset((str(k), v) for k, v in pairs): int(n) for pairs, n in doc["shares"]}
    except (ValueError, KeyError, TypeError):
        return None


class Spool:
    """The spool of one signal in `directory` (created, mode 0700), at most `max_bytes` of
    files: past it the oldest files are dropped (spool_full) into `ledger`. Thread-safe:
    the spool's writer and the delivery's thread use it; every method blocks on disk."""

    def __init__(self, directory: Path, signal: str, max_bytes: int, ledger: DropLedger) -> None:
        self.directory = directory
        self.signal = signal
        self.max_bytes = max_bytes
        self.ledger = ledger
        self.items = 0
        self.nbytes = 0
        self._files: deque[SpoolFile] = deque()
        self._next = FIRST_SEQUENCE
        self._reading: int | None = None  # the file in flight: never evicted
        self._lock = threading.Lock()
        self._lockfile: int | None = None

    def __len__(self) -> int:
        return len(self._files)

    # ---- opening ---------------------------------------------------------------------

    def open(self) -> None:
        """Take the directory (one agent a spool) and index what a previous run left."""
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise SpoolError(f"cannot use {self.directory} for the {self.signal} spool: "
                             f"{exc.strerror}; give a directory the agent may create and "
                             "write") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise SpoolError(f"{self.directory} is in use by another otel-ebpf (its lock is "
                             "held); give each agent a spool directory of its own") from exc
        self._lockfile = fd
        self._recover()

    def _recover(self) -> None:
        found: list[tuple[int, Path]] = []
        for entry in os.scandir(self.directory):
            if entry.name.startswith(".tmp-"):  # a write cut short by a crash
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
            elif m := _NAME.match(entry.name):
                found.append((int(m.group(1)), Path(entry.path)))
        for seq, path in sorted(found):
            try:
                with path.open("rb") as f:
                    prefix = _prefix(f.read(PREFIX))
                    size = os.fstat(f.fileno()).st_size
            except OSError:
                prefix, size = None, 0
            if prefix is None or size != PREFIX + prefix.meta_len + prefix.body_len:
                self._corrupt(path, prefix, "truncated" if prefix else "unreadable header")
                continue
            self._files.append(SpoolFile(seq, size, prefix.items))
            self.items += prefix.items
            self.nbytes += size
        if self._files:
            self._next = self._files[-1].seq + 1
            log.info("%s spool %s: %d %s (%d bytes) left by a previous run, delivered first",
                     self.signal, self.directory, self.items, self.signal, self.nbytes)

    def close(self) -> None:
        if self._lockfile is not None:
            os.close(self._lockfile)
            self._lockfile = None

    # ---- writing ---------------------------------------------------------------------

    def append(self, payload: bytes, items: int, shares: Mapping[Attrs, int],
               front: bool = False) -> bool:
        """Write one batch as a file at the tail (or, `front`, at the head: a batch older
        than everything spooled). Past the byte bound the oldest files make room; a batch
        that still does not fit is dropped itself (spool_full). OSError: not written."""
        data = encode(self.signal, payload, items, shares)
        with self._lock:
            if front and self._files:
                seq = self._files[0].seq - 1
            else:
                seq, self._next = self._next, self._next + 1
            if not front:
                self._make_room(len(data))
            if self.nbytes + len(data) > self.max_bytes:
                self.ledger.drop(SPOOL_FULL, shares)
                return False
            path = self._path(seq)
            tmp = self.directory / f".tmp-{seq}"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                finally:
                    os.close(fd)
                os.replace(tmp, path)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            file = SpoolFile(seq, len(data), items)
            if front:
                self._files.appendleft(file)
            else:
                self._files.append(file)
            self.items += items
            self.nbytes += len(data)
            return True

    def _make_room(self, size: int) -> None:
        while self.nbytes + size > self.max_bytes:
            victim = next((f for f in self._files if f.seq != self._reading), None)
            if victim is None:
                return
            self._forget(victim)
            path = self._path(victim.seq)
            shares = self._read_shares(path, victim.items)
            with contextlib.suppress(OSError):
                os.unlink(path)
            self.ledger.drop(SPOOL_FULL, shares)

    # ---- reading ---------------------------------------------------------------------

    def oldest(self) -> Spooled | None:
        """The oldest file, read and checked, marked in flight until `settle`; a damaged
        one is counted, removed and skipped."""
        while True:
            with self._lock:
                file = next((f for f in self._files if f.seq != self._reading), None)
                if file is None:
                    return None
                path = self._path(file.seq)
                spooled = self._read(path, file)
                if spooled is not None:
                    self._reading = file.seq
                    return spooled
                self._forget(file)

    def settle(self, spooled: Spooled, drop_reason: str | None = None,
               keep: bool = False) -> None:
        """The file in flight was delivered (removed), refused (removed and its items
        counted under `drop_reason`), or stays for another attempt (`keep`)."""
        with self._lock:
            self._reading = None
            if keep or spooled.file not in self._files:
                return
            self._forget(spooled.file)
            with contextlib.suppress(OSError):
                os.unlink(self._path(spooled.file.seq))
            if drop_reason is not None:
                self.ledger.drop(drop_reason, spooled.shares)

    def _read(self, path: Path, file: SpoolFile) -> Spooled | None:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            log.warning("%s spool: cannot read %s (%s); its %d %s are counted as dropped",
                        self.signal, path, exc.strerror, file.items, self.signal)
            self.ledger.drop(SPOOL_CORRUPT, {UNKNOWN: file.items})
            return None
        prefix = _prefix(raw)
        if prefix is None or len(raw) != PREFIX + prefix.meta_len + prefix.body_len:
            self._corrupt(path, prefix, "truncated" if prefix else "unreadable header")
            return None
        meta = raw[PREFIX:PREFIX + prefix.meta_len]
        body = raw[PREFIX + prefix.meta_len:]
        shares = _shares(meta, self.signal)
        if zlib.crc32(body, zlib.crc32(meta)) != prefix.crc or shares is None:
            self._corrupt(path, prefix, "checksum mismatch or unreadable meta", shares)
            return None
        return Spooled(file, body, shares)

    def _read_shares(self, path: Path, items: int) -> dict[Attrs, int]:
        """Whose a file's items are, from its meta alone (to count a drop)."""
        try:
            with path.open("rb") as f:
                prefix = _prefix(f.read(PREFIX))
                shares = _shares(f.read(prefix.meta_len), self.signal) if prefix else None
        except OSError:
            shares = None
        return shares if shares is not None else {UNKNOWN: items}

    def _corrupt(self, path: Path, prefix: _Prefix | None, why: str,
                 shares: dict[Attrs, int] | None = None) -> None:
        items = prefix.items if prefix is not None else 1
        if shares is None and prefix is not None:
            shares = self._read_shares(path, items)
        log.warning("%s spool: %s is damaged (%s); removed, %d %s counted as dropped "
                    "(spool_corrupt)", self.signal, path, why, items, self.signal)
        with contextlib.suppress(OSError):
            os.unlink(path)
        self.ledger.drop(SPOOL_CORRUPT, shares or {UNKNOWN: items})

    # ---- bookkeeping -----------------------------------------------------------------

    def _forget(self, file: SpoolFile) -> None:
        self._files.remove(file)
        self.items -= file.items
        self.nbytes -= file.nbytes

    def _path(self, seq: int) -> Path:
        return self.directory / f"{seq:020d}.spool"
