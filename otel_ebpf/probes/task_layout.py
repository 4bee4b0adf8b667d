"""Where probes/syscall_latency.bpf.c finds a task's executable, from the running kernel's
BTF: -D flags for its compile (the headers BCC compiles with may be another kernel's).

The chain is task_struct.mm -> mm_struct.exe_file -> file.f_inode (the key: one inode per
executable, however many processes run it) and file.f_path.dentry -> dentry.d_name.name
(the executable's name, stored with a new key).
"""

from __future__ import annotations

from otel_ebpf.kernel import btf as kbtf

# cflag -> (struct, member path); every one a pointer the program reads
POINTER_FIELDS: dict[str, tuple[str, str]] = {
    "TASK_MM_OFF": ("task_struct", "mm"),
    "MM_EXE_FILE_OFF": ("mm_struct", "exe_file"),
    "FILE_INODE_OFF": ("file", "f_inode"),
    "FILE_DENTRY_OFF": ("file", "f_path.dentry"),
    "DENTRY_NAME_OFF": ("dentry", "d_name.name"),
}


def offset_flags(btf: kbtf.Btf) -> list[str]:
    """-D flags for every offset the program reads. Raises BtfError naming what is
    missing when the kernel's layout cannot be known."""
    return [f"-D{flag}={btf.member_offset(struct, path, btf.pointer_size)}"
            for flag, (struct, path) in POINTER_FIELDS.items()]
