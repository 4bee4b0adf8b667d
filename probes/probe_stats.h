/* probe_stats.h - a probe's own counters: what it could not record, and totals.
 *
 * The program defines `enum probe_stat { STAT_<NAME> = <n>, ..., STAT_COUNT }` first; its
 * counters are the per-CPU array probe_stats, indexed by that enum. User space takes the
 * counters' names from the enum in the source (otel_ebpf/probes/stats.py), so the enum is
 * the one list of them: reordering or inserting entries cannot mislabel a counter.
 * The engine pastes shared headers into the program it compiles (BCC rewrites map calls
 * such as probe_stats.lookup() only there; otel_ebpf.kernel.engine.inline_headers).
 *
 * Cost: one per-CPU array lookup and an add per counted event (no atomic: per CPU).
 */
#ifndef OTEL_EBPF_PROBE_STATS_H
#define OTEL_EBPF_PROBE_STATS_H

BPF_PERCPU_ARRAY(probe_stats, u64, STAT_COUNT);

static __always_inline void count_stats(u32 stat, u64 n)
{
    u64 *v = probe_stats.lookup(&stat);
    if (v)
        *v += n;
}

static __always_inline void count_stat(u32 stat)
{
    count_stats(stat, 1);
}

#endif
