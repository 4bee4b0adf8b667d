"""The CPU profiler's user stacks through code built without frame pointers: unwound in
the kernel with the files' DWARF call-frame information (probes/user_stack.h)."""

from __future__ import annotations

import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from otel_ebpf.kernel.engine import Engine
from otel_ebpf.model import StackSample
from otel_ebpf.probes.cpu_profile import (
    PYTHON_LOST,
    UNWIND_LOST,
    CpuProfile,
    CpuProfileConfig,
)
from otel_ebpf.symbolize.unwind.tables import REFRESH_S
from tests.conftest import build_binary
from tests.helpers.processes import reap
from tests.helpers.profiling import Running, names, running, samples_of

pytestmark = pytest.mark.kernel

HZ = 499  # ~1,000 samples of a 2 s run: 75 % +- 5 points is then > 3.5 sigma
NOFP = ("-O2", "-g", "-fomit-frame-pointer")


@pytest.fixture(scope="module")
def nofp_hot() -> Path:
    return build_binary("nofp_hot", ("nofp_hot.c",), NOFP)


FP_NO_TABLES = ("-O1", "-g", "-fno-omit-frame-pointer", "-fno-asynchronous-unwind-tables",
                "-fno-unwind-tables")


@pytest.fixture(scope="module")
def libnofp() -> Path:
    return build_binary("libnofp.so", ("nofp_lib.c",),
                        (*NOFP, "-shared", "-fPIC", "-Wl,-soname,libnofp.so"))


@pytest.fixture(scope="module")
def mixed_app(libnofp: Path) -> Path:
    return build_binary("mixed_app", ("mixed_app.c", "bin/libnofp.so"),
                        (*FP_NO_TABLES, "-Wl,-rpath,$ORIGIN"))


@pytest.fixture(scope="module")
def mixed_app_dl(libnofp: Path) -> Path:
    return build_binary("mixed_app_dl", ("mixed_app.c",), (*FP_NO_TABLES, "-DUSE_DLOPEN"))


@pytest.fixture
def profiler(engine: Engine) -> Iterator[Running]:
    # room for drains held up by symbolizing what the rest of a busy machine runs, whose
    # whole stacks at 25 x the default rate are mostly distinct
    with running(engine, CpuProfile(CpuProfileConfig(
            frequency=HZ, max_samples=1 << 15, user_stack_entries=1 << 17))) as polled:
        yield polled


def steady_run(profiler: Running, binary: Path, seconds: float, *extra: str,
               idle: float = 0.0, drains: list[list[StackSample]] | None = None
               ) -> tuple[list[StackSample], float, dict[str, int]]:
    """Run `binary SECONDS` past its warm-up, once the agent has seen the process and
    loaded its mappings (a process's first samples, before that, fall back to frame
    pointers and are counted as unwind_not_ready; on a machine whose files' tables are
    not compiled yet that takes seconds). Its samples of the measured part, its CPU
    seconds, and the probe's lost events meanwhile; `drains` gets its samples drain by
    drain."""
    proc = subprocess.Popen([str(binary), str(seconds), *extra], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline().startswith(b"ready")
        # the warm-up spins ~0.5 s of CPU (the probe announces the process), then waits
        # on stdin: its samples are all taken once it says so
        assert proc.stdout.readline() == b"waiting\n"
        unwind = profiler.probe.unwind
        assert unwind is not None
        deadline = time.monotonic() + 120
        while not unwind.tables.knows(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert unwind.tables.knows(proc.pid), "the agent never loaded the process's maps"
        profiler.probe.collect()  # the warm-up's samples go
        time.sleep(idle)  # after that drain: it may have reread the maps
        proc.stdin.write(b"go\n")
        proc.stdin.close()
        done: list[bytes] = []
        reader = threading.Thread(target=lambda: done.append(proc.stdout.readline()))
        reader.start()
        samples: list[StackSample] = []
        lost: Counter[str] = Counter()
        while reader.is_alive():  # drained as the agent does: the machine samples too
            reader.join(0.25)
            collection = profiler.probe.collect()
            samples += collection.samples
            lost.update(collection.lost_events)
            if drains is not None:
                drains.append(samples_of(proc.pid, collection.samples))
        assert done == [b"done\n"]
        cpu_s = reap(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    collection = profiler.probe.collect()
    lost.update(collection.lost_events)
    return samples_of(proc.pid, samples + collection.samples), cpu_s, dict(lost)


def test_three_to_one_split_without_frame_pointers(profiler: Running, nofp_hot: Path
                                                   ) -> None:
    mine, cpu_s, lost = steady_run(profiler, nofp_hot, 2.0)
    total = sum(s.count for s in mine)
    assert total > 0.5 * 2.0 * HZ, (total, cpu_s, lost)  # 2 s of its CPU time
    to_main = sum(s.count for s in mine if "main" in names(s))
    short = [(s.count, names(s)) for s in mine if "main" not in names(s)]
    assert to_main >= 0.95 * total, (to_main, total, lost, short[:5])
    in_a = sum(s.count for s in mine if "hot_a" in names(s))
    in_b = sum(s.count for s in mine if "hot_b" in names(s))
    assert abs(in_a / total - 0.75) <= 0.05, (in_a, in_b, total)
    assert abs(in_b / total - 0.25) <= 0.05, (in_a, in_b, total)
    hot = max(mine, key=lambda s: s.count)
    user = [f.function for f in hot.frames if f.kind == "native"]
    # the whole chain, in order, every caller of a function without a frame pointer
    chain = [n for n in user if n in ("spin", "hot_a", "hot_b", "run_split", "main")]
    assert chain in (["spin", "hot_a", "run_split", "main"],
                     ["spin", "hot_b", "run_split", "main"]), user
    assert "__libc_start_call_main" in user, user  # and on into libc, unwound by its CFI
    # the counters are the probe's, machine-wide: the CPython walk's losses are other
    # processes' (a Python process exiting mid-read), never this C program's
    assert set(lost) <= set(UNWIND_LOST) | set(PYTHON_LOST) | {"user_stack_lost"}


def test_frame_pointer_executable_through_a_library_without_them(
        profiler: Running, mixed_app: Path) -> None:
    mine, _, lost = steady_run(profiler, mixed_app, 1.5)
    total = sum(s.count for s in mine)
    in_leaf = [s for s in mine if "app_leaf" in names(s)]
    leaf_total = sum(s.count for s in in_leaf)
    assert leaf_total > 0.5 * total, (leaf_total, total, [
        (s.count, names(s)) for s in sorted(mine, key=lambda s: -s.count)[:4]])
    whole = ["app_leaf", "lib_inner", "lib_work", "drive", "main"]
    through = sum(s.count for s in in_leaf
                  if [n for n in names(s) if n in whole] == whole)
    assert through >= 0.95 * leaf_total, (through, leaf_total, lost)
    lib = next(f for s in in_leaf for f in s.frames if f.function == "lib_inner")
    assert lib.mapping is not None and lib.mapping.path.endswith("libnofp.so")


def test_a_library_loaded_after_the_process_was_read_unwinds_once_reread(
        profiler: Running, mixed_app_dl: Path, libnofp: Path) -> None:
    # dlopen'ed after the agent read the maps: the unwinder finds its pcs in no mapping,
    # marks the process, and the maps are read again (at most every REFRESH_S, as the
    # symbolizer's: idle so long first, so the first drain that sees the mark rereads them)
    drains: list[list[StackSample]] = []
    mine, _, lost = steady_run(profiler, mixed_app_dl, 3.0, str(libnofp),
                               idle=REFRESH_S + 0.5, drains=drains)

    def through_lib(samples: list[StackSample]) -> tuple[int, int]:
        in_lib = [s for s in samples if "lib_inner" in names(s)]
        return (sum(s.count for s in in_lib if "main" in names(s)),
                sum(s.count for s in in_lib))

    assert through_lib(mine)[1] > 0
    # the first drains' samples stop in the library (until the reread), the later ones
    # are whole: the second half of the run
    later = [s for drain in drains[len(drains) // 2:] for s in drain]
    whole, total = through_lib(later)
    assert total > 0 and whole >= 0.95 * total, (whole, total, lost,
                                                 [through_lib(d) for d in drains])


def test_files_over_the_compile_budget_get_their_tables_later(engine: Engine,
                                                               nofp_hot: Path) -> None:
    probe = CpuProfile(CpuProfileConfig(frequency=HZ))
    probe.start(engine)
    proc = subprocess.Popen([str(nofp_hot), "1"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    try:
        assert probe.unwind is not None
        loader, tables = probe.unwind, probe.unwind.tables
        tables.cache = None  # tables on disk load whatever the budget (test_unwind_files)
        allowed = False
        tables.may_compile = lambda: allowed

        def settled() -> None:
            deadline = time.monotonic() + 60
            while not loader.idle() and time.monotonic() < deadline:
                time.sleep(0.05)

        assert proc.stdout is not None and proc.stdout.readline().startswith(b"ready")
        loader.add(proc.pid)
        settled()
        # loaded at once, without tables: its frames take frame pointers meanwhile
        assert tables.knows(proc.pid) and not tables.complete(proc.pid), tables.stats
        assert tables.stats.files_compiled == 0
        allowed = True
        loader.sampled({proc.pid})  # its next drain
        settled()
        assert tables.complete(proc.pid) and tables.stats.files_compiled > 0
    finally:
        proc.kill()
        proc.wait()
        probe.stop()
