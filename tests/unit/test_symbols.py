"""Symbolization against real processes built here (gcc) and kallsyms text; no root needed,
except for the one test that reads real kernel addresses (skipped when they are hidden)."""

from __future__ import annotations

import lzma
import os
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from otel_ebpf.symbolize import elf
from otel_ebpf.symbolize.symbols import (
    KERNEL,
    NATIVE,
    KernelSymbols,
    Symbolizer,
    parse_maps,
)

HELPER = Path(__file__).parents[1] / "helpers" / "sym_target.c"


@dataclass(frozen=True)
class Target:
    binary: Path
    pid: int
    leaf: int  # sym_target_leaf
    asm: int  # sym_asm_nosize (a FUNC symbol of size 0)
    getppid: int  # libc's
    main: int


def build(out: Path, *flags: str) -> Path:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    subprocess.run([cc, "-O0", "-g", "-fno-omit-frame-pointer", "-fPIE", "-pie", *flags,
                    "-o", str(out), str(HELPER)], check=True)
    return out


def readelf_build_id(path: Path | str) -> str:
    notes = subprocess.run(["readelf", "-n", str(path)], capture_output=True, text=True,
                           check=True).stdout
    match = re.search(r"Build ID: ([0-9a-f]+)", notes)
    assert match, notes
    return match.group(1)


@pytest.fixture(scope="module")
def binaries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("sym")
    return {"debug": build(out / "sym_debug"),
            "stripped": build(out / "sym_stripped", "-s"),
            "exported": build(out / "sym_exported", "-s", "-rdynamic")}


def start(binary: Path) -> tuple[subprocess.Popen[str], Target]:
    proc = subprocess.Popen([str(binary)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    leaf, asm, getppid, main = (int(x, 16) for x in proc.stdout.readline().split())
    return proc, Target(binary, proc.pid, leaf, asm, getppid, main)


@pytest.fixture
def run(binaries: dict[str, Path]) -> Iterator[dict[str, Target]]:
    procs: list[subprocess.Popen[str]] = []
    targets: dict[str, Target] = {}
    for name, binary in binaries.items():
        proc, targets[name] = start(binary)
        procs.append(proc)
    yield targets
    for proc in procs:
        proc.kill()
        proc.wait()


def test_own_function_with_build_id(run: dict[str, Target]) -> None:
    target = run["debug"]
    sym = Symbolizer(sysfs=None)
    assert sym.remember(target.pid)
    frame, = sym.user_frames(target.pid, [target.leaf + 5])
    assert (frame.function, frame.kind, frame.offset_in_function) == ("sym_target_leaf",
                                                                      NATIVE, 5)
    assert frame.address == target.leaf + 5
    assert frame.mapping is not None
    assert frame.mapping.path == str(target.binary)
    assert frame.mapping.build_id == readelf_build_id(target.binary)
    assert frame.mapping.start <= frame.address < frame.mapping.end


def test_size_zero_symbol_extends_to_next_function(run: dict[str, Target]) -> None:
    target = run["debug"]
    frames = Symbolizer(sysfs=None).user_frames(target.pid, [target.asm, target.asm + 3])
    assert [f.function for f in frames] == ["sym_asm_nosize", "sym_asm_nosize"]


def test_return_addresses_are_looked_up_one_byte_back(run: dict[str, Target]) -> None:
    target = run["debug"]
    leaf, caller = Symbolizer(sysfs=None).user_frames(target.pid, [target.main, target.main])
    assert (leaf.function, leaf.offset_in_function) == ("main", 0)
    # a return address at a function's first byte belongs to a call ending the one before
    assert caller.function != "main"
    assert caller.address == target.main


def test_libc_function(run: dict[str, Target]) -> None:
    target = run["debug"]
    frame, = Symbolizer(sysfs=None).user_frames(target.pid, [target.getppid + 1])
    assert frame.function == "getppid"
    assert frame.mapping is not None
    assert re.search(r"/libc[.-]", frame.mapping.path)
    assert frame.mapping.build_id == readelf_build_id(f"/proc/{target.pid}/root"
                                                      f"{frame.mapping.path}")


def test_exited_process_resolves_from_snapshot(binaries: dict[str, Path]) -> None:
    proc, target = start(binaries["debug"])
    sym = Symbolizer(sysfs=None)
    sym.remember(target.pid)
    proc.kill()
    proc.wait()
    assert not Path(f"/proc/{target.pid}").exists()
    leaf, libc = sym.user_frames(target.pid, [target.leaf, target.getppid + 2])
    assert (leaf.function, libc.function) == ("sym_target_leaf", "getppid")
    sym.forget(target.pid)
    frame, = sym.user_frames(target.pid, [target.leaf])
    assert (frame.function, frame.mapping, frame.address) == (None, None, target.leaf)


def map_files_readable() -> bool:
    # opening /proc/<pid>/map_files/* needs CAP_SYS_ADMIN (or CAP_CHECKPOINT_RESTORE)
    entry = next(iter(Path("/proc/self/map_files").iterdir()), None)
    try:
        with open(entry or "/nonexistent", "rb"):
            return True
    except OSError:
        return False


def test_deleted_binary_resolves_through_map_files(binaries: dict[str, Path],
                                                   tmp_path: Path) -> None:
    if not map_files_readable():
        pytest.skip("/proc/<pid>/map_files needs CAP_SYS_ADMIN")
    copy = tmp_path / "sym_deleted"
    shutil.copy(binaries["debug"], copy)
    proc, target = start(copy)
    try:
        build_id = readelf_build_id(copy)
        copy.unlink()
        frame, = Symbolizer(sysfs=None).user_frames(target.pid, [target.leaf])
        assert frame.function == "sym_target_leaf"
        assert frame.mapping is not None
        assert (frame.mapping.path, frame.mapping.build_id) == (str(copy), build_id)
    finally:
        proc.kill()
        proc.wait()


def test_stripped_binary_keeps_address_and_mapping(run: dict[str, Target]) -> None:
    target = run["stripped"]
    sym = Symbolizer(sysfs=None)
    frame, libc = sym.user_frames(target.pid, [target.leaf + 3, target.getppid + 2])
    assert (frame.function, frame.address, frame.offset_in_function) == (
        None, target.leaf + 3, 0)
    assert frame.mapping is not None
    assert frame.mapping.path == str(target.binary)
    assert frame.mapping.build_id == readelf_build_id(target.binary)
    assert libc.function == "getppid"
    stats = sym.stats()
    assert (stats.user_resolved, stats.user_unresolved) == (1, 1)


def test_stripped_binary_with_exports_uses_dynsym(run: dict[str, Target]) -> None:
    target = run["exported"]
    frame, = Symbolizer(sysfs=None).user_frames(target.pid, [target.leaf + 3])
    assert (frame.function, frame.offset_in_function) == ("sym_target_leaf", 3)


def test_minidebuginfo(binaries: dict[str, Path], tmp_path: Path) -> None:
    # Fedora-style: the stripped file carries an xz-compressed .symtab in .gnu_debugdata
    objcopy = shutil.which("objcopy")
    if objcopy is None:
        pytest.skip("no objcopy")
    symbols_only = tmp_path / "symbols"
    subprocess.run([objcopy, "--only-keep-debug", str(binaries["debug"]), str(symbols_only)],
                   check=True)
    subprocess.run([objcopy, "--strip-debug", str(symbols_only)], check=True)
    packed = tmp_path / "debugdata.xz"
    packed.write_bytes(lzma.compress(symbols_only.read_bytes(), format=lzma.FORMAT_XZ))
    mini = tmp_path / "mini"
    subprocess.run([objcopy, f"--add-section=.gnu_debugdata={packed}",
                    str(binaries["stripped"]), str(mini)], check=True)
    with mini.open("rb") as f:
        table = elf.load(f, debug_root=None)
    leaf = int(re.findall(r"(\w+) +\d+ FUNC .* sym_target_leaf\n", subprocess.run(
        ["readelf", "-sW", str(binaries["debug"])], capture_output=True, text=True).stdout)[0],
        16)
    assert table.source == "minidebuginfo"
    assert table.lookup(leaf + 3) == ("sym_target_leaf", leaf)


def test_vdso_functions_are_named(run: dict[str, Target], tmp_path: Path) -> None:
    target = run["debug"]
    vdso = [m for m in parse_maps(Path(f"/proc/{target.pid}/maps").read_text())
            if m.path == "[vdso]"]
    own = [line.split()[0] for line in Path("/proc/self/maps").read_text().splitlines()
           if line.endswith(" [vdso]")]
    if not vdso or not own:
        pytest.skip("no vdso mapped")
    # an independent reading of the image: our own vDSO dumped and listed by readelf
    start, end = (int(x, 16) for x in own[0].split("-"))
    with open("/proc/self/mem", "rb", buffering=0) as mem:
        mem.seek(start)
        (tmp_path / "vdso.so").write_bytes(mem.read(end - start))
    listing = subprocess.run(["readelf", "-sW", str(tmp_path / "vdso.so")],
                             capture_output=True, text=True, check=True).stdout
    functions = [line.split() for line in listing.splitlines() if " FUNC " in line]
    value = next(int(f[1], 16) for f in functions if int(f[2]) > 1)
    names = {f[7].split("@")[0] for f in functions if int(f[1], 16) == value}
    frame, = Symbolizer(sysfs=None).user_frames(target.pid, [vdso[0].start + value + 1])
    assert frame.function in names
    assert frame.mapping is not None
    assert (frame.mapping.path, frame.mapping.build_id) == ("[vdso]",
                                                            readelf_build_id(tmp_path / "vdso.so"))


def test_caches_are_bounded_and_counted(run: dict[str, Target]) -> None:
    sym = Symbolizer(max_files=2, max_processes=1, sysfs=None)
    first, second = run["debug"], run["stripped"]
    assert sym.remember(first.pid) and sym.remember(second.pid)
    assert sym.remember(second.pid)  # same process: kept, not reread
    stats = sym.stats()
    assert (stats.process_snapshots, stats.process_evictions) == (2, 1)
    # symbol tables load on the first sampled address in a file, not at the snapshot
    assert stats.file_misses == 0
    # the evicted snapshot is read again, and its binary's table loaded for this frame
    frame, = sym.user_frames(first.pid, [first.leaf])
    assert frame.function == "sym_target_leaf"
    assert sym.stats().file_misses > 0


def test_refresh_of_unchanged_maps_keeps_the_snapshot(run: dict[str, Target],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # an address outside every file mapping (JIT code) makes the symbolizer reread the
    # maps; when nothing changed, files and frames already resolved are kept
    import otel_ebpf.symbolize.symbols as symbols

    monkeypatch.setattr(symbols, "_MAPS_REFRESH_AFTER", 0.0)
    target = run["debug"]
    sym = Symbolizer(sysfs=None)
    frame, = sym.user_frames(target.pid, [target.leaf])
    assert frame.function == "sym_target_leaf"
    before = sym.stats()
    for _ in range(3):
        unknown, again = sym.user_frames(target.pid, [0x1000, target.leaf + 1])
        assert unknown.function is None and again.function == "sym_target_leaf"
    after = sym.stats()
    assert after.process_snapshots == before.process_snapshots == 1
    assert after.file_misses == before.file_misses


def test_symbolizers_share_one_table_per_binary(run: dict[str, Target]) -> None:
    # the probes' symbolizers (CPU profile, slow-call stacks) read a binary's table once
    target = run["debug"]
    first, second = Symbolizer(sysfs=None), Symbolizer(sysfs=None)
    frame, = first.user_frames(target.pid, [target.leaf])
    misses = first.stats().file_misses
    again, = second.user_frames(target.pid, [target.leaf])
    assert frame.function == again.function == "sym_target_leaf"
    assert second.stats().file_misses == misses  # the same cache: found, not loaded
    own = Symbolizer(max_files=8, sysfs=None)  # other bounds: a cache of its own
    assert own.user_frames(target.pid, [target.leaf])[0].function == "sym_target_leaf"
    assert own.stats().file_misses > 0


def test_parse_maps() -> None:
    text = (
        "55d0c0000000-55d0c0001000 r--p 00000000 fd:01 1234  /usr/bin/prog\n"
        "55d0c0001000-55d0c0002000 r-xp 00001000 fd:01 1234  /usr/bin/prog\n"
        "7f0000000000-7f0000001000 r-xp 00002000 08:02 99    /opt/my lib.so (deleted)\n"
        "7f0000002000-7f0000003000 rwxp 00000000 00:00 0 \n"
        "7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0     [vdso]\n")
    entries = parse_maps(text)
    assert [(e.path, e.offset) for e in entries] == [
        ("/usr/bin/prog", 0x1000), ("/opt/my lib.so", 0x2000), ("[anon]", 0), ("[vdso]", 0)]
    assert entries[0].dev == os.makedev(0xFD, 1) and entries[0].inode == 1234
    assert (entries[0].start, entries[0].end) == (0x55D0C0001000, 0x55D0C0002000)


KALLSYMS = """\
ffffffff81000000 T _stext
ffffffff81000000 T _text
ffffffff81000000 T startup_64
ffffffff81000100 t __pfx_do_one
ffffffff81000110 t do_one
ffffffff81000200 T __entry_text_end
ffffffff81000300 W weak_fn
ffffffff81000400 D some_data
ffffffff81000500 T _etext
ffffffffc0001000 t ext4_fill_super\t[ext4]
ffffffffc0001400 t ext4_remount\t[ext4]
"""


def test_kallsyms_fixture() -> None:
    kernel = KernelSymbols.parse(KALLSYMS.splitlines())
    assert kernel.usable

    def name(addr: int) -> str | None:
        frame = kernel.resolve(addr)
        return frame.function if frame is not None else None

    assert name(0xFFFFFFFF81000000) == "startup_64"  # a function over region markers
    assert name(0xFFFFFFFF81000115) == "do_one"
    assert name(0xFFFFFFFF81000250) is None  # after an end marker: no function known
    assert name(0xFFFFFFFF81000450) == "weak_fn"  # data symbols do not end functions
    assert name(0xFFFFFFFF81000600) is None  # past _etext
    assert name(0xFFFFFFFF80FFFFFF) is None
    frame = kernel.resolve(0xFFFFFFFFC0001404)
    assert frame is not None and frame.mapping is not None
    assert (frame.function, frame.kind, frame.offset_in_function) == ("ext4_remount", KERNEL, 4)
    assert frame.mapping.path == "[ext4]"
    assert name(0xFFFFFFFFC0001400 + (1 << 20)) is None  # far past a module's last symbol
    core = kernel.resolve(0xFFFFFFFF81000110)
    assert core is not None and core.mapping is not None
    assert core.mapping.path == "[kernel.kallsyms]"
    # a return address at a function start belongs to the function before
    ret = kernel.resolve(0xFFFFFFFF81000110, return_address=True)
    assert ret is not None and ret.function == "__pfx_do_one"


def test_kallsyms_hidden_addresses() -> None:
    hidden = re.sub(r"^[0-9a-f]+", "0000000000000000", KALLSYMS, flags=re.M)
    kernel = KernelSymbols.parse(hidden.splitlines())
    assert not kernel.usable
    assert kernel.resolve(0) is None


def test_symbolizer_kernel_frames_from_fixture(tmp_path: Path) -> None:
    path = tmp_path / "kallsyms"
    path.write_text(KALLSYMS)
    sym = Symbolizer(kallsyms=path, sysfs=None)
    frames = sym.kernel_frames([0xFFFFFFFF81000111, 0xFFFFFFFF81000301, 0x1234])
    assert [f.function for f in frames] == ["do_one", "weak_fn", None]
    assert frames[2].address == 0x1234 and frames[2].kind == KERNEL
    stats = sym.stats()
    assert (stats.kernel_resolved, stats.kernel_unresolved) == (2, 1)


def test_real_kallsyms() -> None:
    kallsyms = Path("/proc/kallsyms")
    if not kallsyms.exists():
        pytest.skip("no /proc/kallsyms")
    kernel = KernelSymbols.load(kallsyms)
    if not kernel.usable:
        pytest.skip("kallsyms addresses are hidden (not root, or kptr_restrict)")
    by_addr: dict[int, list[str]] = {}
    for line in kallsyms.read_text().splitlines():
        text, kind, name, *_ = line.split()
        by_addr.setdefault(int(text, 16), []).append(name if kind in "tT" else "")
    unique = sorted(a for a, names in by_addr.items()
                    if len(names) == 1 and names[0]
                    and not names[0].endswith(("_text_end", "_text_start")))
    for addr in random.Random(7).sample(unique, 200):
        frame = kernel.resolve(addr + 1)
        assert frame is not None and frame.function == by_addr[addr][0], hex(addr)
        assert frame.offset_in_function == 1
        assert frame.mapping is not None and frame.mapping.path.startswith("[")


def test_kernel_address_that_never_resolves_reloads_kallsyms_once(tmp_path: Path) -> None:
    path = tmp_path / "kallsyms"
    path.write_text(KALLSYMS)
    sym = Symbolizer(kallsyms=path, sysfs=None, reload_after=0.0)
    for _ in range(3):
        frames = sym.kernel_frames([0xFFFFFFFF81000111, 0x1234])
        assert [f.function for f in frames] == ["do_one", None]
    assert sym.stats().kernel_loads == 2  # the first load, one reload for the new miss
    # a module loaded later: its first miss reloads, and then it resolves
    path.write_text(KALLSYMS + "ffffffffc0200000 t xfs_sync\t[xfs]\n")
    frames = sym.kernel_frames([0xFFFFFFFFC0200004])
    assert frames[0].function == "xfs_sync" and sym.stats().kernel_loads == 3


def test_kallsyms_table_is_compact() -> None:
    kallsyms = Path("/proc/kallsyms")
    kernel = KernelSymbols.load(kallsyms)
    if not kernel.usable:
        pytest.skip("kallsyms addresses are hidden (not root, or kptr_restrict)")
    symbols = len(kernel._starts)
    held = kernel._names.nbytes + sum(sys.getsizeof(part) for part in
                                      (kernel._starts, kernel._offsets, kernel._module))
    assert held < 24 * symbols  # flat arrays (8 + 4 + 2 bytes), the names compressed


def test_symbol_tables_are_bounded_in_bytes() -> None:
    libraries = [Path(p) for p in ("/usr/bin/python3.11", "/lib/x86_64-linux-gnu/libc.so.6",
                                   "/lib/x86_64-linux-gnu/libstdc++.so.6", "/bin/ls")]
    sizes = {}
    for path in libraries:
        with path.open("rb") as f:
            sizes[path] = elf.load(f).nbytes
    assert all(sizes.values())
    budget = max(sizes.values()) + 1
    cache = elf.ElfCache(debug_root=None, max_bytes=budget)
    for path in libraries:
        with path.open("rb") as f:
            cache.get(f)
        assert cache.nbytes <= budget
    assert cache.evictions > 0
    # names come from a table of the function names alone, not the whole string table
    with libraries[0].open("rb") as f:
        table = elf.load(f)
    start = table._starts[len(table) // 2]
    found = table.lookup(start)
    assert found is not None and found[1] == start and found[0]
