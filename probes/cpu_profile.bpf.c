/* cpu_profile.bpf.c - sampled on-CPU stacks, counted in the kernel.
 *
 * Hooks:      perf_event, software cpu-clock at SAMPLE_HZ on every CPU (no hardware PMU is
 *             needed). Each sample records the interrupted task's user and kernel stacks.
 * Aggregates: sample counts per (tgid, tid, comm, user stack id, kernel stack id), the
 *             cgroup id recorded with the key. Stacks are interned in stack maps.
 * Maps:       samples       hash, MAX_SAMPLES keys; drained (lookup and delete) by user
 *                           space every collection.
 *             user_stacks   stack_trace, USER_STACK_ENTRIES buckets of 127 frames (1 KiB
 *             kernel_stacks each, preallocated); ids are deleted by user space once read,
 *                           so a map holds only the stacks of one collection interval. A new
 *                           stack whose hash bucket is taken by another fails with -EEXIST:
 *                           the sample is kept and counted, its stack reported lost, never
 *                           replaced by another stack (no BPF_F_REUSE_STACKID).
 *             seen_tgids    LRU hash (8192): processes already announced to user space.
 *             new_tgids     ring buffer: "a process appeared", so user space can read its
 *                           memory maps while it lives (short-lived processes are then still
 *                           symbolized after they exit).
 *             profile_stats per-CPU counters: idle samples dropped, stacks lost, map full.
 *             cgroup_filter with FILTER_CGROUP: the cgroups of the selected workloads.
 * Cost:       per sample (SAMPLE_HZ x CPUs a second, 19 Hz by default): two stack walks
 *             (frame pointers; user stacks of code built without them are truncated), one
 *             LRU lookup, one hash update. Nothing runs between samples.
 *
 * Compile-time switches: SAMPLE_HZ (informational), MAX_SAMPLES, USER_STACK_ENTRIES,
 * KERNEL_STACK_ENTRIES, KEEP_IDLE, FILTER_CGROUP.
 */
#include <uapi/linux/bpf_perf_event.h>
#include <linux/sched.h>

struct sample_key {
    u32 tgid;
    u32 tid;
    s32 user_stack_id;    /* < 0: -errno of bpf_get_stackid */
    s32 kernel_stack_id;
    char comm[TASK_COMM_LEN];
};

struct sample_value {
    u64 count;
    u64 cgroup_id;
};

struct new_tgid {
    u32 tgid;
};

enum profile_stat {
    STAT_IDLE = 0,             /* samples of the idle task, dropped unless KEEP_IDLE */
    STAT_USER_STACK_LOST = 1,  /* user stack id failed (collision, no memory) */
    STAT_KERNEL_STACK_LOST = 2,
    STAT_MAP_FULL = 3,         /* a new key did not fit in samples: sample lost */
    STAT_ANNOUNCE_LOST = 4,    /* the new-process ring buffer was full */
    STAT_SAMPLES = 5,          /* every sample taken, for rates */
    STAT_COUNT = 6,
};

BPF_HASH(samples, struct sample_key, struct sample_value, MAX_SAMPLES);
BPF_STACK_TRACE(user_stacks, USER_STACK_ENTRIES);
BPF_STACK_TRACE(kernel_stacks, KERNEL_STACK_ENTRIES);
BPF_TABLE("lru_hash", u32, u8, seen_tgids, 8192);
BPF_RINGBUF_OUTPUT(new_tgids, 16);
BPF_PERCPU_ARRAY(profile_stats, u64, STAT_COUNT);
#ifdef FILTER_CGROUP
BPF_HASH(cgroup_filter, u64, u8, 16384);
#endif

static __always_inline void count_stat(u32 stat)
{
    u64 *v = profile_stats.lookup(&stat);
    if (v)
        (*v)++;
}

int on_cpu_sample(struct bpf_perf_event_data *ctx)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    count_stat(STAT_SAMPLES);
#ifndef KEEP_IDLE
    if (tgid == 0) {
        count_stat(STAT_IDLE);
        return 0;
    }
#endif
#ifdef FILTER_CGROUP
    u64 cgroup = bpf_get_current_cgroup_id();
    if (!cgroup_filter.lookup(&cgroup))
        return 0;
#endif
    struct sample_key key = {.tgid = tgid, .tid = (u32)pid_tgid};
    bpf_get_current_comm(&key.comm, sizeof(key.comm));
    /* Kernel threads have no user stack: -EFAULT there is expected, not a loss. */
    key.user_stack_id = user_stacks.get_stackid(ctx, BPF_F_USER_STACK);
    key.kernel_stack_id = kernel_stacks.get_stackid(ctx, 0);
    if (key.user_stack_id < 0 && key.user_stack_id != -EFAULT)
        count_stat(STAT_USER_STACK_LOST);
    if (key.kernel_stack_id < 0 && key.kernel_stack_id != -EFAULT)
        count_stat(STAT_KERNEL_STACK_LOST);

    struct sample_value *value = samples.lookup(&key);
    if (value) {
        __sync_fetch_and_add(&value->count, 1);
    } else {
        struct sample_value init = {.count = 1, .cgroup_id = bpf_get_current_cgroup_id()};
        if (samples.insert(&key, &init) != 0) {
            /* lost the insert race to another CPU, or the map is full */
            value = samples.lookup(&key);
            if (value)
                __sync_fetch_and_add(&value->count, 1);
            else
                count_stat(STAT_MAP_FULL);
        }
    }

    if (tgid && !seen_tgids.lookup(&tgid)) {
        u8 one = 1;
        seen_tgids.update(&tgid, &one);
        struct new_tgid ev = {.tgid = tgid};
        if (new_tgids.ringbuf_output(&ev, sizeof(ev), 0) < 0)
            count_stat(STAT_ANNOUNCE_LOST);
    }
    return 0;
}
