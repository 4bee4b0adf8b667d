"""Base-2 exponential histogram arithmetic shared by the decoders, the aggregator and the
summary.

`duration_bucket_index` mirrors, integer for integer, what probes/exp_histogram.h
computes in the kernel, so the unit tests can hold the kernel's bucketing to hand-computed
cases without loading BPF.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

# The kernel's buckets (probes/exp_histogram.h; a test compares the two): scale 2, from
# index HIST_MIN_INDEX (2^-26 s) over HIST_BUCKETS buckets.
HIST_SCALE = 2
HIST_MIN_INDEX = -104
HIST_BUCKETS = 152
# 2^(j/4) for j = 1..3 in 16.16 fixed point, rounded up (see the .bpf.c).
_QUARTERS = (77936, 92682, 110218)


def ns_to_binary_units(ns: int) -> tuple[int, int]:
    """Nanoseconds -> (x, n): x units of 2^-n s, rounded down, exactly as the kernel does.

    2^-40 s keeps the fixed-point error below 1e-5 even at 100 ns; above 30 s the kernel
    switches to 2^-30 s so that no product overflows 64 bits.
    """
    if ns < 30_000_000_000:
        return ns * 1099 + ns * 511627776 // 1_000_000_000, 40
    if ns < 250_000_000_000:
        return ns + ns * 73741824 // 1_000_000_000, 30
    return (ns // 1000) * 1073741824 // 1_000_000, 30


def duration_bucket_index(ns: int, scale: int = 2) -> int:
    """OTLP bucket index (scale 2) of a duration in seconds, given in nanoseconds.

    Bucket i holds durations d with 2^(i/4) < d <= 2^((i+1)/4) seconds. Returns the index
    before any clamping to a probe's bucket range.
    """
    if scale != 2:
        raise ValueError("the kernel side computes scale 2 only")
    x, unit_octaves = ns_to_binary_units(ns)
    if x < 2:
        return -unit_octaves * 4 - 1
    y = x - 1
    k = y.bit_length() - 1
    mantissa = y >> (k - 16) if k >= 16 else y << (16 - k)
    sub = sum(mantissa >= q for q in _QUARTERS)
    return k * 4 + sub - unit_octaves * 4


def bucket_upper_bound(index: int, scale: int) -> float:
    """The inclusive upper boundary of bucket `index`: base^(index+1)."""
    return float(2.0 ** ((index + 1) / (1 << scale))) if scale >= 0 else float(
        2.0 ** ((index + 1) << -scale)
    )


def bucket_lower_bound(index: int, scale: int) -> float:
    return bucket_upper_bound(index - 1, scale)


def trim(offset: int, raw: bytes) -> tuple[int, list[int]]:
    """Drop empty buckets at both ends (OTLP sends only the populated span) of buckets
    given as packed native u32s, as a kernel map holds them. At C speed: the empty ends
    are runs of zero bytes, so strip()s find the populated span."""
    head = len(raw) - len(raw.lstrip(b"\0"))
    if head == len(raw):
        return 0, []
    tail = len(raw) - len(raw.rstrip(b"\0"))
    first, end = head // 4, (len(raw) - tail + 3) // 4
    return offset + first, array("I", raw[first * 4 : end * 4]).tolist()


def merge_into(
    offset: int, counts: list[int], other_offset: int, other_counts: Sequence[int]
) -> tuple[int, list[int]]:
    """Add one bucket span to another at the same scale; returns the merged span."""
    if not other_counts:
        return offset, counts
    if not counts:
        return other_offset, list(other_counts)
    lo = min(offset, other_offset)
    hi = max(offset + len(counts), other_offset + len(other_counts))
    merged = [0] * (hi - lo)
    for i, c in enumerate(counts):
        merged[offset - lo + i] += c
    for i, c in enumerate(other_counts):
        merged[other_offset - lo + i] += c
    return lo, merged


def quantile(
    q: float, scale: int, offset: int, counts: Sequence[int], lo: float, hi: float
) -> float:
    """Estimate the q-quantile from buckets: the upper bound of the bucket where the rank
    falls, clamped into the observed [min, max] so it never claims more than was seen."""
    total = sum(counts)
    if total == 0:
        return 0.0
    rank = q * total
    seen = 0
    for i, c in enumerate(counts):
        seen += c
        if seen >= rank and c:
            return min(max(bucket_upper_bound(offset + i, scale), lo), hi)
    return hi
