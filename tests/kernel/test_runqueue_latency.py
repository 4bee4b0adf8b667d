"""The run-queue latency probe against a known contention: two CPU-bound processes on one
CPU, SCHED_RR with the kernel's time slice T, each running R = 4 T of CPU after a common
release (tests/helpers/runq_pair.c).

What must hold, and why:
- every wait of each worker is in its series, and nothing else: the count equals the
  times the kernel ran it (schedstat pcount: each arrival follows a wait), the sum equals
  the kernel's own run-queue time (schedstat run_delay) within 50 us per wait: both time
  the same events, the probe at its tracepoints, the kernel at its run-queue clock read
  a few microseconds before them in the same code path;
- the contention shows: the worker that finished second was runnable the whole time the
  first one ran after their common release (one pipe write wakes both, microseconds
  apart), so it waited at least R less 1 ms; and each was preempted at the end of each
  of the slices the other still needed, at least R / T - 1 times (involuntary waits).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from otel_ebpf.kernel.engine import Engine
from otel_ebpf.model import ExpHistogramDelta
from otel_ebpf.probes.runqueue_latency import RunqueueLatency, RunqueueLatencyConfig
from tests.conftest import build_helper

pytestmark = pytest.mark.kernel

RR_SLICE_S = int(Path("/proc/sys/kernel/sched_rr_timeslice_ms").read_text()) / 1000
RUN_S = 4 * RR_SLICE_S
PER_WAIT_S = 50e-6
RELEASE_S = 1e-3


@pytest.fixture(scope="module")
def runq_pair() -> Path:
    return build_helper("runq_pair")


@pytest.fixture
def probe(engine: Engine) -> Iterator[RunqueueLatency]:
    probe = RunqueueLatency(RunqueueLatencyConfig(enabled=True, aggregation="process"))
    probe.start(engine)
    try:
        yield probe
    finally:
        probe.stop()


def schedstat(pid: int) -> tuple[float, int]:
    """The kernel's run-queue time (s) and arrivals on a CPU of a one-thread process."""
    _, run_delay_ns, arrivals = Path(f"/proc/{pid}/schedstat").read_text().split()
    return int(run_delay_ns) / 1e9, int(arrivals)


def blocked(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "S"


class Waits:
    """What the probe recorded per pid: histogram count, sum and count by wait type."""

    def __init__(self) -> None:
        self.count: Counter[int] = Counter()
        self.sum: Counter[int] = Counter()
        self.by_type: Counter[tuple[int, str]] = Counter()

    def add(self, records: list[object]) -> None:
        for r in records:
            assert isinstance(r, ExpHistogramDelta)
            pid, kind = r.workload.pid, str(r.attributes["process.context_switch.type"])
            assert sum(r.bucket_counts) == r.count
            self.count[pid] += r.count
            self.sum[pid] += r.sum
            self.by_type[(pid, kind)] += r.count


def test_waits_of_two_workers_sharing_a_cpu(probe: RunqueueLatency, runq_pair: Path) -> None:
    cpu = max(os.sched_getaffinity(0))
    proc = subprocess.Popen([str(runq_pair), str(cpu), str(int(RUN_S * 1000))],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        word, *pids = proc.stdout.readline().split()
        assert word == "done", word
        first, second = map(int, pids)
        deadline = time.monotonic() + 30
        while not (blocked(first) and blocked(second)):  # each records its last wait
            assert time.monotonic() < deadline, "the workers never blocked"  # as it blocks
            time.sleep(0.001)
        kernel = {pid: schedstat(pid) for pid in (first, second)}
        waits = Waits()
        # a wait is recorded as its task leaves the CPU, which may follow a drain by
        # microseconds: drain until every arrival is there (never more)
        for _ in range(20):
            waits.add(probe.collect().records)
            if all(waits.count[pid] >= kernel[pid][1] for pid in kernel):
                break
    finally:
        proc.communicate("", timeout=30)

    for pid, (run_delay, arrivals) in kernel.items():
        assert waits.count[pid] == arrivals, (pid, waits.count, kernel)
        assert abs(waits.sum[pid] - run_delay) <= PER_WAIT_S * arrivals, (
            pid, waits.sum[pid], run_delay)
        assert waits.by_type[(pid, "involuntary")] >= RUN_S / RR_SLICE_S - 1, waits.by_type
    assert waits.sum[second] >= RUN_S - RELEASE_S, (waits.sum, RUN_S)
