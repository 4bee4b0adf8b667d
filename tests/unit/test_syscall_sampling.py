"""Spreading the calls that stayed on the CPU over their sample: exact counts, no guess."""

from __future__ import annotations

import random

from otel_ebpf.probes.syscall_sampling import FastCallEstimator, Interval, apportion


def test_apportion_adds_up_and_follows_the_weights() -> None:
    assert apportion(10, [1, 1, 2]) == [3, 2, 5]  # 2.5, 2.5, 5: the earlier tie wins
    assert apportion(0, [3, 1]) == [0, 0]
    assert apportion(7, [0, 5, 0]) == [0, 7, 0]
    rng = random.Random(7)
    for _ in range(500):
        weights = [rng.randrange(0, 50) for _ in range(rng.randrange(1, 12))]
        if not any(weights):
            continue
        total = rng.randrange(0, 100_000)
        shares = apportion(total, weights)
        assert sum(shares) == total
        for share, w in zip(shares, weights, strict=True):
            exact = total * w / sum(weights)
            assert abs(share - exact) < 1  # never more than the rounding
            assert w or not share


def interval(calls: int, offcpu: tuple[int, list[int]] = (0, []), sampled: tuple[int,
             list[int]] = (0, []), sampled_sum: float = 0.0) -> Interval:
    return Interval(calls, offcpu, float(sum(offcpu[1])), sampled, sampled_sum)


def test_fast_calls_take_the_shape_of_their_sample_and_the_count_is_exact() -> None:
    est = FastCallEstimator()
    # 1000 calls: 10 left the CPU (bucket 5), 990 stayed; 4 sampled (3 in bucket 0, 1 in 2)
    got = est.estimate("k", 39, interval(1000, (5, [10]), (0, [3, 0, 1]), 4e-6), "meta")
    assert got.count == 1000
    assert got.offset == 0
    assert got.counts == [743, 0, 247, 0, 0, 10]  # 742.5 and 247.5: the earlier tie wins
    assert abs(got.sum_s - (10.0 + 990 * 1e-6)) < 1e-9


def test_without_a_sample_the_series_own_past_then_the_syscalls_pool_serve() -> None:
    est = FastCallEstimator()
    est.estimate("a", 1, interval(100, sampled=(4, [2]), sampled_sum=2e-6), "A")
    # "a" again, no sample this interval: its own past sample (bucket 4)
    again = est.estimate("a", 1, interval(50), "A")
    assert (again.offset, again.counts, again.count) == (4, [50], 50)
    # a new series of the same syscall, never sampled: the syscall's pool
    other = est.estimate("b", 1, interval(30), "B")
    assert (other.offset, other.counts, other.count) == (4, [30], 30)


def test_calls_wait_until_a_sample_exists_then_settle() -> None:
    est = FastCallEstimator()
    first = est.estimate("a", 7, interval(20), "A")
    assert first.count == 0 and est.pending == 20  # nothing to spread them by: they wait
    assert est.settle({"a"}) == []
    # another series of syscall 7 is sampled: the waiting calls settle by its sample
    est.estimate("b", 7, interval(10, sampled=(3, [1]), sampled_sum=1e-6), "B")
    settled = est.settle({"b"})
    assert [(meta, e.offset, e.counts, e.count) for meta, e in settled] == [("A", 3, [20], 20)]
    assert est.pending == 0


def test_off_cpu_calls_counted_before_their_calls_are_owed_not_negative() -> None:
    est = FastCallEstimator()
    # the kernel timed 3 blocking calls whose counts are still on their CPU
    early = est.estimate("a", 2, interval(0, (9, [3]), (0, [1]), 1e-7), "A")
    assert (early.count, early.counts) == (3, [3])
    late = est.estimate("a", 2, interval(13), "A")  # the 3 plus 10 that stayed on the CPU
    assert late.count == 10


def test_idle_series_are_forgotten_and_their_waiting_calls_counted() -> None:
    est = FastCallEstimator(keep_idle=2)
    est.estimate("a", 5, interval(4), "A")
    for _ in range(3):
        est.settle(set())
    assert est.forgotten == 4
    assert est.pending == 0


def test_a_syscall_whose_only_timed_calls_blocked_spreads_by_those() -> None:
    est = FastCallEstimator()
    # its first (forced-timed) call blocked: no on-CPU sample anywhere, only off-CPU ones
    got = est.estimate("a", 11, interval(5, (9, [1])), "A")
    assert (got.offset, got.counts, got.count) == (9, [5], 5)
