"""The unwind-table compiler (otel_ebpf.symbolize.unwind.cfi) against what binutils'
readelf interprets from the same files, the row allocator, and callback linking."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from otel_ebpf.kernel.callbacks import func_info_btf, link_callback
from otel_ebpf.symbolize.unwind import cfi
from otel_ebpf.symbolize.unwind.rowarea import RowArea

HELPERS = Path(__file__).parent.parent / "helpers"
LIBC = Path("/lib/x86_64-linux-gnu/libc.so.6")


def readelf_rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(pc, {column: rule}) of every row `readelf --debug-dump=frames-interp` prints."""
    if shutil.which("readelf") is None:
        pytest.skip("readelf (binutils) is not installed")
    out = subprocess.run(["readelf", "--debug-dump=frames-interp", str(path)],
                         capture_output=True, text=True, check=False).stdout
    columns: list[str] | None = None
    in_fde = False
    for line in out.splitlines():
        if " FDE " in line or " CIE " in line:
            in_fde, columns = " FDE " in line, None
        elif line.strip().startswith("LOC"):
            columns = line.split()[1:]
        elif in_fde and columns and re.match(r"[0-9a-f]{16} ", line):
            pc, *rules = line.split()
            yield int(pc, 16), dict(zip(columns, rules, strict=False))


def matches(row: cfi.Row | None, rules: dict[str, str]) -> bool:
    """Whether the compiled row says what readelf's interpretation says."""
    if row is None:
        return False
    cfa, rbp, ra = rules["CFA"], rules.get("rbp", "u"), rules.get("ra", "c-8")
    if ra == "u" and row.kind == cfi.CFA_END:
        return True  # undefined return address: the outermost frame
    if cfa == "exp":
        return row.kind in (cfi.CFA_PLT, cfi.CFA_UNSUPPORTED)
    found = re.fullmatch(r"(rsp|rbp)\+(\d+)", cfa)
    if found is None:
        return row.kind == cfi.CFA_UNSUPPORTED
    kind = cfi.CFA_RSP if found[1] == "rsp" else cfi.CFA_RBP
    saved = re.fullmatch(r"c-(\d+)", rbp)
    expected_rbp = (-int(saved[1]) if saved else cfi.RBP_SAME if rbp == "u"
                    else cfi.RBP_UNKNOWN)
    if ra == "u":
        # readelf also prints "u" for the return address where the FDE sets it only
        # later (the CIE's c-8 holds until then); its other columns are then shifted
        # (libc's clone3), so only the CFA is compared
        return (row.kind, row.cfa_offset) == (kind, int(found[2]))
    return (row.kind, row.cfa_offset, row.rbp) == (kind, int(found[2]), expected_rbp)


@pytest.fixture(scope="module")
def nofp_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    out = tmp_path_factory.mktemp("cfi") / "nofp_hot"
    subprocess.run([cc, "-O2", "-fomit-frame-pointer", "-o", str(out),
                    str(HELPERS / "nofp_hot.c")], check=True)
    return out


@pytest.mark.parametrize("which", ["nofp_hot", "libc"])
def test_every_row_agrees_with_readelf(which: str, nofp_binary: Path) -> None:
    path = nofp_binary if which == "nofp_hot" else LIBC
    if not path.exists():
        pytest.skip(f"{path} is not there")
    with path.open("rb") as f:
        table = cfi.compile_file(f)
    assert table is not None
    rows = list(readelf_rows(path))
    assert len(rows) > (20 if which == "nofp_hot" else 10_000)
    wrong = [(hex(pc), rules, table.row_for(pc)) for pc, rules in rows
             if not matches(table.row_for(pc), rules)]
    assert not wrong, wrong[:5]


def test_functions_without_frame_pointers_have_rsp_rules(nofp_binary: Path) -> None:
    with nofp_binary.open("rb") as f:
        table = cfi.compile_file(f)
    assert table is not None
    symbols = subprocess.run(["nm", str(nofp_binary)], capture_output=True, text=True,
                             check=True).stdout
    address = {line.split()[2]: int(line.split()[0], 16) for line in symbols.splitlines()
                if len(line.split()) == 3}
    for name in ("hot_a", "spin", "run_split"):
        row = table.row_for(address[name])
        assert row is not None and row.kind == cfi.CFA_RSP and row.cfa_offset == 8, name
    start = table.row_for(address["_start"])  # the outermost frame's CFI says so
    assert start is not None and start.kind == cfi.CFA_END
    # a pc past every FDE has no information: the unwinder steps with frame pointers
    last = cfi.decode_row(table.rows, len(table) - 1)
    assert last.kind == cfi.CFA_NONE


def test_a_file_too_large_is_refused_before_compiling() -> None:
    if not LIBC.exists():
        pytest.skip(f"{LIBC} is not there")
    with LIBC.open("rb") as f, pytest.raises(cfi.TooLarge):
        cfi.compile_file(f, max_rows=1000)


def test_not_elf_is_an_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"not an elf file at all" * 10)
    with junk.open("rb") as f, pytest.raises(cfi.CfiError):
        cfi.compile_file(f)


def test_bias_maps_addresses_to_the_files_virtual_addresses() -> None:
    table = cfi.UnwindTable(b"", ((0x1000, 0x401000, 0x5000),))
    # mapped at 0x7f0000001000 from file offset 0x1000: 0x7f0000001234 is vaddr 0x401234
    bias = table.bias(0x7F0000001000, 0x1000)
    assert bias is not None and 0x7F0000001234 - bias == 0x401234
    assert table.bias(0x7F0000000000, 0x9000) is None


def test_row_area_reuses_and_merges_freed_extents() -> None:
    area = RowArea(100)
    a, b, c = area.allocate(40), area.allocate(40), area.allocate(20)
    assert (a, b, c) == (0, 40, 80) and area.allocate(1) is None
    area.release(0, 40)
    area.release(40, 40)
    assert area.used == 20
    assert area.allocate(80) == 0  # the two freed extents merged


def test_link_callback_appends_and_points_the_dropped_address_at_it() -> None:
    mov_r1 = struct.pack("=BBhi", 0xB7, 0x01, 0, 127)
    ld_r2_zero = struct.pack("=BBhi", 0x18, 0x02, 0, 0) + bytes(8)
    call_loop = struct.pack("=BBhi", 0x85, 0, 0, 181)
    exit_ = struct.pack("=BBhi", 0x95, 0, 0, 0)
    main = mov_r1 + ld_r2_zero + call_loop + exit_
    callback = struct.pack("=BBhi", 0xB7, 0, 0, 0) + exit_
    linked = link_callback(main, callback)
    assert linked[len(main):] == callback
    code, regs, _, imm = struct.unpack_from("=BBhi", linked, 8)
    assert (code, regs) == (0x18, 0x42)  # dst r2, src BPF_PSEUDO_FUNC
    assert 1 + 1 + imm == len(main) // 8  # relative to the instruction after it (slot 2)
    assert link_callback(mov_r1 + exit_, callback) == mov_r1 + exit_


def test_func_info_btf_is_well_formed() -> None:
    blob = func_info_btf(["main_fn", "loop_callback_x"])
    magic, version, _, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
        "=HBBIIIII", blob)
    assert (magic, version, hdr_len) == (0xEB9F, 1, 24)
    assert len(blob) == hdr_len + str_off + str_len and type_off == 0
    strings = blob[hdr_len + str_off:]
    assert b"\0main_fn\0" in strings and b"\0loop_callback_x\0" in strings
    assert type_len == 16 + 12 + 20 + 2 * 12  # int, void *, proto, two functions
