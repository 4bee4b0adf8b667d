"""Kernel frames: the text symbols of /proc/kallsyms, one Mapping per module with the build
id the kernel publishes under /sys.

A kernel has 100k+ text symbols. They are held in flat arrays (addresses, name offsets into
one blob of names held compressed, module indices: about 18 bytes a symbol) and a name is
decoded only when a sample hits it. As Python tuples and strings the same table took over
30 MB and twice that while parsing; with the names uncompressed, 5 MB.
"""

from __future__ import annotations

import re
from array import array
from bisect import bisect_right
from collections.abc import Iterable
from pathlib import Path

from otel_ebpf.symbolize.elfread import notes_build_id
from otel_ebpf.symbolize.frames import KERNEL, Frame, Mapping
from otel_ebpf.symbolize.names import PackedNames

KALLSYMS = Path("/proc/kallsyms")
SYSFS = Path("/sys")
# address, type, name, [module]; text symbols (tTwW) only
_LINE = re.compile(rb"^([0-9a-fA-F]+) [tTwW] (\S+)(?:\s+\[(\S+)\])?[ \t]*$", re.M)
# Region markers, not functions: an address in such a group resolves to nothing.
_MARKERS = frozenset({b"_text", b"_stext", b"_etext", b"_sinittext", b"_einittext"})
# kallsyms has no sizes; past the last symbol of a module the extent is unknown, and kernel
# functions beyond this size are practically nonexistent.
_MAX_KERNEL_TAIL = 1 << 16
_SEQ_BITS = 24  # room for 16M symbols in the sort key
# Kernel frames are looked up for every sampled stack (user frames are cached per mapping),
# and a busy node's stacks touch a few thousand kernel functions: keep those decoded.
KERNEL_DECODED = 8192


class KernelSymbols:
    """Text symbols of /proc/kallsyms; `usable` is False when the addresses are hidden
    (zeroed by kptr_restrict for unprivileged readers), and then nothing resolves."""

    __slots__ = ("_mappings", "_module", "_names", "_offsets", "_starts", "usable")

    def __init__(self, starts: array[int], offsets: array[int], names: bytes,
                 module: array[int], mappings: list[Mapping]) -> None:
        # symbol i: starts[i], the NUL-terminated name at names[offsets[i]] unless
        # offsets[i] == offsets[i + 1] (a region marker), mapping mappings[module[i]]
        self._starts, self._offsets, self._names = (
            starts, offsets, PackedNames(names, KERNEL_DECODED))
        self._module, self._mappings = module, mappings
        self.usable = len(starts) > 0

    @classmethod
    def empty(cls) -> KernelSymbols:
        return cls(array("Q"), array("I", [0]), b"", array("H"), [])

    @classmethod
    def load(cls, path: Path = KALLSYMS, sysfs: Path | None = SYSFS) -> KernelSymbols:
        return cls.from_bytes(path.read_bytes(), sysfs)

    @classmethod
    def parse(cls, lines: Iterable[str], sysfs: Path | None = None) -> KernelSymbols:
        return cls.from_bytes("\n".join(lines).encode(), sysfs)

    @classmethod
    def from_bytes(cls, data: bytes, sysfs: Path | None = None) -> KernelSymbols:
        # One int per symbol sorts the table: address, then among aliases at one address a
        # function over a marker, fewer leading underscores, the first listed.
        keys: list[int] = []
        seq_names, seq_offsets, seq_modules = bytearray(), array("L", [0]), array("H")
        module_index: dict[bytes, int] = {}
        for seq, match in enumerate(_LINE.finditer(data)):
            name = match[2]
            marker = name in _MARKERS or name.endswith((b"_text_start", b"_text_end"))
            underscores = min(len(name) - len(name.lstrip(b"_")), 127)
            keys.append(int(match[1], 16) << 32 | (marker << 7 | underscores) << _SEQ_BITS | seq)
            if not marker:
                seq_names += name
            seq_offsets.append(len(seq_names))
            seq_modules.append(module_index.setdefault(match[3] or b"", len(module_index)))
        if not any(key >> 32 for key in keys):
            return cls.empty()
        keys.sort()
        starts, offsets, module = array("Q"), array("I", [0]), array("H")
        blob = bytearray()
        seq_mask = (1 << _SEQ_BITS) - 1
        for key in keys:
            start, seq = key >> 32, key & seq_mask
            if starts and starts[-1] == start:
                continue  # a group of markers only stays as a boundary resolving to nothing
            starts.append(start)
            low, high = seq_offsets[seq], seq_offsets[seq + 1]
            if low < high:
                blob += seq_names[low:high] + b"\0"
            offsets.append(len(blob))
            module.append(seq_modules[seq])
        del keys, seq_names, seq_offsets, seq_modules
        names = [b.decode(errors="replace") for b, _ in sorted(module_index.items(),
                                                                key=lambda item: item[1])]
        table = cls(starts, offsets, bytes(blob), module, [])
        table._mappings = _module_mappings(table, names, sysfs)
        return table

    def _end(self, i: int) -> int:
        start = self._starts[i]
        if i + 1 == len(self._starts):
            return start + _MAX_KERNEL_TAIL
        if self._module[i + 1] == self._module[i]:
            return self._starts[i + 1]
        return min(start + _MAX_KERNEL_TAIL, self._starts[i + 1])

    def resolve(self, addr: int, return_address: bool = False) -> Frame | None:
        """The frame of `addr`; a return address is looked up one byte back, so a call that
        ends its function does not land in the next one."""
        lookup = addr - 1 if return_address else addr
        i = bisect_right(self._starts, lookup) - 1
        if i < 0 or lookup >= self._end(i):
            return None
        low = self._offsets[i]
        if low == self._offsets[i + 1]:
            return None
        name = self._names.text(low)
        return Frame(addr, name, KERNEL, self._mappings[self._module[i]],
                     addr - self._starts[i])


def _module_mappings(table: KernelSymbols, names: list[str],
                     sysfs: Path | None) -> list[Mapping]:
    # One Mapping per module named like perf does ([kernel.kallsyms], [ext4]) spanning its
    # symbols, with the build id the kernel publishes, so backends can match debug info.
    low, high = [2**64] * len(names), [0] * len(names)
    starts, module = table._starts, table._module
    for i in range(len(starts)):  # per run of one module: its first start, its last end
        m = module[i]
        if i == 0 or module[i - 1] != m:
            low[m] = min(low[m], starts[i])
        if i + 1 == len(starts) or module[i + 1] != m:
            high[m] = max(high[m], table._end(i))
    return [Mapping(low[m], high[m], 0, f"[{name or 'kernel.kallsyms'}]",
                    _kernel_build_id(name, sysfs))
            for m, name in enumerate(names)]


def _kernel_build_id(module: str, sysfs: Path | None) -> str | None:
    if sysfs is None:
        return None
    notes = (sysfs / "module" / module / "notes" / ".note.gnu.build-id" if module
             else sysfs / "kernel" / "notes")
    try:
        return notes_build_id(notes.read_bytes())  # native byte order
    except OSError:
        return None
