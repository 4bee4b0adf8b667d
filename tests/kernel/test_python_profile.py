"""The CPU profiler names interpreted and JIT code: CPython frames walked in the kernel
(Debian's python3 built without frame pointers, and every other CPython installed here),
and Node's JIT functions from its perf map."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.proto.profiles.v1development import profiles_pb2 as pb

from otel_ebpf.enrich.process import ProcessEnricher
from otel_ebpf.export.profiles import build_profiles_request
from otel_ebpf.kernel.engine import Engine
from otel_ebpf.model import Identity, StackSample
from otel_ebpf.probes.cpu_profile import CpuProfile, CpuProfileConfig
from tests.helpers.processes import paused, reap
from tests.helpers.profiling import Running, running, samples_of
from tests.helpers.pythons import DEBIAN_PYTHON, interpreters

pytestmark = pytest.mark.kernel

HZ = 499
FIXTURES = Path(__file__).parent.parent / "fixtures"
SPLIT = FIXTURES / "python" / "split.py"
REUSE = FIXTURES / "python" / "reuse.py"


def function_lines(path: Path, name: str) -> set[int]:
    """The lines of a function's body in the fixture's source."""
    (fn,) = [n for n in ast.walk(ast.parse(path.read_text()))
             if isinstance(n, ast.FunctionDef) and n.name == name]
    return set(range(fn.lineno, (fn.end_lineno or fn.lineno) + 1))


@pytest.fixture(scope="module")
def started(engine: Engine) -> Iterator[Running]:
    # room for every other process of a busy shared machine between two drains: a
    # Python stack differs per line, so each sample of a busy interpreter may be a key
    with running(engine, CpuProfile(CpuProfileConfig(frequency=HZ, max_samples=1 << 14))
                 ) as polled:
        yield polled


@pytest.fixture
def profiler(started: Running) -> Running:
    """The module's profiler, drained of what came before the test."""
    started.probe.collect()
    return started


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def collect_for(profiler: Running, pid: int, cpu: float) -> list[StackSample]:
    """The samples of `pid` until it used `cpu` seconds of CPU (a loaded machine gives it
    less than the wall time), drained every half second as the daemon drains every
    interval (one drain of many seconds would overflow the samples map: Python stacks
    differ per line)."""
    samples: list[StackSample] = []
    while cpu_seconds(pid) < cpu:
        time.sleep(0.5)
        collection = profiler.probe.collect()
        assert "map_full" not in collection.lost_events, collection.lost_events
        samples += samples_of(pid, collection.samples)
    return samples


def python_names(sample: StackSample) -> list[str]:
    return [f.function or "?" for f in sample.frames if f.kind == "cpython"]


def decoded_profile(samples: list[StackSample], probe: CpuProfile
                    ) -> tuple[pb.ProfilesDictionary, list[pb.Sample]]:
    enricher = ProcessEnricher()
    request = build_profiles_request(
        samples, lambda w: Identity(enricher.lookup(w).attributes(), {"process.pid": w.pid}),
        probe.period_ns, 1, 2, profile_type=probe.profile_type)
    decoded = type(request).FromString(request.SerializeToString())
    rows = [s for rp in decoded.resource_profiles for sp in rp.scope_profiles
            for p in sp.profiles for s in p.samples]
    return decoded.dictionary, rows


def exported_frames(d: pb.ProfilesDictionary, row: pb.Sample) -> list[tuple[str, str, int, str]]:
    """(function, file, line, profile.frame.type) of each frame, leaf first."""
    out = []
    for i in d.stack_table[row.stack_index].location_indices:
        loc = d.location_table[i]
        kind = next(d.attribute_table[a].value.string_value for a in loc.attribute_indices
                    if d.string_table[d.attribute_table[a].key_strindex] == "profile.frame.type")
        if not loc.lines:
            out.append(("", "", 0, kind))
            continue
        fn = d.function_table[loc.lines[0].function_index]
        out.append((d.string_table[fn.name_strindex], d.string_table[fn.filename_strindex],
                    loc.lines[0].line, kind))
    return out


def test_pure_python_split_under_debians_python3(profiler: Running) -> None:
    proc = subprocess.Popen([str(DEBIAN_PYTHON), str(SPLIT), "60"])
    try:
        samples = collect_for(profiler, proc.pid, 2.5)
        with paused([proc], after=0):  # held while collected: lines read from its memory
            cpu_s = cpu_seconds(proc.pid)
            samples += samples_of(proc.pid, profiler.probe.collect().samples)
    finally:
        proc.kill()
        reap(proc)
    total = sum(s.count for s in samples)
    assert total > 0.7 * cpu_s * HZ, (total, cpu_s)
    d, rows = decoded_profile(samples, profiler.probe)
    by_function: dict[str, int] = {"hot_a": 0, "hot_b": 0}
    without = 0
    for row in rows:
        frames = exported_frames(d, row)
        python = [f for f in frames if f[3] == "cpython"]
        if not python or python[-1][1].startswith("<frozen "):
            # the interpreter's start-up: before the agent recognised the process as
            # Python, or importing `site` (its outermost Python frames are importlib's,
            # called from C: no <module> above them)
            without += row.values[0]
            continue
        assert python[-1][0] == "<module>", python  # reaches the top level
        for name in by_function:
            if name in [f[0] for f in python]:
                by_function[name] += row.values[0]
                (hot,) = [f for f in python if f[0] == name]
                assert hot[1] == str(SPLIT) and python[-1][1] == str(SPLIT), python
                # within the function's lines, or 0 for a sample decoded after the
                # process exited
                assert hot[2] in {0} | function_lines(SPLIT, name), hot
    # the interpreter's start-up and the first tens of ms before the agent had read the
    # new process (more on a loaded machine)
    assert without <= 0.1 * total, (without, total)
    # the split is of the program's time in Python code: the start-up is in neither
    in_a, in_b, named = by_function["hot_a"], by_function["hot_b"], total - without
    assert abs(in_a / named - 0.75) <= 0.05, (in_a, in_b, named, without)
    assert abs(in_b / named - 0.25) <= 0.05, (in_a, in_b, named, without)
    lines = {f[2] for row in rows for f in exported_frames(d, row) if f[0] == "hot_a"}
    # the call to spin (the function's last line), read from the live line table
    assert max(function_lines(SPLIT, "hot_a")) in lines, lines


def test_a_process_gone_before_the_collection_is_still_named(profiler: Running) -> None:
    proc = subprocess.Popen([str(DEBIAN_PYTHON), str(SPLIT), "1"])
    cpu_s = reap(proc)
    assert proc.returncode == 0 and cpu_s > 0.5
    samples = samples_of(proc.pid, profiler.probe.collect().samples)
    named = sum(s.count for s in samples if {"hot_a", "hot_b"} & set(python_names(s)))
    total = sum(s.count for s in samples)
    # the first samples may come before the agent recognised the process as Python
    assert named > 0.8 * total, (named, total)
    for s in samples:
        python = [f for f in s.frames if f.kind == "cpython"]
        if {"hot_a", "hot_b"} & {f.function for f in python}:
            assert python[-1].function == "<module>" and python[-1].file == str(SPLIT)
            assert python[-1].start_line == 1


@pytest.mark.parametrize("alive", [False, True], ids=["gone", "alive"])
def test_a_reused_code_address_keeps_each_code_objects_name(profiler: Running,
                                                             alive: bool) -> None:
    # `first` runs, is freed, and `secnd` takes its block: by address alone, the kernel's
    # copy (a process gone) or the live object (a process alive) names both alike
    proc = subprocess.Popen([str(DEBIAN_PYTHON), str(REUSE), "0.6", *(["stay"] * alive)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline(), "no code object took the freed one's address"
    if not alive:
        proc.stdin.close()
        reap(proc)
    collection = profiler.probe.collect()
    if alive:
        proc.stdin.close()
        reap(proc)
    assert proc.returncode == 0
    assert "map_full" not in collection.lost_events, collection.lost_events
    by_name = {"first": 0, "secnd": 0}
    for s in samples_of(proc.pid, collection.samples):
        hot = [f for f in s.frames if f.kind == "cpython" and f.file == "<reuse>"]
        if hot:
            (frame,) = hot
            assert (frame.function, frame.start_line) in {("first", 1), ("secnd", 20)}, \
                frame
            by_name[frame.function] += s.count
            if alive and frame.function == "secnd":  # read live: the stamp matched
                assert frame.line in range(20, 25), frame
    # the same work for the same CPU time (0.6 s each)
    assert sum(by_name.values()) >= 0.8 * 1.2 * HZ, by_name
    share = by_name["first"] / sum(by_name.values())
    assert abs(share - 0.5) <= 0.1, by_name


def test_a_thread_busy_in_c_under_python_code_shows_both(profiler: Running) -> None:
    proc = subprocess.Popen([str(DEBIAN_PYTHON), str(SPLIT), "30", "thread"])
    samples = collect_for(profiler, proc.pid, 3.0)
    proc.kill()
    reap(proc)
    in_thread = [s for s in samples if s.thread_id != proc.pid]
    assert sum(s.count for s in in_thread) > 50, len(in_thread)
    both = [s for s in in_thread
            if "compress_forever" in python_names(s)
            and any(f.kind == "native" and f.mapping is not None and "libz" in f.mapping.path
                    for f in s.frames)]
    assert sum(s.count for s in both) > 0.5 * sum(s.count for s in in_thread)
    s = max(both, key=lambda s: s.count)
    kinds = [f.kind for f in s.frames if f.kind != "kernel"]
    # leaf first: zlib's C code on top of the Python function that called it
    assert kinds.index("native") < kinds.index("cpython"), kinds
    assert python_names(s)[-1] == "Thread._bootstrap", python_names(s)  # its entry


def test_python_frames_take_the_place_of_the_eval_loop_in_a_mixed_stack(
        profiler: Running) -> None:
    # the native stack unwound with Debian's python3's CFI: C on top (json's encoder),
    # the Python frames where the eval loop ran them, the interpreter's main beneath
    proc = subprocess.Popen([str(DEBIAN_PYTHON), str(FIXTURES / "python" / "mixed.py")])

    def complete(s: StackSample) -> bool:  # the native stack unwound down to main
        return "Py_BytesMain" in [f.function for f in s.frames]

    samples: list[StackSample] = []
    try:
        # the unwinder compiles the interpreter's tables on a thread of its own within a
        # CPU budget (otel_ebpf/symbolize/unwind/loader.py), after the other processes of
        # a busy machine: until then the native walk stops early
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum(s.count for s in samples
                                                  if complete(s)) < 200:
            samples += collect_for(profiler, proc.pid, cpu_seconds(proc.pid) + 0.5)
    finally:
        proc.kill()
        reap(proc)
    whole = [s for s in samples if complete(s) and "dumps" in python_names(s)]
    assert sum(s.count for s in whole) >= 100, len(samples)

    def reads_as_mixed(s: StackSample) -> bool:
        kinds = [f.kind for f in s.frames if f.kind != "kernel"]
        first = kinds.index("cpython")
        last = len(kinds) - 1 - kinds[::-1].index("cpython")
        names = [f.function for f in s.frames if f.kind != "kernel"]
        # (a sample in the eval loop itself has its Python frames on top)
        return (all(k == "cpython" for k in kinds[first:last + 1])
                and python_names(s)[-4:] == ["dumps", "handler", "serve", "<module>"]
                and "Py_BytesMain" in names[last + 1:])

    c_on_top = sum(s.count for s in whole if s.frames[0].kind != "cpython")
    assert c_on_top > 0.5 * sum(s.count for s in whole)  # the encoder's time
    mixed = sum(s.count for s in whole if reads_as_mixed(s))
    assert mixed == sum(s.count for s in whole), [
        " <- ".join(str(f.function) for f in s.frames) for s in whole if not reads_as_mixed(s)]


def test_a_walk_deeper_than_its_bound_keeps_its_frames_and_is_counted(
        profiler: Running) -> None:
    code = ("def deep(n):\n"
            "    if n:\n"
            "        return deep(n - 1)\n"
            "    while True:\n"
            "        pass\n"
            "deep(100)\n")
    proc = subprocess.Popen([str(DEBIAN_PYTHON), "-c", code])
    mine: list[StackSample] = []
    truncated = 0
    try:
        while cpu_seconds(proc.pid) < 1.0:
            time.sleep(0.5)
            collection = profiler.probe.collect()
            mine += samples_of(proc.pid, collection.samples)
            truncated += collection.lost_events.get("py_truncated", 0)
    finally:
        proc.kill()
        reap(proc)
    deepest = max(len(python_names(s)) for s in mine)
    assert deepest == 64, deepest  # PY_MAX_FRAMES, leaf first: <module> cut off
    assert truncated > 0


@pytest.mark.parametrize("name", sorted(n for n in interpreters() if not n.startswith("debian")))
def test_other_cpython_versions(profiler: Running, name: str) -> None:
    proc = subprocess.Popen([str(interpreters()[name]), str(SPLIT), "60"])
    try:
        samples = collect_for(profiler, proc.pid, 1.0)
        with paused([proc], after=0):
            samples += samples_of(proc.pid, profiler.probe.collect().samples)
    finally:
        proc.kill()
        reap(proc)
    total = sum(s.count for s in samples)
    named = {n for s in samples for n in python_names(s)}
    assert {"hot_a", "hot_b", "split", "spin", "<module>"} <= named, named
    with_module = sum(s.count for s in samples if python_names(s)[-1:] == ["<module>"])
    assert with_module > 0.8 * total, (with_module, total)


def test_node_jit_functions_are_named_from_its_perf_map(profiler: Running,
                                                        tmp_path: Path) -> None:
    node = shutil.which("node") or shutil.which("nodejs")
    assert node is not None, "nodejs is not installed: deploy/host-setup.sh --test"
    # in a directory of its own: V8 writes its isolate log into the working directory
    proc = subprocess.Popen([node, "--perf-basic-prof", str(FIXTURES / "jit_hot.js"), "30"],
                            stdout=subprocess.DEVNULL, cwd=tmp_path)
    try:
        samples = collect_for(profiler, proc.pid, 2.0)
        samples += samples_of(proc.pid, profiler.probe.collect().samples)
    finally:
        proc.kill()
        reap(proc)
        Path(f"/tmp/perf-{proc.pid}.map").unlink(missing_ok=True)
    total = sum(s.count for s in samples)
    jit = [f for s in samples for f in s.frames if f.kind == "v8js"]
    assert any("hotLoop" in (f.function or "") for f in jit), {f.function for f in jit}
    in_hot = sum(s.count for s in samples
                 if any("hotLoop" in (f.function or "") for f in s.frames))
    assert in_hot > 0.5 * total, (in_hot, total)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
