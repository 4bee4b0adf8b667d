"""The CPython layout tables against the real interpreters: the offsets their debug info
gives (fixtures made by tests/fixtures/python/derive_layouts.py), 3.13's own
_Py_DebugOffsets, and a walk of each installed interpreter's live memory."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from otel_ebpf.symbolize.python import layouts
from otel_ebpf.symbolize.python.code import (
    CodeInfo,
    ProcessMemory,
    line_of,
    line_ranges,
    read_code,
)
from otel_ebpf.symbolize.python.process import Detector, examine
from otel_ebpf.symbolize.python.walk import frames, thread_states
from tests.helpers.pythons import interpreters, version_of

FIXTURES = Path(__file__).parent.parent / "fixtures" / "python"
NESTED = FIXTURES / "nested.py"
# the stack nested.py holds, leaf first: (name, line)
NESTED_STACK = [("inner", 10), ("outer", 14), ("K.meth", 19), ("<module>", 22)]


@pytest.mark.parametrize("minor", range(8, 14))
def test_table_matches_the_offsets_of_the_debug_info(minor: int) -> None:
    fixture = json.loads((FIXTURES / f"layouts-3.{minor}.json").read_text())
    derived = {k: v for k, v in fixture.items() if not k.startswith("_")}
    table = layouts.LAYOUTS[(3, minor)].as_fixture()
    if minor == 10:
        # 3.10 has a cframe, but its frames are still reached through tstate->frame
        assert derived.pop("tstate_cframe") == 48
    if minor < 11:
        # co_name stands for co_qualname, which 3.8-3.10 do not have
        assert layouts.LAYOUTS[(3, minor)].code_qualname == derived["code_name"]
    assert table == derived


def test_313_debug_offsets_match_the_debug_info() -> None:
    exe = {v: p for v, p in ((version_of(p), p) for p in interpreters().values())}.get((3, 13))
    if exe is None:
        pytest.skip("no CPython 3.13 on this machine")
    lib = next(exe.parent.parent.glob("lib/libpython3.13.so.1.0"), exe)
    with lib.open("rb") as f:
        found = examine(f, str(lib))
    assert found is not None
    assert found.layout == layouts.LAYOUTS[(3, 13)]


def test_debug_offsets_of_another_release_are_refused() -> None:
    data = bytearray(layouts.DEBUG_OFFSETS_SIZE)
    data[:8] = layouts.DEBUG_COOKIE
    data[8:16] = (0x030E00F0).to_bytes(8, "little")  # 3.14.0
    assert layouts.from_debug_offsets(bytes(data)) is None
    assert layouts.from_debug_offsets(b"not a runtime") is None


@pytest.fixture(params=sorted(interpreters()))
def nested(request: pytest.FixtureRequest) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([str(interpreters()[request.param]), str(NESTED)],
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        # then asleep in time.sleep (not still in the flush that said it)
        for _ in range(500):
            stat = Path(f"/proc/{proc.pid}/stat").read_text()
            if stat[stat.rindex(")") + 2] == "S":
                break
            time.sleep(0.01)
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_walk_of_a_live_interpreter_names_its_stack(nested: subprocess.Popen[bytes]) -> None:
    found = Detector().detect(nested.pid)
    assert found is not None, "not recognised as Python"
    mem = ProcessMemory(nested.pid)
    try:
        (state, thread_id, native_id), = thread_states(mem, found)
        if found.layout.tstate_native_thread_id != layouts.NONE:
            assert native_id == nested.pid  # the main thread
        assert thread_id != 0
        walked = frames(mem, found.layout, state)
        named = []
        for f in walked:
            info = read_code(mem, f.code, found.layout)
            assert info.filename == str(NESTED)
            named.append((info.name if found.layout.version >= (3, 11)
                          else info.name.replace("meth", "K.meth"), line_of(info, f.instr,
                                                                               found.layout)))
    finally:
        mem.close()
    assert named == NESTED_STACK
    # the eval loop was entered once for the whole stack (3.11+), once per frame before
    entries = [f.entry for f in walked]
    assert entries == ([True] * 4 if found.layout.version < (3, 11)
                       else [False, False, False, True])


@pytest.mark.parametrize("name", sorted(interpreters()))
def test_line_tables_decode_as_the_interpreter_itself_says(name: str) -> None:
    # every code object of a few stdlib modules: our decoding of the raw table against
    # the interpreter's own co_lines() (dis.findlinestarts before 3.10), offset by offset
    out = subprocess.run([str(interpreters()[name]), str(FIXTURES / "dump_lines.py"),
                          "json.encoder", "argparse", "asyncio.base_events"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    dumped = json.loads(out)
    version = tuple(dumped["version"])
    checked = 0
    for code in dumped["codes"]:
        info = CodeInfo(code["name"], "", code["firstlineno"], bytes.fromhex(code["table"]))
        ranges = line_ranges(info, version)
        for start, end, line in code["lines"]:
            for byte in range(start, end, 2):
                at = byte if version < (3, 11) else byte // 2
                assert ranges.line(at) == (line or 0), (code["name"], byte, line)
                checked += 1
    assert checked > 5000, checked


def test_a_process_of_known_files_is_recognised_without_opening_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Under process churn each new process costs a read of its maps, not an open of each
    of its files: the second interpreter of the same build is answered from memory."""
    import otel_ebpf.symbolize.python.process as process

    opened: list[str] = []
    real_open = process.open_mapped

    def counting(pid: int, start: int, end: int, path: str, dev: int, inode: int) -> Any:
        opened.append(path)
        return real_open(pid, start, end, path, dev, inode)

    monkeypatch.setattr(process, "open_mapped", counting)
    procs = [subprocess.Popen(["/usr/bin/python3", "-c", "import sys, time; "
                               "print('ready', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE) for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline() == b"ready\n"
        detector = Detector()
        first = detector.detect(procs[0].pid)
        assert first is not None and opened, "the first process's files are opened"
        opened.clear()
        second = detector.detect(procs[1].pid)
        assert second is not None and second.layout == first.layout
        assert opened == []
    finally:
        for p in procs:
            p.kill()
            p.wait()
