/* rate_limit.h - an event rate limit tracing programs can share.
 *
 * GCRA: the token bucket kept as one "theoretical arrival time" (TAT) in a u64 map value,
 * so that a compare-and-swap can update it; tracing programs may not take bpf_spin_lock.
 * Each admitted event moves the TAT interval_ns ahead; an event that would move it more
 * than `burst` intervals past now is refused. At most burst + t / interval_ns events pass
 * in any t nanoseconds. Cost: one compare-and-swap per admitted event.
 */
#ifndef OTEL_EBPF_RATE_LIMIT_H
#define OTEL_EBPF_RATE_LIMIT_H

static __always_inline int rate_limit_admit(u64 *tat, u64 now, u64 interval_ns, u64 burst)
{
    u64 old = *tat;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        u64 next = (old > now ? old : now) + interval_ns;
        if (next - now > burst * interval_ns)
            return 0;
        u64 seen = __sync_val_compare_and_swap(tat, old, next);
        if (seen == old)
            return 1;
        old = seen;
    }
    return 0;  /* lost four races in a row: the limit is being hit anyway */
}

#endif
