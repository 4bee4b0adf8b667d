"""Symbol names held compressed (otel_ebpf/symbolize/names.py): every name reads back as it
was, across block boundaries, and the tables of real binaries and of the kernel hold less
than their raw names (the kernel's: test_symbols.py)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from otel_ebpf.symbolize import elf, names
from otel_ebpf.symbolize.names import PackedNames


def _blob(words: list[bytes]) -> tuple[bytes, list[int]]:
    at, blob = [], bytearray()
    for word in words:
        at.append(len(blob))
        blob += word + b"\0"
    return bytes(blob), at


def test_every_name_reads_back_across_blocks() -> None:
    rng = random.Random(3)
    words = [b"_ZN4llvm%d" % rng.randrange(10**6) * rng.randrange(1, 40) for _ in range(5000)]
    words += [b"", b"\xff\xfe not utf-8", b"x" * (3 * names.BLOCK_BYTES)]  # empty, bad, huge
    rng.shuffle(words)
    blob, at = _blob(words)
    packed = PackedNames(blob, decoded=16)  # a small cache: most reads inflate a block
    assert len(packed._blocks) > 10
    for offset, word in zip(at, words, strict=True):
        assert packed.text(offset) == word.decode("utf-8", "replace")
    for offset, word in rng.sample(list(zip(at, words, strict=True)), 500):  # cached or not
        assert packed.text(offset) == word.decode("utf-8", "replace")
    assert packed.nbytes < len(blob) / 3


def test_unterminated_last_name_and_empty_table() -> None:
    assert PackedNames(b"main\0tail").text(5) == "tail"
    empty = PackedNames(b"")
    assert empty.nbytes == 0
    with pytest.raises(IndexError):
        empty.text(0)


def test_elf_names_match_the_string_table() -> None:
    path = Path("/lib/x86_64-linux-gnu/libstdc++.so.6")
    with path.open("rb") as f:
        table = elf.load(f)
    with path.open("rb") as f:
        parsed = ELFFile(f)
        section = parsed.get_section_by_name(".dynsym")
        assert section is not None
        by_start: dict[int, set[str]] = {}
        for symbol in section.iter_symbols():
            if symbol["st_info"]["type"] in ("STT_FUNC", "STT_GNU_IFUNC") and symbol["st_value"]:
                by_start.setdefault(symbol["st_value"], set()).add(symbol.name)
    assert len(table) > 1000
    for i in range(len(table)):  # every function: its name is one of its address's aliases
        found = table.lookup(table._starts[i])
        assert found is not None and found[0] in by_start[table._starts[i]]
    assert table._names.nbytes * 3 < table._names.raw_size  # mangled C++ names: ~5:1
    assert table.nbytes == table._names.nbytes + 16 * len(table)  # extents: 8 + 4 + 4 bytes

