"""The disk cache of compiled unwind tables (otel_ebpf.symbolize.unwind.disk): hits,
misses, what it refuses to trust, its bound and its switch. Its use by the loader, with
real BPF maps and processes, is in tests/kernel/test_unwind_files.py."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from otel_ebpf.symbolize.unwind import cfi, disk
from otel_ebpf.symbolize.unwind.disk import Cached, TableCache

BUILD_ID = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def table() -> cfi.UnwindTable:
    path = shutil.which("true")
    assert path is not None
    with open(path, "rb") as f:
        compiled = cfi.compile_file(f)
    assert compiled is not None and len(compiled) > 10
    return compiled


def entry(directory: Path, key: str | disk.FileKey) -> Path:
    name = disk.entry_name(key)
    assert name is not None
    return directory / name


def test_a_stored_table_is_read_back_whole_by_another_run(tmp_path: Path,
                                                            table: cfi.UnwindTable) -> None:
    TableCache(tmp_path / "unwind").store(BUILD_ID, table)
    found = TableCache(tmp_path / "unwind").load(BUILD_ID)
    assert found == Cached(table)
    assert found is not None and found.table is not None
    assert found.table.rows == table.rows and found.table.segments == table.segments
    # written by the agent only: 0700 directory, 0600 entry, no temporary file left
    assert (tmp_path / "unwind").stat().st_mode & 0o777 == 0o700
    assert entry(tmp_path / "unwind", BUILD_ID).stat().st_mode & 0o777 == 0o600
    assert [p.suffix for p in (tmp_path / "unwind").iterdir()] == [".rows"]


def test_a_file_without_a_table_is_remembered_as_such(tmp_path: Path) -> None:
    cache = TableCache(tmp_path)
    key = (2049, 1234, 1_700_000_000_000_000_000, 4096)
    assert cache.load(key) is None
    cache.store(key, None)
    assert cache.load(key) == Cached(None)
    assert cache.load((2049, 1234, 1_700_000_000_000_000_001, 4096)) is None  # mtime
    assert cache.load(BUILD_ID) is None


def test_a_table_too_large_is_remembered_with_its_size(tmp_path: Path) -> None:
    cache = TableCache(tmp_path)
    cache.store(BUILD_ID, None, too_large_rows=300_000)
    assert cache.load(BUILD_ID) == Cached(None, 300_000)
    path = entry(tmp_path, BUILD_ID)
    path.write_bytes(path.read_bytes() + b"x")  # a body where none belongs: damaged
    assert cache.load(BUILD_ID) is None


def test_keys_are_names_only_and_carry_the_compiler_version(table: cfi.UnwindTable,
                                                            tmp_path: Path) -> None:
    assert disk.entry_name("../../etc/passwd") is None
    TableCache(tmp_path).store("../x", table)
    assert list(tmp_path.iterdir()) == []
    name = disk.entry_name(BUILD_ID)
    assert name == f"{BUILD_ID}.{disk.VERSION}.rows"


@pytest.mark.parametrize("damage", ["truncated", "flipped", "empty", "other_format"])
def test_a_damaged_entry_is_a_miss_and_is_replaced(tmp_path: Path, table: cfi.UnwindTable,
                                                   damage: str) -> None:
    cache = TableCache(tmp_path)
    cache.store(BUILD_ID, table)
    path = entry(tmp_path, BUILD_ID)
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        del data[-3:]
    elif damage == "flipped":
        data[len(data) // 2] ^= 0x40
    elif damage == "empty":
        data.clear()
    else:
        data[4] += 1  # the format field
    path.write_bytes(bytes(data))
    assert cache.load(BUILD_ID) is None
    cache.store(BUILD_ID, table)
    assert cache.load(BUILD_ID) == Cached(table)


def test_an_entry_others_could_write_is_ignored(tmp_path: Path,
                                                table: cfi.UnwindTable) -> None:
    cache = TableCache(tmp_path / "unwind")
    cache.store(BUILD_ID, table)
    path = entry(tmp_path / "unwind", BUILD_ID)
    path.chmod(0o620)
    assert cache.load(BUILD_ID) is None
    path.chmod(0o600)
    assert cache.load(BUILD_ID) == Cached(table)
    if os.geteuid() == 0:  # another owner (only root can give a file away)
        os.chown(path, 65534, 65534)
        assert cache.load(BUILD_ID) is None
        os.chown(path, 0, 0)
    # a link in its place, even to a good entry, is not followed
    other = tmp_path / "elsewhere.rows"
    path.rename(other)
    path.symlink_to(other)
    assert cache.load(BUILD_ID) is None


def test_a_directory_others_could_write_is_neither_read_nor_written(
        tmp_path: Path, table: cfi.UnwindTable) -> None:
    directory = tmp_path / "unwind"
    cache = TableCache(directory)
    cache.store(BUILD_ID, table)
    directory.chmod(0o777)
    assert cache.load(BUILD_ID) is None
    cache.store("ab" * 20, table)
    assert not entry(directory, "ab" * 20).exists()


def test_the_least_recently_used_entries_go_past_the_bound(tmp_path: Path,
                                                           table: cfi.UnwindTable) -> None:
    size = len(disk.encode(table))
    cache = TableCache(tmp_path, max_bytes=10 * size)
    keys = [f"{i:040x}" for i in range(10)]
    for i, key in enumerate(keys):
        cache.store(key, table)
        os.utime(entry(tmp_path, key), (1_000_000 + i, 1_000_000 + i))
    assert all(entry(tmp_path, key).exists() for key in keys)  # at the bound: kept
    assert cache.load(keys[0]) is not None  # used now: the most recent
    (tmp_path / "dead.tmp").write_bytes(b"x")  # a write that died long ago
    os.utime(tmp_path / "dead.tmp", (1_000_000, 1_000_000))
    cache.store(f"{10:040x}", table)  # (1/16 of the bound is less than an entry: trims)
    kept = {key for key in [*keys, f"{10:040x}"] if entry(tmp_path, key).exists()}
    # down to 90 % of the bound: the two least recently used of eleven go
    assert kept == {keys[0], *keys[3:], f"{10:040x}"}
    assert not (tmp_path / "dead.tmp").exists()


def test_stores_trim_at_the_first_and_then_every_sixteenth_of_the_bound(
        tmp_path: Path, table: cfi.UnwindTable) -> None:
    size = len(disk.encode(table))
    cache = TableCache(tmp_path, max_bytes=64 * size)  # trims every 4 entries' bytes
    cache.store(f"{0:040x}", table)  # the first store trims: nothing to do
    old = entry(tmp_path, f"{99:040x}")
    old.write_bytes(b"\0" * 64 * size)  # over the bound, the least recently used
    old.chmod(0o600)
    os.utime(old, (1_000_000, 1_000_000))
    for i in range(1, 4):  # 3 entries' bytes since the trim: no scan of the directory
        cache.store(f"{i:040x}", table)
    assert old.exists()
    cache.store(f"{4:040x}", table)  # the fourth: trimmed
    assert not old.exists()
    assert all(entry(tmp_path, f"{i:040x}").exists() for i in range(5))


def test_the_compile_cache_switch_turns_it_off(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    monkeypatch.setenv("OTEL_EBPF_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("OTEL_EBPF_COMPILE_CACHE", raising=False)
    found = disk.default()
    assert found is not None and found.directory == tmp_path / "unwind"
    monkeypatch.setenv("OTEL_EBPF_COMPILE_CACHE", "off")
    assert disk.default() is None
