"""The off-CPU profiler against a process whose waits are known: 40 x 50 ms in nanosleep,
called from wait_for_tick (tests/helpers/off_cpu_target.c), run in a cgroup of the test's
own with the probe's in-kernel filter on it (the machine is shared).

What must hold: the waits sum to the 2.0 s slept (each wait is measured from the switch
that took the thread off the CPU to the one that gave it back: the sleep, its timer slack
and its wake-up latency), >= 95 % of that time is on whole stacks - pause_once, the
direct caller of libc's nanosleep (libc keeps no frame pointer: it takes the DWARF
unwinder), through wait_for_tick to main - with the kernel's nanosleep frames on top, and
every wait was counted once. Only the waits before the unwinder loaded the process (its
first, announced by it) may lack pause_once.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from otel_ebpf.kernel.cgroupfs import cgroup_id
from otel_ebpf.kernel.engine import Engine
from otel_ebpf.model import StackSample
from otel_ebpf.probes.off_cpu import OFF_CPU, OffCpu, OffCpuConfig
from tests.conftest import build_helper
from tests.helpers.cgroups import own_cgroup, run_in
from tests.helpers.profiling import names, running

pytestmark = pytest.mark.kernel

SLEEPS, SLEEP_MS = 40, 50


@pytest.fixture(scope="module")
def off_cpu_target() -> Path:
    return build_helper("off_cpu_target")


class Collected:
    """The probe's samples and lost events, collection after collection."""

    def __init__(self, probe: OffCpu) -> None:
        self.probe = probe
        self.samples: list[StackSample] = []
        self.lost: dict[str, int] = {}

    def collect(self) -> list[StackSample]:
        collection = self.probe.collect()
        assert collection.profile_type == OFF_CPU
        for reason, n in collection.lost_events.items():
            self.lost[reason] = self.lost.get(reason, 0) + n
        self.samples += collection.samples
        return self.samples


@pytest.fixture
def cgroup() -> Iterator[Path]:
    with own_cgroup("offcpu") as path:
        yield path


@pytest.fixture
def profiler(engine: Engine, cgroup: Path) -> Iterator[Collected]:
    probe = OffCpu(OffCpuConfig(enabled=True), select_cgroups=True)
    with running(engine, probe):
        probe.set_cgroup_filter({cgroup_id(str(cgroup))})
        yield Collected(probe)


def test_blocked_time_is_on_the_stack_that_waited(profiler: Collected, cgroup: Path,
                                                  off_cpu_target: Path) -> None:
    pid, out = run_in(cgroup, [off_cpu_target, "sleeps", str(SLEEPS), str(SLEEP_MS)])
    assert out.strip() == "done"
    mine = [s for s in profiler.collect() if s.workload.pid == pid]
    total = sum(s.count for s in mine)
    slept = SLEEPS * SLEEP_MS * 1_000_000
    assert abs(total - slept) <= 0.05 * slept, (total, profiler.lost)
    through = [s for s in mine if "wait_for_tick" in names(s) and "main" in names(s)]
    assert sum(s.count for s in through) >= 0.95 * total, [(names(s), s.count) for s in mine]
    # whole: every wait but those counted unwind_not_ready (each one 50 ms sleep) has
    # pause_once, the direct caller of libc, on its stack
    whole = sum(s.count for s in through if names(s)[names(s).index("wait_for_tick") - 1]
                == "pause_once")
    not_ready = profiler.lost.get("unwind_not_ready", 0)
    assert total - whole <= not_ready * 1.2 * SLEEP_MS * 1_000_000, (
        whole, total, profiler.lost, [(names(s), s.count) for s in mine])
    for s in through:
        kinds = [f.kind for f in s.frames]
        assert kinds == sorted(kinds, key=lambda k: k != "kernel"), kinds  # kernel on top
        kernel = [f.function or "" for f in s.frames if f.kind == "kernel"]
        assert kernel[0] in ("__schedule", "schedule"), kernel  # no tracing frames
        assert any("nanosleep" in n for n in kernel), kernel
        (tick,) = [f for f in s.frames if f.function == "wait_for_tick"]
        assert tick.mapping is not None and tick.mapping.path.endswith("off_cpu_target")
    # the forked child's wait before its exec and the first wait after it
    assert set(profiler.lost) <= {"unwind_not_ready"}, profiler.lost
    assert profiler.lost.get("unwind_not_ready", 0) <= 3, profiler.lost


def test_short_waits_are_dropped_and_counted(engine: Engine, cgroup: Path,
                                             off_cpu_target: Path) -> None:
    # 20 waits of 2 ms under a 100 ms minimum: none recorded, every one counted short
    probe = OffCpu(OffCpuConfig(enabled=True, min_block=0.1), select_cgroups=True)
    probe.start(engine)
    try:
        probe.set_cgroup_filter({cgroup_id(str(cgroup))})
        pid, _ = run_in(cgroup, [off_cpu_target, "sleeps", "20", "2"])
        collection = probe.collect()
        assert not [s for s in collection.samples if s.workload.pid == pid]
        assert probe.totals["short"] >= 20, probe.totals
        assert probe.totals["waits"] == 0, probe.totals
    finally:
        probe.stop()


def test_rate_limited_waits_keep_their_time_without_stacks(engine: Engine, cgroup: Path,
                                                           off_cpu_target: Path) -> None:
    # one capture every CPUs seconds per CPU: most of the 40 waits find no token
    probe = OffCpu(OffCpuConfig(enabled=True, rate_per_second=1, burst=1),
                   select_cgroups=True)
    probe.start(engine)
    try:
        probe.set_cgroup_filter({cgroup_id(str(cgroup))})
        pid, _ = run_in(cgroup, [off_cpu_target, "sleeps", str(SLEEPS), str(SLEEP_MS)])
        collection = probe.collect()
        mine = [s for s in collection.samples if s.workload.pid == pid]
        slept = SLEEPS * SLEEP_MS * 1_000_000
        assert abs(sum(s.count for s in mine) - slept) <= 0.05 * slept
        stackless = [s for s in mine if not s.frames]
        assert stackless and all(s.lost_stacks == ("user", "kernel") for s in stackless)
        assert sum(s.count for s in stackless) >= 0.5 * slept
        limited = collection.lost_events.get("rate_limited", 0)
        assert limited >= SLEEPS // 2 and probe.totals["waits"] >= SLEEPS, collection
    finally:
        probe.stop()
