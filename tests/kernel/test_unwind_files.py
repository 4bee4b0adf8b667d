"""The unwinder's user space (KernelUnwindTables) against real BPF maps and processes:
a process whose files are all known opens none of them, and a restart takes the tables
from the disk cache, compiling none, even with no compile budget."""

from __future__ import annotations

import contextlib
import ctypes as ct
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from otel_ebpf.kernel.maps import BpfMap
from otel_ebpf.symbolize.unwind import tables
from otel_ebpf.symbolize.unwind.disk import TableCache
from otel_ebpf.symbolize.unwind.shared import create_maps
from otel_ebpf.symbolize.unwind.tables import KernelUnwindTables

pytestmark = pytest.mark.kernel

def new_maps(rows: int = 1 << 20) -> tuple[BpfMap, BpfMap, BpfMap]:
    """The three maps of probes/user_stack.h, as the agent makes them."""
    return create_maps(rows, 64)


def close(maps: tuple[BpfMap, BpfMap, BpfMap]) -> None:
    for m in maps:
        os.close(m.fd)


@pytest.fixture
def maps() -> Iterator[tuple[BpfMap, BpfMap, BpfMap]]:
    made = new_maps()
    try:
        yield made
    finally:
        close(made)


def started(command: list[str]) -> subprocess.Popen[bytes]:
    """A process, once it has mapped libc."""
    proc = subprocess.Popen(command)
    deadline = time.monotonic() + 10
    while "libc.so" not in Path(f"/proc/{proc.pid}/maps").read_text():
        assert time.monotonic() < deadline, f"{command[0]} never mapped libc"
        time.sleep(0.01)
    return proc


@contextlib.contextmanager
def running(command: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    """A process started (libc mapped) for the block, killed after it."""
    proc = started(command)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def copy_of_sleep(path: Path) -> Path:
    sleep = shutil.which("sleep")
    assert sleep is not None
    shutil.copy(sleep, path)
    return path


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Two processes of one executable, mapped (libc and all) before they are used."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs += [started(["sleep", "120"]) for _ in range(2)]
        yield procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def mappings(procs: BpfMap, pid: int) -> list[tuple[int, int, int, bool]]:
    """(start, end, bias, has a table) of the process's entry in the kernel."""
    value = procs.get(ct.c_uint32(pid))
    assert value is not None, f"no entry for {pid}"
    raw = bytes(value)
    count = tables._PROC_HEAD.unpack_from(raw)[0]
    out = []
    for i in range(count):
        start, end, bias, table_id, _ = tables._MAPPING.unpack_from(
            raw, tables._PROC_HEAD.size + i * tables._MAPPING.size)
        out.append((start, end, bias, table_id != tables.NO_TABLE))
    return out


def test_a_process_whose_files_are_known_opens_none(
        maps: tuple[BpfMap, BpfMap, BpfMap], sleepers: list[subprocess.Popen[bytes]]
        ) -> None:
    unwind = KernelUnwindTables(*maps)
    first, second = sleepers
    assert unwind.add_process(first.pid)
    opened, compiled = unwind.stats.files_opened, unwind.stats.files_compiled
    assert opened >= 3 and compiled == opened  # sleep, libc, ld.so at least
    assert unwind.add_process(second.pid)
    assert unwind.complete(second.pid)
    assert (unwind.stats.files_opened, unwind.stats.files_compiled) == (opened, compiled)
    with_table = [m for m in mappings(maps[2], second.pid) if m[3]]
    assert len(with_table) >= 3 and len(with_table) == len(
        [m for m in mappings(maps[2], first.pid) if m[3]])


def test_a_file_replaced_under_its_path_is_opened_again(
        maps: tuple[BpfMap, BpfMap, BpfMap], tmp_path: Path) -> None:
    # an installer writes the new file beside the old and renames it over: a new inode
    binary = copy_of_sleep(tmp_path / "sleep")
    unwind = KernelUnwindTables(*maps)
    with running([str(binary), "120"]) as old:
        assert unwind.add_process(old.pid)
        opened, compiled = unwind.stats.files_opened, unwind.stats.files_compiled
        os.replace(copy_of_sleep(tmp_path / "sleep.new"), binary)
        with running([str(binary), "120"]) as new:
            assert unwind.add_process(new.pid) and unwind.complete(new.pid)
            # the new inode is opened; its build id is the old one's: no compile
            assert unwind.stats.files_opened == opened + 1
            assert unwind.stats.files_compiled == compiled


def test_a_new_file_on_an_old_inode_is_opened(
        maps: tuple[BpfMap, BpfMap, BpfMap], tmp_path: Path) -> None:
    # a program rebuilt: the linker unlinks the old file and the new one may get its
    # inode number back; here the same inode is rewritten, which is what that looks like
    # from the maps (same path, same device and inode, another file)
    binary = copy_of_sleep(tmp_path / "app")
    unwind = KernelUnwindTables(*maps)
    with running([str(binary), "120"]) as old:
        assert unwind.add_process(old.pid)
    opened = unwind.stats.files_opened
    inode = binary.stat().st_ino
    with open(binary, "r+b") as f:  # not running any more: no ETXTBSY
        f.write(f.read())  # twice the size: another file
    assert binary.stat().st_ino == inode
    with running([str(binary), "120"]) as new:
        assert unwind.add_process(new.pid)
        assert unwind.stats.files_opened == opened + 1


def test_a_restart_takes_the_tables_from_the_disk_cache_without_budget(
        maps: tuple[BpfMap, BpfMap, BpfMap], sleepers: list[subprocess.Popen[bytes]],
        tmp_path: Path) -> None:
    pid = sleepers[0].pid
    before = KernelUnwindTables(*maps, cache=TableCache(tmp_path))
    assert before.add_process(pid)
    compiled = before.stats.files_compiled
    assert compiled >= 3 and before.stats.files_cached == 0
    stored = sorted(p.name for p in tmp_path.iterdir())
    assert len(stored) == compiled

    again = new_maps()  # a new agent: new maps, nothing in memory
    try:
        after = KernelUnwindTables(*again, cache=TableCache(tmp_path))
        after.may_compile = lambda: False  # no budget: what is cached loads all the same
        assert after.add_process(pid) and after.complete(pid)
        assert after.stats.files_compiled == 0 and after.stats.compile_seconds == 0
        assert after.stats.files_cached == compiled
        assert mappings(again[2], pid) == mappings(maps[2], pid)
        assert after.rows_used == before.rows_used
        assert sorted(p.name for p in tmp_path.iterdir()) == stored
    finally:
        close(again)


def test_a_corrupt_entry_is_compiled_again(
        maps: tuple[BpfMap, BpfMap, BpfMap], sleepers: list[subprocess.Popen[bytes]],
        tmp_path: Path) -> None:
    pid = sleepers[0].pid
    before = KernelUnwindTables(*maps, cache=TableCache(tmp_path))
    assert before.add_process(pid)
    for path in tmp_path.iterdir():
        path.write_bytes(path.read_bytes()[:-1])
    again = new_maps()
    try:
        after = KernelUnwindTables(*again, cache=TableCache(tmp_path))
        assert after.add_process(pid) and after.complete(pid)
        assert after.stats.files_cached == 0
        assert after.stats.files_compiled == before.stats.files_compiled
        assert mappings(again[2], pid) == mappings(maps[2], pid)
    finally:
        close(again)


def test_a_table_too_large_for_the_budget_is_not_compiled_at_each_start(
        sleepers: list[subprocess.Popen[bytes]], tmp_path: Path) -> None:
    """A library past the row budget is remembered on disk with its size: a restart does
    not compile it again (seconds and tens of MB for the largest), a larger budget does."""
    pid = sleepers[0].pid
    runs: list[tables.UnwindStats] = []
    for rows in (4096, 4096, 1 << 20):  # 1,024 rows a file (libc has ~24k), then 262,144
        made = new_maps(rows)
        try:
            unwinder = KernelUnwindTables(*made, cache=TableCache(tmp_path))
            assert unwinder.add_process(pid)
            runs.append(unwinder.stats)
        finally:
            close(made)
    first, restart, larger = runs
    assert first.table_too_large >= 1 and first.files_compiled >= first.table_too_large
    assert restart.files_compiled == 0
    assert restart.table_too_large == first.table_too_large
    assert larger.table_too_large == 0 and larger.files_compiled == first.table_too_large
