"""The syscall probe's default series (per workload) and its sampled timing, against
workloads whose truth is known: counts exact whatever the churn, every blocking call
timed, and the calls that stay on the CPU spread by an unbiased sample."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from otel_ebpf.aggregate import CumulativeStore
from otel_ebpf.config import Config
from otel_ebpf.enrich.identity import IdentityResolver
from otel_ebpf.histogram import bucket_lower_bound, bucket_upper_bound
from otel_ebpf.kernel import syscalls
from otel_ebpf.kernel.cgroupfs import cgroup2_root, cgroup_id
from otel_ebpf.kernel.engine import Engine
from otel_ebpf.model import Collection, ExpHistogramDelta
from otel_ebpf.probes.syscall_latency import SyscallFilter, SyscallLatency, SyscallLatencyConfig

pytestmark = pytest.mark.kernel


@contextlib.contextmanager
def cgroup() -> Iterator[Path]:
    group = cgroup2_root() / f"otel-ebpf-test-{os.getpid()}"
    group.mkdir()
    try:
        yield group
    finally:
        group.rmdir()


def collected(engine: Engine, table: syscalls.SyscallTable, config: SyscallLatencyConfig,
              run: list[str]) -> Collection:
    """Start the probe, run the command to its end, collect once."""
    probe = SyscallLatency(config, table)
    probe.start(engine)
    try:
        subprocess.run(run, check=True, timeout=120, capture_output=True)
        collection = probe.collect()
        # a count flushed after the first drain's generation flip lands in the next one
        later = probe.collect()
    finally:
        probe.stop()
    collection.records += later.records
    for reason, n in later.lost_events.items():
        collection.lost_events[reason] = collection.lost_events.get(reason, 0) + n
    return collection


def in_cgroup(group: Path, command: str) -> list[str]:
    """A shell that moves itself into the cgroup, then runs the command there."""
    return ["sh", "-c", f"echo $$ > {group}/cgroup.procs && {command}"]


def histograms(collection: Collection, syscall: str) -> list[ExpHistogramDelta]:
    return [r for r in collection.records if isinstance(r, ExpHistogramDelta)
            and r.attributes["linux.syscall.name"] == syscall]


@pytest.mark.parametrize("aggregation", ["workload", "process"])
def test_short_lived_processes_fold_into_their_workload(
        engine: Engine, table: syscalls.SyscallTable, syscall_workload: Path,
        aggregation: str) -> None:
    """N processes of one executable in one cgroup, K getppid each, against a map of 64
    keys: per workload one series counts all N x K; per process (the opt-in) the same
    churn needs N keys in one interval, overflows the map and says so."""
    n, k = 300, 20
    with cgroup() as group:
        config = SyscallLatencyConfig(aggregation=aggregation, max_entries=64,
                                      filter=SyscallFilter(cgroups=[group.name]))
        loop = f"for i in $(seq {n}); do {syscall_workload} {k} 0 0 >/dev/null; done"
        collection = collected(engine, table, config, in_cgroup(group, loop))
        expected_cgroup = cgroup_id(str(group))
    mine = [r for r in histograms(collection, "getppid") if r.workload.comm != "sh"]
    if aggregation == "process":
        assert collection.lost_events.get("map_full", 0) > 0
        assert len({r.workload.pid for r in mine}) <= 64
        return
    assert collection.lost_events.get("map_full", 0) == 0
    assert {r.workload.pid for r in mine} == {0}
    assert {r.workload.cgroup_id for r in mine} == {expected_cgroup}
    assert {r.attributes["process.executable.name"] for r in mine} == {"syscall_workload"}
    assert sum(r.count for r in mine) == n * k
    # one series: every record of the two collections has the same key
    assert len({tuple(sorted(r.attributes.items())) for r in mine}) == 1


def share_above(record: ExpHistogramDelta, seconds: float) -> float:
    """The share of the record's count in buckets wholly above `seconds`."""
    above = sum(c for i, c in enumerate(record.bucket_counts)
                if bucket_lower_bound(record.offset + i, record.scale) >= seconds)
    return above / record.count


def test_sampled_timing_keeps_counts_exact_and_blocking_calls_timed(
        engine: Engine, table: syscalls.SyscallTable, syscall_mix: Path) -> None:
    """getrandom three times fast and once slow, 20,000 rounds, then 10 sleeps of 5 ms.
    Counts are exact; every sleep blocked, so every one was timed, none under 5 ms; the
    getrandom histogram, sampled one call in 64, puts a quarter of its count
    above the slow calls' floor (within 5 points: ~1,250 sampled calls give a standard
    error of 1.2 points)."""
    rounds, sleeps = 20_000, 10
    config = SyscallLatencyConfig(filter=SyscallFilter(comms=["syscall_mix"]))
    assert config.sample_period == 64
    collection = collected(engine, table, config,
                           [str(syscall_mix), str(rounds), "16384", str(sleeps), "5"])
    (getrandom,) = histograms(collection, "getrandom")
    assert getrandom.count == 4 * rounds
    assert sum(getrandom.bucket_counts) == 4 * rounds
    # 2^(-70/4) s = 5.4 us: above a 16-byte getrandom, below a 16 KiB one
    assert abs(share_above(getrandom, 2 ** (-70 / 4)) - 0.25) < 0.05

    sleep_name = "clock_nanosleep" if histograms(collection, "clock_nanosleep") else "nanosleep"
    (sleep,) = histograms(collection, sleep_name)
    assert sleep.count == sleeps
    assert sum(sleep.bucket_counts) == sleeps
    # every sleep was timed (from when it left the CPU, a few microseconds after its entry)
    # and none looks shorter than asked; a busy machine may wake a sleeper late
    first = next(i for i, c in enumerate(sleep.bucket_counts) if c) + sleep.offset
    assert bucket_lower_bound(first, 2) < 0.005 <= bucket_upper_bound(first, 2)
    assert sleep.min >= 0.0049  # less only by the on-CPU start before it left the CPU


def remove_cgroup(group: Path) -> None:
    """rmdir, retried while its last process is still exiting."""
    for _ in range(100):
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)
    group.rmdir()


def test_a_workloads_series_expires_when_its_cgroup_is_gone_or_it_is_quiet(
        engine: Engine, table: syscalls.SyscallTable, syscall_workload: Path) -> None:
    """Two workloads' series, counted for real, in the store the daemon exports from, with
    the daemon's liveness check (identity.alive): the one whose cgroup is removed stops
    being exported at once; both are forgotten after the quiet time although the other's
    cgroup lives on; counted again, that one is a new series from zero starting with its
    window. The store's clock is the test's (quiet time 60 s, no waiting)."""
    quiet = 60 * 10**9
    root = cgroup2_root()
    gone, stays = (root / f"otel-ebpf-expiry-{name}-{os.getpid()}" for name in ("a", "b"))
    gone.mkdir()
    stays.mkdir()
    identity = IdentityResolver(Config(), {})
    store = CumulativeStore()
    probe = SyscallLatency(SyscallLatencyConfig(
        filter=SyscallFilter(cgroups=[gone.name, stays.name])), table)
    probe.start(engine)
    try:
        def absorb(start_ns: int, now_ns: int) -> None:
            records = probe.collect().records + probe.collect().records
            store.add(records, start_ns, now_ns)
            identity.resolver(s.workload for s in store.series())  # as an export does

        def getppid_counts() -> dict[int, tuple[int, int]]:
            """cgroup id -> (count, start) of the exported getppid series."""
            return {s.workload.cgroup_id: (s.count, s.start_ns) for s in store.series()
                    if s.attributes.get("linux.syscall.name") == "getppid"
                    and s.attributes.get("process.executable.name") == "syscall_workload"}

        for group, n in ((gone, 100), (stays, 200)):
            subprocess.run(in_cgroup(group, f"{syscall_workload} {n} 0 0"), check=True,
                           timeout=60, capture_output=True)
        absorb(0, 1_000)
        gone_id, stays_id = cgroup_id(str(gone)), cgroup_id(str(stays))
        assert getppid_counts() == {gone_id: (100, 0), stays_id: (200, 0)}
        store.mark_exported(store.series())
        assert store.expire(identity.alive, 2_000, quiet) == 0
        assert set(getppid_counts()) == {gone_id, stays_id}  # quiet, still exported

        remove_cgroup(gone)
        assert store.expire(identity.alive, 3_000, quiet) == 0
        assert set(getppid_counts()) == {stays_id}  # its last values went out: retired
        held = len(store)  # both workloads' series: getppid, the shell's, ...
        assert held > 2
        assert store.expire(identity.alive, 1_000 + quiet, quiet) == held
        assert store.series() == []  # the living cgroup's quiet series went too

        subprocess.run(in_cgroup(stays, f"{syscall_workload} 50 0 0"), check=True,
                       timeout=60, capture_output=True)
        absorb(quiet + 1_500, quiet + 2_000)
        assert getppid_counts() == {stays_id: (50, quiet + 1_500)}
    finally:
        probe.stop()
        remove_cgroup(gone)
        remove_cgroup(stays)
