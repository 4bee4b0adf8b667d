from __future__ import annotations

from pathlib import Path

from otel_ebpf.kernel import syscalls

UNISTD = """#ifndef _ASM_UNISTD_64_H
#define __NR_read 0
#define __NR_write 1
#define __NR_getppid 110
#define __NR3264_fcntl 25
#define __NR_fcntl __NR3264_fcntl
#define __NR_syscalls 451
#endif
"""


def test_parse_unistd_resolves_aliases_and_skips_counts() -> None:
    table = syscalls.parse_unistd(UNISTD)
    assert table == {0: "read", 1: "write", 110: "getppid", 25: "fcntl"}


def test_load_prefers_the_header_tree_and_checks_the_kernel(tmp_path: Path) -> None:
    header = tmp_path / "arch/x86/include/generated/uapi/asm/unistd_64.h"
    header.parent.mkdir(parents=True)
    header.write_text(UNISTD)
    events = tmp_path / "events"
    for name in ("read", "write", "getppid"):
        (events / f"sys_enter_{name}").mkdir(parents=True)
    table = syscalls.load([tmp_path], machine="x86_64", events_dir=events)
    assert table.source == str(header)
    assert table.name(110) == "getppid"
    assert table.name(999) == "syscall_999"  # never guessed
    assert table.number("write") == 1
    assert table.unknown_to_kernel == ["fcntl"]


def test_running_kernel_names_come_from_tracefs(tmp_path: Path) -> None:
    assert syscalls.kernel_syscall_names(tmp_path / "absent") == frozenset()
