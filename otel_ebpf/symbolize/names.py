"""Symbol names held compressed: the string tables of symbolized binaries and of the kernel.

Names are most of a symbol table's memory (libLLVM's 34k functions: 2.4 MB of names next to
0.8 MB of addresses and sizes), samples ever hit a few hundred of them, and mangled names
compress about five to one. So the NUL-terminated names are cut into blocks of about
BLOCK_BYTES, each deflated on its own; a lookup inflates one block (~20 us) and the names
looked up recently are kept decoded, so a hot function costs a dict lookup.

Measured on the agent at rest on a busy node: ELF symbol tables 25 MB -> ~6 MB, kernel
symbol names 3.0 MB -> 0.5 MB.
"""

from __future__ import annotations

import zlib
from array import array
from bisect import bisect_right

BLOCK_BYTES = 8192  # raw names per block: 4x smaller at 8 KiB, 5x at 64 KiB but 10x slower
LEVEL = 6
DECODED = 1024  # names kept decoded per table (by default); past it the cache starts over


class PackedNames:
    """NUL-terminated names addressed by their offset in the raw (uncompressed) blob."""

    __slots__ = ("_block_at", "_blocks", "_decoded", "_keep", "raw_size")

    def __init__(self, blob: bytes | bytearray, decoded: int = DECODED) -> None:
        self.raw_size = len(blob)
        self._keep = decoded
        self._block_at = array("L")  # raw offset of each block's first byte
        self._blocks: list[bytes] = []
        at = 0
        while at < len(blob):
            end = blob.find(b"\0", min(at + BLOCK_BYTES, len(blob)) - 1)
            end = len(blob) if end < 0 else end + 1  # blocks end after a name's NUL
            self._block_at.append(at)
            self._blocks.append(zlib.compress(blob[at:end], LEVEL))
            at = end
        self._decoded: dict[int, str] = {}

    @property
    def nbytes(self) -> int:
        """Memory held: the compressed blocks and their offsets (not the decoded cache)."""
        return sum(map(len, self._blocks)) + self._block_at.itemsize * len(self._block_at)

    def text(self, at: int) -> str:
        """The name that starts at raw offset `at`, up to its NUL (or the end)."""
        name = self._decoded.get(at)
        if name is not None:
            return name
        block = bisect_right(self._block_at, at) - 1
        if block < 0:
            raise IndexError(f"name offset {at} out of range")
        data = zlib.decompress(self._blocks[block])
        start = at - self._block_at[block]
        end = data.find(b"\0", start)
        name = data[start:end if end >= 0 else len(data)].decode("utf-8", "replace")
        if len(self._decoded) >= self._keep:
            self._decoded.clear()
        self._decoded[at] = name
        return name
