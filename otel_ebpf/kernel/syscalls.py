"""Syscall number -> name, read from the kernel's own headers, checked against the running
kernel.

The running kernel exports no number->name table (sys_call_table is neither in
/proc/kallsyms without CONFIG_KALLSYMS_ALL nor used for dispatch since 6.9). Syscall numbers
are ABI and never renumbered, so the kernel's generated `unistd_64.h` (from the header tree
BCC uses, else the uapi headers of the C library) gives the numbers; the syscall trace
events in tracefs (`events/syscalls/sys_enter_<name>`) say which of those names this kernel
really has. A number neither source knows is exported as `syscall_<nr>`, never guessed.
"""

from __future__ import annotations

import logging
import platform
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

_ARCH_HEADERS = {
    "x86_64": ("arch/x86/include/generated/uapi/asm/unistd_64.h", "asm/unistd_64.h"),
    "aarch64": ("include/uapi/asm-generic/unistd.h", "asm-generic/unistd.h"),
}
_LIBC_INCLUDE_DIRS = (
    Path("/usr/include/x86_64-linux-gnu"),
    Path("/usr/include/aarch64-linux-gnu"),
    Path("/usr/include"),
)
_DEFINE = re.compile(r"^#define\s+__NR(?:3264)?_(\w+)\s+(\w+)", re.MULTILINE)
TRACEFS_SYSCALL_EVENTS = Path("/sys/kernel/tracing/events/syscalls")


def parse_unistd(text: str) -> dict[int, str]:
    """Numbers from `#define __NR_name N` lines; aliases (`__NR_x __NR3264_y`) resolved."""
    values: dict[str, str] = {}
    for name, value in _DEFINE.findall(text):
        values.setdefault(name, value)
    table: dict[int, str] = {}
    for name, value in values.items():
        seen = 0
        while not value.isdigit() and seen < 4:  # alias chains are short
            value = values.get(value.removeprefix("__NR3264_").removeprefix("__NR_"), "")
            seen += 1
        if value.isdigit() and name not in ("syscalls", "arch_specific_syscall"):
            table.setdefault(int(value), name)
    return table


@dataclass
class SyscallTable:
    names: dict[int, str]
    source: str
    # names the running kernel has trace events for; empty when tracefs was not readable
    kernel_names: frozenset[str] = field(default_factory=frozenset)

    def name(self, nr: int) -> str:
        return self.names.get(nr) or f"syscall_{nr}"

    def number(self, name: str) -> int | None:
        return next((nr for nr, n in self.names.items() if n == name), None)

    @property
    def unknown_to_kernel(self) -> list[str]:
        """Header names the running kernel has no trace event for (not built in, or the
        headers are of a different kernel)."""
        if not self.kernel_names:
            return []
        return sorted(set(self.names.values()) - self.kernel_names)


def _candidate_headers(header_roots: Iterable[Path], machine: str) -> list[Path]:
    in_tree, libc_name = _ARCH_HEADERS.get(machine, _ARCH_HEADERS["x86_64"])
    paths = [root / in_tree for root in header_roots]
    paths += [d / libc_name for d in _LIBC_INCLUDE_DIRS]
    return paths


def kernel_syscall_names(events_dir: Path = TRACEFS_SYSCALL_EVENTS) -> frozenset[str]:
    try:
        return frozenset(
            e.name.removeprefix("sys_enter_")
            for e in events_dir.iterdir()
            if e.name.startswith("sys_enter_")
        )
    except OSError:
        return frozenset()


def load(
    header_roots: Iterable[Path] = (),
    *,
    machine: str | None = None,
    events_dir: Path = TRACEFS_SYSCALL_EVENTS,
) -> SyscallTable:
    machine = machine or platform.machine()
    for path in _candidate_headers(header_roots, machine):
        try:
            table = parse_unistd(path.read_text())
        except OSError:
            continue
        if table:
            result = SyscallTable(table, str(path), kernel_syscall_names(events_dir))
            log.debug("syscall table: %d numbers from %s", len(table), path)
            return result
    log.warning(
        "no unistd header found for %s; syscalls are named syscall_<nr>. "
        "Fix: install the kernel or C library headers (make setup does).",
        machine,
    )
    return SyscallTable({}, "none", kernel_syscall_names(events_dir))
