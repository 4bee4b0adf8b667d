"""Merging Python frames into native stacks, and JIT names from perf maps."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from otel_ebpf.symbolize.frames import CPYTHON, NATIVE, Frame
from otel_ebpf.symbolize.perfmap import PerfMaps, frame_type
from otel_ebpf.symbolize.python.unwinder import merge


def native(name: str | None) -> Frame:
    return Frame(0x1000, name, NATIVE, None, 0)


def py(name: str, entry: bool) -> tuple[Frame, bool]:
    return Frame(0, name, CPYTHON, None, 0, "app.py", 1, 1), entry


def names(frames: tuple[Frame, ...]) -> list[str | None]:
    return [f.function for f in frames]


def test_each_eval_frame_takes_the_python_frames_it_ran() -> None:
    # 3.11+: one eval call ran encode+dumps, the one below it serve+<module>
    stack = [native("encoder_encode"), native("_PyEval_EvalFrameDefault"),
             native("PyObject_Call"), native("_PyEval_EvalFrameDefault"), native("main")]
    python = [py("dumps", False), py("encode", True), py("serve", False), py("<module>", True)]
    assert names(merge(stack, python)) == [
        "encoder_encode", "dumps", "encode", "PyObject_Call", "serve", "<module>", "main"]


def test_python_frames_the_native_walk_missed_go_beneath_it() -> None:
    # an interpreter without frame pointers: the native walk stops early
    stack = [native("_PyEval_EvalFrameDefault"), native(None)]
    python = [py("hot", True), py("loop", True), py("<module>", True)]
    assert names(merge(stack, python)) == ["hot", None, "loop", "<module>"]
    assert names(merge([native(None)], python)) == [None, "hot", "loop", "<module>"]


def test_a_walk_cut_short_keeps_its_frames() -> None:
    # no entry frame at the root end (the walk was truncated): one group all the same
    stack = [native("_PyEval_EvalFrameDefault"), native("main")]
    assert names(merge(stack, [py("a", False), py("b", False)])) == ["a", "b", "main"]


@pytest.fixture
def own_perf_map() -> Iterator[Path]:
    path = Path(f"/tmp/perf-{os.getpid()}.map")
    path.write_text("7f0000001000 40 JS:*hot app.js:1:1\n7f0000001040 20 LazyCompile:~cold\n")
    try:
        yield path
    finally:
        path.unlink()


def test_perf_map_names_addresses_and_is_read_again_when_it_grows(own_perf_map: Path
                                                                    ) -> None:
    maps = PerfMaps(reread_after=0.0)
    pid = os.getpid()
    assert maps.lookup(pid, 0x7F0000001010) == ("JS:*hot app.js:1:1", 0x10, CPYTHON)
    assert maps.lookup(pid, 0x7F0000001045) == ("LazyCompile:~cold", 5, CPYTHON)
    assert maps.lookup(pid, 0x7F0000002000) is None
    with own_perf_map.open("a") as f:
        f.write("7f0000002000 10 JS:*later app.js:9:1\n")
    assert maps.lookup(pid, 0x7F0000002004) == ("JS:*later app.js:9:1", 4, CPYTHON)


def test_frame_type_follows_the_executable() -> None:
    assert frame_type("node") == "v8js" and frame_type("nodejs") == "v8js"
    assert frame_type("java") == "jvm"
    assert frame_type("python3.12") == "cpython"
    assert frame_type("nginx") == "native"
