"""The unwind tables' compiler process (otel_ebpf.symbolize.unwind.worker): the same
tables and errors as compiling in the agent, one child for a run of compiles, gone once
idle, and a child that dies costs no table."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from otel_ebpf.symbolize.unwind import cfi, worker

LIBC = Path("/lib/x86_64-linux-gnu/libc.so.6")
PYTHON = Path(os.path.realpath(sys.executable))
FILES = [LIBC, PYTHON]


def in_process(path: Path, max_rows: int = 1 << 20) -> cfi.UnwindTable | None:
    with path.open("rb") as f:
        return cfi.compile_file(f, max_rows)


def in_worker(w: worker.CompileWorker, path: Path, max_rows: int = 1 << 20
              ) -> cfi.UnwindTable | None:
    with path.open("rb") as f:
        return w.compile(f, max_rows)


@pytest.fixture
def compiler() -> Iterator[worker.CompileWorker]:
    w = worker.CompileWorker()
    yield w
    w.close()


def test_one_child_compiles_the_same_tables_as_the_agent(compiler: worker.CompileWorker
                                                         ) -> None:
    for path in FILES:
        table = in_worker(compiler, path)
        assert table is not None and len(table) > 1000
        assert table == in_process(path)
    assert compiler.started == 1 and compiler.running


def test_errors_come_back_as_the_compilers_own(compiler: worker.CompileWorker,
                                               tmp_path: Path) -> None:
    text = tmp_path / "not-elf"
    text.write_bytes(b"#!/bin/sh\necho hello\n" * 10)
    with pytest.raises(cfi.CfiError, match="not an ELF file"):
        in_worker(compiler, text)
    with pytest.raises(cfi.TooLarge) as too_large:
        in_worker(compiler, PYTHON, max_rows=100)
    with PYTHON.open("rb") as f, pytest.raises(cfi.TooLarge) as expected:
        cfi.compile_file(f, 100)
    assert too_large.value.rows == expected.value.rows > 100
    assert str(too_large.value) == str(expected.value)
    assert in_worker(compiler, LIBC) == in_process(LIBC)  # the child is still serving
    assert compiler.started == 1


def test_the_child_exits_once_idle_and_a_new_one_starts_on_demand() -> None:
    w = worker.CompileWorker(idle_s=0.2)
    try:
        in_worker(w, LIBC)
        pid = w._proc.pid if w._proc is not None else 0
        w.rest()  # used just now: kept
        assert w.running
        time.sleep(0.3)
        w.rest()
        assert not w.running
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # exited and reaped
        assert in_worker(w, LIBC) == in_process(LIBC)
        assert w.started == 2
    finally:
        w.close()


def test_a_child_that_dies_costs_no_table(compiler: worker.CompileWorker,
                                          caplog: pytest.LogCaptureFixture) -> None:
    in_worker(compiler, LIBC)
    assert compiler._proc is not None
    os.kill(compiler._proc.pid, signal.SIGKILL)
    compiler._proc.wait()
    assert in_worker(compiler, PYTHON) == in_process(PYTHON)  # compiled in the agent
    assert "compiling in the agent instead" in caplog.text
    assert not compiler.running
    assert in_worker(compiler, LIBC) == in_process(LIBC)  # the next one in a new child
    assert compiler.started == 2


def test_the_child_exits_when_the_agent_closes_its_end(compiler: worker.CompileWorker
                                                        ) -> None:
    in_worker(compiler, LIBC)
    assert compiler._proc is not None and compiler._sock is not None
    proc = compiler._proc
    compiler._sock.close()  # as when the agent dies: the child reads end of file
    assert proc.wait(timeout=10) == 0
