/* off_cpu.bpf.c - where threads wait: the stacks of blocked threads, weighted by the time
 * until they ran again, summed in the kernel.
 *
 * Hooks:      raw_tracepoint/sched_switch (Linux 5.18+: it passes prev_state). A task that
 *             leaves the CPU blocked (not preempted, not still runnable: waiting for a
 *             CPU is runqueue_latency's) has its kernel and user stacks recorded there,
 *             while it is still `current` (stacks.h); when a later switch gives it a CPU
 *             again, the time it was away is added to its (thread, stacks) key.
 * Bounds:     a wait shorter than MIN_BLOCK_NS is dropped (counted: short). Stack captures
 *             are rate-limited per CPU (GCRA, rate_limit.h: RATE_INTERVAL_NS apart, burst
 *             RATE_BURST, each CPU its share of the configured rate, so no cache line
 *             bounces between CPUs); a wait whose stacks the limit refused still counts
 *             its time, under its thread with no stack (rate_limited).
 *             Kernel threads are skipped unless KEEP_KERNEL_THREADS.
 * Aggregates: per (tgid, tid, comm, user stack, kernel stack), as cpu_profile's samples:
 *             total blocked nanoseconds and waits, with the cgroup id recorded.
 * Maps:       blocked       LRU hash (preallocated: written with interrupts off), TASKS
 *                           entries, by task_struct address: the tasks off the CPU now,
 *                           with the time they left and their stacks and identity. A task
 *                           that sleeps for good is evicted when newer ones need the room.
 *             samples       hash (preallocated), MAX_SAMPLES keys; drained by user space.
 *                           Full: the wait is lost (map_full).
 *             user_stacks, kernel_stacks, stack_scratch: stacks.h.
 *             unwind_*      the DWARF unwinder's tables (user_stack.h), shared with every
 *                           program that unwinds (otel_ebpf/symbolize/unwind/shared.py).
 *             capture_rate  per-CPU array (1): the rate limiter's state.
 *             seen_tgids    LRU hash (8192): processes announced to user space, with their
 *                           mm: an exec (a new mm) is announced again, since the off-CPU
 *                           hook sees a child block between fork and exec, and maps read
 *                           then are not those of the program it runs next.
 *             new_tgids     ring buffer: "a process appeared", so user space reads its maps
 *                           while it lives.
 *             probe_stats   per-CPU counters (probe_stats.h).
 *             cgroup_filter with FILTER_CGROUP (cgroup_filter.h): applied when a task
 *                           leaves the CPU.
 * Cost:       per context switch, one clock read and an LRU lookup of the arriving task
 *             (and, when it had been recorded, a delete and a hash update with two
 *             atomics); per switch-out of a blocked user task, a probe read (its mm), the
 *             limiter's compare-and-swap, two stack walks with a hash of each (a 1 KiB copy
 *             for a new stack; the user walk is user_stack.h's, 3-6 us for 3..36 frames),
 *             its comm and cgroup, an LRU lookup and an LRU update. Measured by
 *             bench/run.py --suite offcpu: 145 ns a run on the defaults, 515 ns when every
 *             switch-out walks both (short) stacks, 30 ns for an empty program (README).
 *
 * Compile-time switches (cflags from otel_ebpf/probes/off_cpu.py): TASKS, MAX_SAMPLES,
 * USER_STACK_ENTRIES, KERNEL_STACK_ENTRIES, MIN_BLOCK_NS, RATE_INTERVAL_NS, RATE_BURST,
 * TASK_MM_OFF, KEEP_KERNEL_THREADS, FILTER_CGROUP.
 */
#define TASK_COMM_LEN 16
#define TASK_RUNNING 0
#define TASK_DEAD 0x80
#include "rate_limit.h"

struct sample_key {
    u32 tgid;
    u32 tid;
    u64 user_stack;       /* id (content hash) in user_stacks; 0: no stack recorded */
    u64 kernel_stack;
    s32 user_stack_err;   /* -errno when the stack could not be recorded, else 0 */
    s32 kernel_stack_err; /* (-EAGAIN for both: the rate limit refused the capture) */
    char comm[TASK_COMM_LEN];
};

struct sample_value {
    u64 total_ns;   /* blocked time of the waits added */
    u64 count;      /* waits */
    u64 cgroup_id;
};

struct blocked_task {
    u64 since_ns;
    u64 cgroup_id;
    struct sample_key key;
};

struct new_tgid {
    u32 tgid;
};

enum probe_stat {
    STAT_SHORT = 0,            /* waits shorter than MIN_BLOCK_NS: dropped by design */
    STAT_RATE_LIMITED = 1,     /* waits kept without stacks: the capture limit refused */
    STAT_USER_STACK_LOST = 2,  /* user stack not recorded (stack map full, walk failed) */
    STAT_KERNEL_STACK_LOST = 3,
    STAT_MAP_FULL = 4,         /* a wait whose new key did not fit in samples: lost */
    STAT_TASKS_FULL = 5,       /* a blocked task that could not be tracked: wait lost */
    STAT_ANNOUNCE_LOST = 6,    /* the new-process ring buffer was full */
    STAT_WAITS = 7,            /* waits recorded (long enough), for rates */
    /* user stacks kept but cut short (user_stack.h, enum unwind_reason, in its order) */
    STAT_UNWIND_NOT_READY = 8,
    STAT_UNWIND_UNSUPPORTED = 9,
    STAT_UNWIND_READ_FAILED = 10,
    STAT_UNWIND_TRUNCATED = 11,
    STAT_UNWIND_BAD_FRAME = 12,
    STAT_COUNT = 13,
};

BPF_TABLE("lru_hash", u64, struct blocked_task, blocked, TASKS);
BPF_HASH(samples, struct sample_key, struct sample_value, MAX_SAMPLES);
BPF_PERCPU_ARRAY(capture_rate, u64, 1);
BPF_TABLE("lru_hash", u32, u64, seen_tgids, 8192);
BPF_RINGBUF_OUTPUT(new_tgids, 16);
#include "probe_stats.h"
#include "cgroup_filter.h"
/* user stacks unwound with DWARF CFI (user_stack.h; the maps are the CPU profiler's,
 * shared), its reasons counted from here */
#define UNWIND_USER_STACKS
#define UNWIND_STAT_FIRST STAT_UNWIND_NOT_READY
#include "stacks.h"

#ifndef ERRNO_AGAIN
#define ERRNO_AGAIN 11  /* errno values are ABI */
#endif

/* The current task's mm (0 for a kernel thread). */
static __always_inline u64 current_mm(void)
{
    u64 mm = 0;
    bpf_probe_read_kernel(&mm, sizeof(mm), (void *)(bpf_get_current_task() + TASK_MM_OFF));
    return mm;
}

static __always_inline int take_token(u64 now)
{
    u32 zero = 0;
    u64 *tat = capture_rate.lookup(&zero);
    return tat && rate_limit_admit(tat, now, RATE_INTERVAL_NS, RATE_BURST);
}

/* The current task leaves the CPU blocked: remember when, with its stacks and identity. */
static __always_inline void leave(void *ctx, u64 task, u64 pid_tgid, u64 mm, u64 now)
{
    struct blocked_task b = {.since_ns = now, .cgroup_id = bpf_get_current_cgroup_id()};
    b.key.tgid = pid_tgid >> 32;
    b.key.tid = (u32)pid_tgid;
    bpf_get_current_comm(&b.key.comm, sizeof(b.key.comm));
    if (take_token(now)) {
        b.key.user_stack_err = intern_stack(ctx, USER_STACK, &b.key.user_stack);
        b.key.kernel_stack_err = intern_stack(ctx, KERNEL_STACK, &b.key.kernel_stack);
        u32 tgid = b.key.tgid;
        u64 *seen = seen_tgids.lookup(&tgid);
        if (!seen || *seen != mm) {
            seen_tgids.update(&tgid, &mm);
            struct new_tgid ev = {.tgid = tgid};
            if (new_tgids.ringbuf_output(&ev, sizeof(ev), 0) < 0)
                count_stat(STAT_ANNOUNCE_LOST);
        }
    } else {
        b.key.user_stack_err = b.key.kernel_stack_err = -ERRNO_AGAIN;
    }
    if (blocked.update(&task, &b))
        count_stat(STAT_TASKS_FULL);
}

/* A recorded task gets a CPU again: its wait, into its key. */
static __always_inline void arrive(struct blocked_task *b, u64 now)
{
    u64 waited = now - b->since_ns;
    if (waited < MIN_BLOCK_NS) {
        count_stat(STAT_SHORT);
        return;
    }
    /* stack losses are counted per wait recorded, as cpu_profile counts them per sample */
    if (b->key.user_stack_err == -ERRNO_AGAIN) {
        count_stat(STAT_RATE_LIMITED);
    } else {
        if (b->key.user_stack_err && b->key.user_stack_err != -EFAULT)
            count_stat(STAT_USER_STACK_LOST);
        if (b->key.kernel_stack_err && b->key.kernel_stack_err != -EFAULT)
            count_stat(STAT_KERNEL_STACK_LOST);
    }
    count_stat(STAT_WAITS);
    struct sample_value *value = samples.lookup(&b->key);
    if (!value) {
        struct sample_value init = {.cgroup_id = b->cgroup_id};
        samples.insert(&b->key, &init);  /* BPF_NOEXIST: another CPU's insert stays */
        value = samples.lookup(&b->key);
        if (!value) {
            count_stat(STAT_MAP_FULL);
            return;
        }
    }
    __sync_fetch_and_add(&value->total_ns, waited);
    __sync_fetch_and_add(&value->count, 1);
}

/* Named on_* rather than BCC's raw_tracepoint__* so that BCC does not attach it on load:
 * user space fills the cgroup filter first. */
int on_switch(struct bpf_raw_tracepoint_args *ctx)
{
    /* args: bool preempt, struct task_struct *prev, struct task_struct *next,
     * unsigned int prev_state; current is still prev */
    u64 prev = ctx->args[1];
    u64 next = ctx->args[2];
    u64 now = bpf_ktime_get_ns();
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 state = (u32)ctx->args[3];
    /* blocked: not the idle task, not preempted, not runnable, not exiting */
    if (pid_tgid && !ctx->args[0] && state != TASK_RUNNING && !(state & TASK_DEAD) &&
        current_selected()) {
        u64 mm = current_mm();
#ifndef KEEP_KERNEL_THREADS
        if (mm)
#endif
            leave(ctx, prev, pid_tgid, mm, now);
    }
    struct blocked_task *b = blocked.lookup(&next);
    if (b) {
        arrive(b, now);
        blocked.delete(&next);
    }
    return 0;
}
