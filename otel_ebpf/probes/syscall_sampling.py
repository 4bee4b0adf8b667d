"""From the kernel's exact counts and timed sample to histograms whose count is exact.

probes/syscall_latency.bpf.c counts every call, times every call that left the CPU, and
times a random sample of the calls that stayed on it. Per series, the calls that stayed
on the CPU ("fast calls": calls - off-CPU calls) are spread over the buckets of their
sample in proportion, rounded so that they add up exactly (largest remainder): the
exported count is exact, and each quantile is that of an unbiased sample of the fast
calls mixed with every off-CPU call.

The sample used, in order of preference: the series' sample of this interval, the series'
sample so far, the sample so far of the same syscall across every series, and last the
same syscall's calls that left the CPU. The kernel times the first call of each syscall
number it sees, so one of these exists once a syscall has been seen; until then the fast
calls wait (`pending`), never guessed. The kernel adds a call's count to the map when its task
leaves the CPU, so in one interval a series may show more off-CPU calls than calls: the
difference is carried, never exported negative.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from otel_ebpf.histogram import merge_into

Span = tuple[int, list[int]]  # (first bucket index, counts)


def apportion(total: int, weights: list[int]) -> list[int]:
    """`total` split in proportion to `weights` (not all zero), in integers that add up
    to `total`: floors first, the rest to the largest remainders (earliest on ties)."""
    denominator = sum(weights)
    shares = [total * w // denominator for w in weights]
    rest = total - sum(shares)
    if rest:
        remainders = sorted(range(len(weights)),
                            key=lambda i: (-(total * weights[i] % denominator), i))
        for i in remainders[:rest]:
            shares[i] += 1
    return shares


@dataclass(slots=True)
class _Sample:
    """A sample of fast-call durations: bucket span, sum and size."""

    offset: int = 0
    counts: list[int] = field(default_factory=list)
    sum_s: float = 0.0
    size: int = 0

    def add(self, offset: int, counts: list[int], sum_s: float, size: int) -> None:
        self.offset, self.counts = merge_into(self.offset, self.counts, offset, counts)
        self.sum_s += sum_s
        self.size += size


@dataclass(slots=True)
class _SeriesState:
    nr: int
    meta: object  # the caller's description of the series, handed back by `settle`
    sample: _Sample = field(default_factory=_Sample)
    pending: int = 0  # fast calls counted but not yet exported (negative: owed)
    idle: int = 0  # collections since the series was last seen


@dataclass(slots=True)
class Interval:
    """One series' drained kernel value, decoded."""

    calls: int
    offcpu: Span
    offcpu_sum_s: float
    sampled: Span
    sampled_sum_s: float


@dataclass(slots=True)
class Estimate:
    offset: int
    counts: list[int]
    count: int
    sum_s: float


class FastCallEstimator:
    """Per-series state across collections. Series unseen for `keep_idle` collections are
    forgotten (their pending calls counted in `forgotten`)."""

    def __init__(self, keep_idle: int = 12) -> None:
        self._series: dict[object, _SeriesState] = {}
        self._pools: dict[int, _Sample] = {}  # syscall nr -> every series' sample
        # syscall nr -> every series' calls that left the CPU: the last resort, for a
        # syscall whose only timed calls blocked
        self._offcpu_pools: dict[int, _Sample] = {}
        self.keep_idle = keep_idle
        self.forgotten = 0

    @property
    def pending(self) -> int:
        return sum(max(0, s.pending) for s in self._series.values())

    def estimate(self, key: object, nr: int, interval: Interval, meta: object) -> Estimate:
        state = self._series.get(key)
        if state is None:
            state = self._series[key] = _SeriesState(nr, meta)
        state.idle = 0
        s_offset, s_counts = interval.sampled
        size = sum(s_counts)
        now = _Sample()
        if size:
            now.add(s_offset, s_counts, interval.sampled_sum_s, size)
            state.sample.add(s_offset, s_counts, interval.sampled_sum_s, size)
            self._pools.setdefault(nr, _Sample()).add(s_offset, s_counts,
                                                      interval.sampled_sum_s, size)
        o_offset, o_counts = interval.offcpu
        offcpu = sum(o_counts)
        if offcpu:
            self._offcpu_pools.setdefault(nr, _Sample()).add(o_offset, o_counts,
                                                             interval.offcpu_sum_s, offcpu)
        state.pending += interval.calls - offcpu
        estimate = Estimate(o_offset, list(o_counts), offcpu, interval.offcpu_sum_s)
        self._spread(state, estimate, (now, state.sample, self._pools.get(nr),
                                       self._offcpu_pools.get(nr)))
        return estimate

    def _spread(self, state: _SeriesState, into: Estimate,
                sources: tuple[_Sample | None, ...]) -> None:
        """Add the series' pending fast calls to `into`, spread by the first non-empty
        sample of `sources`."""
        source = next((s for s in sources if s is not None and s.size), None)
        if state.pending <= 0 or source is None:
            return
        fast, state.pending = state.pending, 0
        into.offset, into.counts = merge_into(into.offset, into.counts, source.offset,
                                              apportion(fast, source.counts))
        into.count += fast
        into.sum_s += source.sum_s * fast / source.size

    def settle(self, seen: set[object]) -> list[tuple[object, Estimate]]:
        """After a collection's `estimate` calls: the series not in `seen` whose waiting
        fast calls now have a sample to be spread by (with the `meta` they were given);
        series idle for too long are forgotten, their waiting calls counted."""
        settled: list[tuple[object, Estimate]] = []
        for key in list(self._series):
            if key in seen:
                continue
            state = self._series[key]
            state.idle += 1
            if state.pending > 0:
                estimate = Estimate(0, [], 0, 0.0)
                self._spread(state, estimate, (state.sample, self._pools.get(state.nr),
                                               self._offcpu_pools.get(state.nr)))
                if estimate.count:
                    settled.append((state.meta, estimate))
            if state.idle > self.keep_idle:
                self.forgotten += max(0, state.pending)
                del self._series[key]
        return settled
