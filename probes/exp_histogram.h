/* exp_histogram.h - durations bucketed as OTLP ExponentialHistogram indexes, in the kernel.
 *
 * Scale 2 (four buckets per octave) of the duration in *seconds*, from HIST_MIN_INDEX
 * (2^-26 s, 14.9 ns) up to HIST_MIN_INDEX + HIST_BUCKETS - 1 (2^12 s, 68 min): user space
 * exports the populated span of the array as the positive buckets, without re-bucketing.
 * Durations outside the range are clamped into the end buckets. The decoder's copy of
 * these constants is otel_ebpf/histogram.py; a test compares the two.
 *
 * Cost: one 64-bit division, a six-step log2 and three compares per value; keeping a
 * series' min and max, one compare each and a compare-and-swap when it moves.
 */
#ifndef OTEL_EBPF_EXP_HISTOGRAM_H
#define OTEL_EBPF_EXP_HISTOGRAM_H

#define HIST_SCALE 2
#define HIST_MIN_INDEX (-104)
#define HIST_BUCKETS 152

/* A duration is bucketed in units of 2^-40 s (2^-30 s above 30 s, where that still
 * leaves 35 bits), so that octaves of the unit are octaves of a second:
 * index = 4 * floor(log2 x) + sub-bucket - 4 * unit_octaves.
 * 2^(j/4) for j = 1..3 as 16.16 fixed point, rounded up: the mantissa compares below
 * place a value in the right quarter-octave to within 2^-16 of a boundary. */
#define HIST_QUARTER_1 77936ULL
#define HIST_QUARTER_2 92682ULL
#define HIST_QUARTER_3 110218ULL

/* floor(log2(v)) for v > 0, branch-light. */
static __always_inline u32 hist_log2(u64 v)
{
    u32 r = 0;
    if (v >> 32) { v >>= 32; r += 32; }
    if (v >> 16) { v >>= 16; r += 16; }
    if (v >> 8)  { v >>= 8;  r += 8; }
    if (v >> 4)  { v >>= 4;  r += 4; }
    if (v >> 2)  { v >>= 2;  r += 2; }
    if (v >> 1)  { r += 1; }
    return r;
}

/* Array slot of a duration in ns, for OTLP buckets (base^i, base^(i+1)]: upper bound
 * inclusive, hence the "- 1" before taking the logarithm. */
static __always_inline u32 hist_slot(u64 ns)
{
    /* ns -> 2^-40 s (or 2^-30 s) units without overflowing u64 in any branch. */
    u64 x;
    s64 unit_octaves = 40;
    if (ns < 30000000000ULL) {
        x = ns * 1099 + ns * 511627776ULL / 1000000000ULL;
    } else {
        unit_octaves = 30;
        if (ns < 250000000000ULL)
            x = ns + ns * 73741824ULL / 1000000000ULL;
        else
            x = (ns / 1000) * 1073741824ULL / 1000000ULL;
    }
    if (x < 2)
        return 0;
    u64 y = x - 1;
    u32 k = hist_log2(y);
    /* 16.16 mantissa of y in [1, 2) */
    u64 m = k >= 16 ? y >> (k - 16) : y << (16 - k);
    u32 sub = (m >= HIST_QUARTER_1) + (m >= HIST_QUARTER_2) + (m >= HIST_QUARTER_3);
    s64 slot = (s64)k * 4 + sub - unit_octaves * 4 - HIST_MIN_INDEX;
    if (slot < 0)
        return 0;
    if (slot >= HIST_BUCKETS)
        return HIST_BUCKETS - 1;
    return slot;
}

/* Keep *min_ns and *max_ns (of a map value other CPUs update too) around `ns`; a min of
 * 0 is unset. Four tries each: a lost race means another CPU moved it just now. */
static __always_inline void hist_extremes(u64 *min_ns, u64 *max_ns, u64 ns)
{
    u64 old = *min_ns;
#pragma unroll
    for (int i = 0; i < 4 && (old == 0 || ns < old); i++) {
        u64 seen = __sync_val_compare_and_swap(min_ns, old, ns);
        if (seen == old)
            break;
        old = seen;
    }
    old = *max_ns;
#pragma unroll
    for (int i = 0; i < 4 && ns > old; i++) {
        u64 seen = __sync_val_compare_and_swap(max_ns, old, ns);
        if (seen == old)
            break;
        old = seen;
    }
}

#endif
