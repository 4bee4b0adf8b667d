/* clock_floor.bpf.c - the floor of any latency probe, for bench/run.py.
 *
 * The empty raw tracepoints (empty_tracepoints.bpf.c) plus what no latency probe can do
 * without: one bpf_ktime_get_ns() on sys_enter, one on sys_exit, and the difference kept
 * (in a per-CPU array, the cheapest store there is, so the compiler keeps the reads). It
 * remembers no enter time per task and aggregates nothing, so it measures wrong latencies
 * when a syscall sleeps: it is a cost reference, never a probe.
 *
 * Same names and hook type as the real probe, so the modes differ only in the bodies.
 */

BPF_PERCPU_ARRAY(clock_reads, u64, 2);

int on_sys_enter(struct bpf_raw_tracepoint_args *ctx)
{
    u32 slot = 0;
    u64 *enter = clock_reads.lookup(&slot);
    if (enter)
        *enter = bpf_ktime_get_ns();
    return 0;
}

int on_sys_exit(struct bpf_raw_tracepoint_args *ctx)
{
    u32 slot = 0, sum = 1;
    u64 now = bpf_ktime_get_ns();
    u64 *enter = clock_reads.lookup(&slot);
    u64 *total = clock_reads.lookup(&sum);
    if (enter && total)
        *total += now - *enter;
    return 0;
}
