"""The compile cache's key and hygiene (its hits against the kernel are in
tests/kernel/test_engine.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from otel_ebpf.kernel import cache
from otel_ebpf.kernel.cache import ImageCache


def test_the_key_covers_source_cflags_and_the_headers_beside_it(tmp_path: Path) -> None:
    (tmp_path / "rate_limit.h").write_text("#define A 1\n")
    images = ImageCache(tmp_path / "programs", None)
    flags = [f"-I{tmp_path}", "-DMAX=1"]
    key = images.key("int x;", flags)
    assert key == ImageCache(tmp_path / "programs", None).key("int x;", flags)
    assert key != images.key("int y;", flags)
    assert key != images.key("int x;", [f"-I{tmp_path}", "-DMAX=2"])
    (tmp_path / "rate_limit.h").write_text("#define A 2\n")
    assert key != images.key("int x;", flags)


def test_an_entry_others_could_write_is_not_loaded(tmp_path: Path) -> None:
    directory = tmp_path / "programs"
    directory.mkdir(mode=0o700)
    images = ImageCache(directory, None)
    entry = directory / "k.json"
    entry.write_text(json.dumps({"image": {}, "maps": [], "btf": None}))
    entry.chmod(0o666)
    assert images.load("k") is None
    assert images.load("absent") is None
    assert ImageCache(directory, None, read=False).load("k") is None


def test_the_least_recently_used_entries_go(tmp_path: Path) -> None:
    images = ImageCache(tmp_path, None)
    for i in range(cache.MAX_ENTRIES + 3):
        path = tmp_path / f"{i:03d}.json"
        path.write_text("{}")
        os.utime(path, (i, i))
    images._trim()
    left = sorted(p.name for p in tmp_path.glob("*.json"))
    assert len(left) == cache.MAX_ENTRIES
    assert left[0] == "003.json"


def test_the_directory_follows_the_cache_root_and_can_be_switched_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EBPF_CACHE_DIR", "/somewhere")
    monkeypatch.delenv("OTEL_EBPF_COMPILE_CACHE", raising=False)
    assert cache.directory() == Path("/somewhere/programs")
    monkeypatch.setenv("OTEL_EBPF_COMPILE_CACHE", "off")
    assert cache.directory() is None
