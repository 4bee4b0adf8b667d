"""Names of JIT-compiled code from /tmp/perf-<pid>.map (perf's JIT interface: one
`START SIZE name` line per function, hexadecimal, appended as code is compiled), written by
Node (--perf-basic-prof), Python 3.12+ (-X perf) and Java with a perf-map agent.

The file is the process's own /tmp (read through /proc/<pid>/root, named with the pid the
process has in its own namespace). It grows while the process runs: it is read again when
an address was not found and its size changed (a stat at most every REREAD_AFTER per
process). The frame type follows the semantic conventions' profile.frame.type, from the
executable's name.
"""

from __future__ import annotations

import os
import time
from array import array
from bisect import bisect_right
from collections import OrderedDict
from pathlib import Path

from otel_ebpf.symbolize.frames import CPYTHON, JVM, NATIVE, V8JS

REREAD_AFTER = 0.25  # seconds between two looks at the file of one process
MAX_BYTES = 64 << 20  # a perf map larger than this is not read


def frame_type(exe_name: str) -> str:
    name = exe_name.lower()
    if name in ("node", "nodejs") or name.startswith("node"):
        return V8JS
    if name == "java" or name.startswith("java"):
        return JVM
    if name.startswith("python"):
        return CPYTHON
    return NATIVE


class _PerfMap:
    __slots__ = ("checked", "kind", "names", "path", "reread_after", "signature", "sizes",
                 "starts")

    def __init__(self, path: str, kind: str, reread_after: float) -> None:
        self.path, self.kind, self.reread_after = path, kind, reread_after
        self.starts: array[int] = array("Q")
        self.sizes: array[int] = array("Q")
        self.names: list[str] = []
        self.signature: tuple[int, int] | None = None
        self.checked = 0.0

    def refresh(self) -> None:
        now = time.monotonic()
        if now - self.checked < self.reread_after:
            return
        self.checked = now
        try:
            st = os.stat(self.path)
        except OSError:
            return
        signature = (st.st_ino, st.st_size)
        if signature == self.signature or st.st_size > MAX_BYTES:
            return
        try:
            text = Path(self.path).read_text(errors="replace")
        except OSError:
            return
        entries: list[tuple[int, int, str]] = []
        for line in text.splitlines():
            parts = line.split(" ", 2)
            if len(parts) != 3:
                continue
            try:
                entries.append((int(parts[0], 16), int(parts[1], 16), parts[2]))
            except ValueError:
                continue
        # later lines win for the same start (code moved or recompiled)
        by_start = {start: (size, name) for start, size, name in entries}
        ordered = sorted(by_start.items())
        self.starts = array("Q", (s for s, _ in ordered))
        self.sizes = array("Q", (v[0] for _, v in ordered))
        self.names = [v[1] for _, v in ordered]
        self.signature = signature

    def lookup(self, addr: int) -> tuple[str, int] | None:
        i = bisect_right(self.starts, addr) - 1
        if i >= 0 and addr < self.starts[i] + self.sizes[i]:
            return self.names[i], addr - self.starts[i]
        return None


def _ns_pid(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    except (OSError, ValueError):
        pass
    return pid


class PerfMaps:
    """JIT names per process, for addresses outside every mapped file."""

    def __init__(self, max_processes: int = 256, reread_after: float = REREAD_AFTER) -> None:
        self._maps: OrderedDict[int, _PerfMap] = OrderedDict()
        self._max, self._reread_after = max_processes, reread_after

    def lookup(self, pid: int, addr: int) -> tuple[str, int, str] | None:
        """(name, offset in it, frame type) of the JIT code at addr, or None."""
        perf_map = self._maps.get(pid) or self._open(pid)
        if perf_map is None:
            return None
        found = perf_map.lookup(addr)
        if found is None:  # compiled since the file was read?
            perf_map.refresh()
            found = perf_map.lookup(addr)
        return (found[0], found[1], perf_map.kind) if found is not None else None

    def _open(self, pid: int) -> _PerfMap | None:
        try:
            exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
        except OSError:
            return None  # gone: nothing to read
        # kept even while there is no file: it is looked for again on a miss (a stat at
        # most every REREAD_AFTER), and only for addresses outside every mapped file
        perf_map = self._maps[pid] = _PerfMap(
            f"/proc/{pid}/root/tmp/perf-{_ns_pid(pid)}.map", frame_type(exe),
            self._reread_after)
        while len(self._maps) > self._max:
            self._maps.popitem(last=False)
        return perf_map

    def forget(self, pid: int) -> None:
        self._maps.pop(pid, None)
