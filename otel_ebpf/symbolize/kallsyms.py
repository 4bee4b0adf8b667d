"""Kernel frames: the text symbols of /proc/kallsyms, one Mapping per module with the build
id the kernel publishes under /sys."""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Iterable
from pathlib import Path

from otel_ebpf.symbolize import elf
from otel_ebpf.symbolize.frames import KERNEL, Frame, Mapping

KALLSYMS = Path("/proc/kallsyms")
SYSFS = Path("/sys")
_TEXT_TYPES = frozenset("tTwW")
# Region markers, not functions: an address in such a group resolves to nothing.
_MARKERS = frozenset({"_text", "_stext", "_etext", "_sinittext", "_einittext"})
# kallsyms has no sizes; past the last symbol of a module the extent is unknown, and kernel
# functions beyond this size are practically nonexistent.
_MAX_KERNEL_TAIL = 1 << 16


class KernelSymbols:
    """Text symbols of /proc/kallsyms; `usable` is False when the addresses are hidden
    (zeroed by kptr_restrict for unprivileged readers), and then nothing resolves."""

    def __init__(self, starts: array[int], ends: array[int], names: list[str | None],
                 mappings: list[Mapping]) -> None:
        self._starts, self._ends, self._names, self._mappings = starts, ends, names, mappings
        self.usable = len(starts) > 0

    @classmethod
    def load(cls, path: Path = KALLSYMS, sysfs: Path | None = SYSFS) -> KernelSymbols:
        with path.open() as f:
            return cls.parse(f, sysfs)

    @classmethod
    def parse(cls, lines: Iterable[str], sysfs: Path | None = None) -> KernelSymbols:
        entries: list[tuple[int, bool, int, int, str, str]] = []
        for seq, line in enumerate(lines):
            fields = line.split()
            if len(fields) < 3 or fields[1] not in _TEXT_TYPES:
                continue
            name = fields[2]
            marker = name in _MARKERS or name.endswith(("_text_start", "_text_end"))
            module = fields[3].strip("[]") if len(fields) > 3 else ""
            entries.append((int(fields[0], 16), marker, _underscores(name), seq, name, module))
        if not any(e[0] for e in entries):
            return cls(array("Q"), array("Q"), [], [])
        # Aliases at one address: a function over a marker, fewer leading underscores, the
        # first listed; a group of markers only stays as a boundary that resolves to nothing.
        entries.sort()
        starts, ends, names, modules = array("Q"), array("Q"), [], []
        for start, marker, _, _, name, module in entries:
            if starts and starts[-1] == start:
                continue
            starts.append(start)
            names.append(None if marker else name)
            modules.append(module)
        for i, start in enumerate(starts):
            if i + 1 == len(starts):
                ends.append(start + _MAX_KERNEL_TAIL)
            elif modules[i + 1] == modules[i]:
                ends.append(starts[i + 1])
            else:
                ends.append(min(start + _MAX_KERNEL_TAIL, starts[i + 1]))
        return cls(starts, ends, names, _module_mappings(starts, ends, modules, sysfs))

    def resolve(self, addr: int, return_address: bool = False) -> Frame | None:
        """The frame of `addr`; a return address is looked up one byte back, so a call that
        ends its function does not land in the next one."""
        lookup = addr - 1 if return_address else addr
        i = bisect_right(self._starts, lookup) - 1
        if i < 0 or lookup >= self._ends[i] or self._names[i] is None:
            return None
        return Frame(addr, self._names[i], KERNEL, self._mappings[i], addr - self._starts[i])


def _module_mappings(starts: array[int], ends: array[int], modules: list[str],
                     sysfs: Path | None) -> list[Mapping]:
    # One Mapping per module named like perf does ([kernel.kallsyms], [ext4]) spanning its
    # symbols, with the build id the kernel publishes, so backends can match debug info.
    spans: dict[str, tuple[int, int]] = {}
    for start, end, module in zip(starts, ends, modules, strict=True):
        low, high = spans.get(module, (start, end))
        spans[module] = (min(low, start), max(high, end))
    by_module = {
        module: Mapping(low, high, 0, f"[{module or 'kernel.kallsyms'}]",
                        _kernel_build_id(module, sysfs))
        for module, (low, high) in spans.items()}
    return [by_module[m] for m in modules]


def _kernel_build_id(module: str, sysfs: Path | None) -> str | None:
    if sysfs is None:
        return None
    notes = (sysfs / "module" / module / "notes" / ".note.gnu.build-id" if module
             else sysfs / "kernel" / "notes")
    try:
        return elf.build_id_from_notes(notes.read_bytes())
    except OSError:
        return None


def _underscores(name: str) -> int:
    return len(name) - len(name.lstrip("_"))
