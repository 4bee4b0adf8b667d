"""One file's compiled unwind table as bytes: what the disk cache (disk.py) stores and the
compiler process (child.py) answers with. A header (magic, format, kind of entry: a table,
none, or too large with the rows it takes; segment count, row bytes, CRC-32 of the rest),
then the executable segments and the rows."""

from __future__ import annotations

import struct
import zlib
from typing import NamedTuple

from otel_ebpf.symbolize.unwind import cfi

FORMAT = 1  # bump when the entry's layout changes
_HEAD = struct.Struct("<4sHHII I")  # magic, format, has table, segments, row bytes, crc32
_MAGIC = b"OEUT"
_SEGMENT = struct.Struct("<QQQ")


class Cached(NamedTuple):
    """A hit: the file's table, or None when it has none; or, for a file whose table
    was too large for the row budget it was compiled for, the rows it takes (at least):
    a larger budget compiles it again, a smaller one need not."""

    table: cfi.UnwindTable | None
    too_large_rows: int = 0


_NO_TABLE, _TABLE, _TOO_LARGE = 0, 1, 2  # the header's kind of entry


def encode(table: cfi.UnwindTable | None, too_large_rows: int = 0) -> bytes:
    if too_large_rows:  # no body: the header's row field holds the count
        return _HEAD.pack(_MAGIC, FORMAT, _TOO_LARGE, 0, too_large_rows, zlib.crc32(b""))
    segments = b"".join(_SEGMENT.pack(*s) for s in table.segments) if table else b""
    rows = table.rows if table else b""
    body = segments + rows
    return _HEAD.pack(_MAGIC, FORMAT, _TABLE if table else _NO_TABLE,
                      len(segments) // _SEGMENT.size, len(rows), zlib.crc32(body)) + body


def decode(data: bytes) -> Cached:
    """The entry in `data`; ValueError when it is not a whole, intact entry."""
    if len(data) < _HEAD.size:
        raise ValueError("truncated header")
    magic, fmt, kind, n_segments, n_rows, crc = _HEAD.unpack_from(data)
    body = data[_HEAD.size:]
    if magic != _MAGIC or fmt != FORMAT or kind not in (_NO_TABLE, _TABLE, _TOO_LARGE):
        raise ValueError("not an entry of this format")
    if kind == _TOO_LARGE:
        if body or n_segments or not n_rows or zlib.crc32(b"") != crc:
            raise ValueError("damaged")
        return Cached(None, n_rows)
    if len(body) != n_segments * _SEGMENT.size + n_rows or n_rows % cfi.ROW.size:
        raise ValueError("truncated")
    if zlib.crc32(body) != crc:
        raise ValueError("checksum mismatch")
    if kind == _NO_TABLE:
        return Cached(None)
    split = n_segments * _SEGMENT.size
    segments = tuple(_SEGMENT.unpack_from(body, i) for i in range(0, split, _SEGMENT.size))
    return Cached(cfi.UnwindTable(body[split:], segments))
