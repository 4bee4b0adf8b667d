"""otel_ebpf/symbolize/elfread.py against pyelftools on real files: the same section and
program header tables and build ids; broken files fail as ElfReadError, never otherwise."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import NoteSection

from otel_ebpf.symbolize import elf
from otel_ebpf.symbolize.elfread import SHT_NOBITS, SHT_NOTE, ElfFile, symbol_value

FILES = [Path(p) for p in ("/usr/bin/python3.11", "/lib/x86_64-linux-gnu/libc.so.6",
                           "/lib/x86_64-linux-gnu/libstdc++.so.6", "/bin/ls",
                           "/usr/lib/x86_64-linux-gnu/libLLVM-14.so.1")]


@pytest.mark.parametrize("path", [p for p in FILES if p.exists()], ids=str)
def test_tables_and_build_id_match_pyelftools(path: Path) -> None:
    with path.open("rb") as f, path.open("rb") as g:
        ours, theirs = ElfFile(f), ELFFile(g)
        kinds = {SHT_NOTE: "SHT_NOTE", SHT_NOBITS: "SHT_NOBITS"}
        assert [(s.name, kinds.get(s.type), s.addr, s.offset, s.size, s.link, s.entsize)
                for s in ours.sections] == [
            (s.name, s.header.sh_type if s.header.sh_type in kinds.values()
             else None, s["sh_addr"], s["sh_offset"], s["sh_size"], s["sh_link"],
             s["sh_entsize"])
            for s in (theirs.get_section(i) for i in range(theirs.num_sections()))]
        assert [(p.offset, p.vaddr, p.filesz, p.flags) for p in ours.segments] == [
            (p["p_offset"], p["p_vaddr"], p["p_filesz"], p["p_flags"])
            for p in theirs.iter_segments()]
        note = theirs.get_section_by_name(".note.gnu.build-id")
        assert isinstance(note, NoteSection)
        expected = next(n["n_desc"] for n in note.iter_notes() if n["n_type"] == "NT_GNU_BUILD_ID")
        assert ours.build_id() == expected
        dynsym = ours.section(".dynsym")
        assert dynsym is not None
        assert ours.data(dynsym) == theirs.get_section_by_name(".dynsym").data()


@pytest.mark.parametrize("path", [p for p in FILES if p.exists()], ids=str)
def test_exported_symbols_match_pyelftools(path: Path) -> None:
    """symbol_value finds what the dynamic symbol table exports, as pyelftools' lookup does
    (how a CPython interpreter's _PyRuntime and Py_Version are found)."""
    with path.open("rb") as f, path.open("rb") as g:
        ours, theirs = ElfFile(f), ELFFile(g)
        table = theirs.get_section_by_name(".dynsym")
        defined = {sym.name: sym["st_value"] for sym in table.iter_symbols()
                   if sym.name and sym["st_shndx"] != "SHN_UNDEF" and sym["st_value"]}
        undefined = {sym.name for sym in table.iter_symbols()
                     if sym.name and sym["st_shndx"] == "SHN_UNDEF"} - set(defined)
        for name in sorted(defined)[:: max(1, len(defined) // 50)]:
            assert symbol_value(ours, name) == defined[name], name
        for name in sorted(undefined)[:10]:
            assert symbol_value(ours, name) is None, name
        assert symbol_value(ours, "no_such_symbol_anywhere") is None
    if path.name.startswith("python3"):
        with path.open("rb") as f:
            assert symbol_value(ElfFile(f), "_PyRuntime")


def test_build_id_from_segments_without_section_headers(tmp_path: Path) -> None:
    source = Path("/bin/ls")
    data = bytearray(source.read_bytes())
    data[0x28:0x30] = bytes(8)  # e_shoff = 0: no section headers, as `sstrip` leaves
    data[0x3C:0x40] = bytes(4)  # e_shnum, e_shstrndx
    stripped = tmp_path / "ls"
    stripped.write_bytes(data)
    with source.open("rb") as f, stripped.open("rb") as g:
        full, bare = ElfFile(f), ElfFile(g)
        assert bare.sections == [] and bare.build_id() == full.build_id() is not None


def test_broken_files_are_read_errors(tmp_path: Path) -> None:
    cut = tmp_path / "cut"
    cut.write_bytes(Path("/bin/ls").read_bytes()[:4096])  # headers, tables beyond the end
    text = tmp_path / "text"
    text.write_text("#!/bin/sh\n")
    for path in (cut, text):
        with path.open("rb") as f, pytest.raises(elf.ElfReadError):
            elf.load(f)
        with path.open("rb") as f:
            assert elf.file_build_id(f) is None


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_32_bit_file(tmp_path: Path) -> None:
    src = tmp_path / "t.c"
    src.write_text("int answer(void) { return 42; }\nint main(void) { return answer(); }\n")
    out = tmp_path / "t32"
    built = subprocess.run(["gcc", "-m32", "-Wl,--build-id", "-o", str(out), str(src)],
                           capture_output=True, check=False)
    if built.returncode != 0:
        pytest.skip("gcc cannot build 32-bit executables here (no multilib)")
    with out.open("rb") as f:
        table = elf.load(f)
    with out.open("rb") as f:
        theirs = ELFFile(f)
        symtab = theirs.get_section_by_name(".symtab")
        answer = next(s for s in symtab.iter_symbols() if s.name == "answer")
    assert table.lookup(answer["st_value"]) == ("answer", answer["st_value"])
    assert table.build_id is not None
