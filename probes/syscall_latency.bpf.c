/* syscall_latency.bpf.c - per-workload syscall latency histograms.
 *
 * Hooks:      raw_tracepoint/sys_enter and raw_tracepoint/sys_exit (every syscall of
 *             every task). Raw tracepoints skip the argument marshalling that the classic
 *             raw_syscalls tracepoints pay for on each hit.
 * Aggregates: per (tgid, syscall nr) - or per (cgroup id, syscall nr), or per syscall nr,
 *             as configured - the sum, min and max in ns, and
 *             a base-2 exponential histogram at scale 2 (four buckets per octave) whose
 *             bucket indexes are OTLP ExponentialHistogram indexes of the duration in
 *             *seconds*, so user space exports them without re-bucketing.
 * Maps:       syscall_start  task-local storage {enter ns, nr}; freed with the task.
 *             latency_0/_1   hashes, MAX_ENTRIES keys each, BPF_F_NO_PREALLOC: the
 *                            current interval's histograms go to the one `generation`
 *                            names. User space flips the generation, waits out programs
 *                            still writing the old one, then drains it (lookup and delete),
 *                            so no update can land in an entry the drain already copied,
 *                            and exited processes leave with the drain.
 *             generation     1-entry array: which latency map is current (0 or 1).
 *             zero_value     1-entry array: the zeroed value to insert (too big for stack).
 *             probe_stats    per-CPU counters of events this program could not record.
 *             *_filter       hash sets for the optional pid / comm / cgroup filters.
 *             slow_threshold_ns  array by syscall nr (SYSCALL_SLOTS): 0 = never a span.
 *             slow_rate      1-entry array: the rate limiter's state (GCRA, one u64).
 *             slow_events    ring buffer (perf buffer before 5.8) of slow-call events.
 * Emits:      with SLOW_EVENTS, one event per call slower than its syscall's threshold,
 *             at most SLOW_RATE per second (burst SLOW_BURST); calls refused by the
 *             limit or by a full buffer are counted in probe_stats, never silently lost.
 * Cost:       per syscall: two task-storage lookups, two bpf_ktime_get_ns (about half of
 *             the total on a retpoline CPU), one array lookup (the generation), one hash
 *             lookup of an 8-byte key, two atomic adds and a min/max compare-and-swap
 *             (taken only on a new extreme). A new key per interval costs one insert. Calls
 *             below the smallest threshold pay one compare for the slow path; slower
 *             ones an array lookup, one compare-and-swap and a 72-byte ring buffer copy.
 *             Measured side by side against the empty raw tracepoints by `make bench`.
 *
 * Compile-time switches (cflags from otel_ebpf/probes/syscall_latency.py):
 *   MAX_ENTRIES, FILTER_TGID, FILTER_COMM, FILTER_CGROUP, KEY_TGID, KEY_CGROUP,
 *   SLOW_EVENTS, SLOW_MIN_NS, SLOW_RATE, SLOW_BURST, RINGBUF_PAGES, USE_PERF_BUFFER.
 */
#include <linux/sched.h>
#include "rate_limit.h"

/* Histogram layout: OTLP scale-2 indexes from HIST_MIN_INDEX (2^-26 s, 14.9 ns) up to
 * HIST_MIN_INDEX + HIST_BUCKETS - 1 (2^12 s, 68 min). Durations outside that range are
 * clamped into the end buckets; min and max stay exact. Keep in sync with the decoder. */
#define HIST_SCALE 2
#define HIST_MIN_INDEX (-104)
#define HIST_BUCKETS 152
/* A duration is bucketed in units of 2^-40 s (2^-30 s above 30 s, where that still
 * leaves 35 bits), so that octaves of the unit are octaves of a second:
 * index = 4 * floor(log2 x) + sub-bucket - 4 * unit_octaves. */

/* 2^(j/4) for j = 1..3 as 16.16 fixed point, rounded up: the mantissa compares below
 * place a value in the right quarter-octave to within 2^-16 of a boundary. */
#define QUARTER_1 77936ULL
#define QUARTER_2 92682ULL
#define QUARTER_3 110218ULL

struct syscall_start {
    u64 enter_ns;
    u32 nr;
    u32 _pad;
};

/* 8 bytes unless aggregating by cgroup: the key is hashed on every syscall. */
struct hist_key {
#ifdef KEY_CGROUP
    u64 cgroup_id;
#endif
    u32 tgid;       /* 0 unless KEY_TGID */
    u32 nr;
};

/* The count is the sum of the buckets: one atomic add fewer per syscall. */
struct hist_value {
    u64 sum_ns;
    u64 min_ns;
    u64 max_ns;
    u64 cgroup_id;             /* of the first caller in the interval */
    char comm[TASK_COMM_LEN];  /* thread name at first insert: a fallback identity */
    u32 buckets[HIST_BUCKETS];
};

enum probe_stat {
    STAT_MAP_FULL = 0,      /* a new key did not fit in latency: that event is lost */
    STAT_NO_START = 1,      /* sys_exit without a recorded enter (started before attach) */
    STAT_RATE_LIMITED = 2,  /* a slow call refused by the token bucket */
    STAT_BUFFER_FULL = 3,   /* a slow call that found the event buffer full */
    STAT_COUNT = 4,
};

BPF_TASK_STORAGE(syscall_start, struct syscall_start);
BPF_F_TABLE("hash", struct hist_key, struct hist_value, latency_0, MAX_ENTRIES,
            BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", struct hist_key, struct hist_value, latency_1, MAX_ENTRIES,
            BPF_F_NO_PREALLOC);
BPF_ARRAY(generation, u32, 1);
BPF_ARRAY(zero_value, struct hist_value, 1);
BPF_PERCPU_ARRAY(probe_stats, u64, STAT_COUNT);

#ifdef SLOW_EVENTS
#define SYSCALL_SLOTS 1024

struct slow_event {
    u64 enter_ns;   /* CLOCK_MONOTONIC */
    u64 exit_ns;
    u64 cgroup_id;
    s64 ret;
    u64 arg0;
    u32 tgid;
    u32 tid;
    u32 nr;
    u32 _pad;
    char comm[TASK_COMM_LEN];  /* the thread's name */
};

BPF_ARRAY(slow_threshold_ns, u64, SYSCALL_SLOTS);
BPF_ARRAY(slow_rate, u64, 1);  /* GCRA theoretical arrival time, ns */
#ifdef USE_PERF_BUFFER
BPF_PERF_OUTPUT(slow_events);
#else
BPF_RINGBUF_OUTPUT(slow_events, RINGBUF_PAGES);
#endif
#endif

#ifdef FILTER_TGID
BPF_HASH(tgid_filter, u32, u8, 1024);
#endif
#ifdef FILTER_COMM
struct comm_key { char comm[TASK_COMM_LEN]; };
BPF_HASH(comm_filter, struct comm_key, u8, 256);
#endif
#ifdef FILTER_CGROUP
BPF_HASH(cgroup_filter, u64, u8, 16384);
#endif

static __always_inline void count_stat(u32 stat)
{
    u64 *v = probe_stats.lookup(&stat);
    if (v)
        (*v)++;
}

static __always_inline int wanted(void)
{
#ifdef FILTER_TGID
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!tgid_filter.lookup(&tgid))
        return 0;
#endif
#ifdef FILTER_COMM
    struct comm_key ck = {};
    bpf_get_current_comm(&ck.comm, sizeof(ck.comm));
    if (!comm_filter.lookup(&ck))
        return 0;
#endif
#ifdef FILTER_CGROUP
    u64 cg = bpf_get_current_cgroup_id();
    if (!cgroup_filter.lookup(&cg))
        return 0;
#endif
    return 1;
}

/* floor(log2(v)) for v > 0, branch-light. */
static __always_inline u32 log2_u64(u64 v)
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

/* Array slot of a duration, for OTLP buckets (base^i, base^(i+1)]: upper bound
 * inclusive, hence the "- 1" before taking the logarithm. */
static __always_inline u32 bucket_slot(u64 ns)
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
    u32 k = log2_u64(y);
    /* 16.16 mantissa of y in [1, 2) */
    u64 m = k >= 16 ? y >> (k - 16) : y << (16 - k);
    u32 sub = (m >= QUARTER_1) + (m >= QUARTER_2) + (m >= QUARTER_3);
    s64 slot = (s64)k * 4 + sub - unit_octaves * 4 - HIST_MIN_INDEX;
    if (slot < 0)
        return 0;
    if (slot >= HIST_BUCKETS)
        return HIST_BUCKETS - 1;
    return slot;
}

#ifdef SLOW_EVENTS
/* At most SLOW_BURST + t * SLOW_RATE events in any t seconds (rate_limit.h). */
static __always_inline int take_token(u64 now)
{
    u32 zero = 0;
    u64 *tat = slow_rate.lookup(&zero);
    return tat && rate_limit_admit(tat, now, 1000000000ULL / SLOW_RATE, SLOW_BURST);
}

static __always_inline void emit_if_slow(struct bpf_raw_tracepoint_args *ctx, u32 nr,
                                         u64 enter_ns, u64 exit_ns)
{
    u64 delta = exit_ns - enter_ns;
    if (delta < SLOW_MIN_NS || nr >= SYSCALL_SLOTS)
        return;
    u64 *threshold = slow_threshold_ns.lookup(&nr);
    if (!threshold || !*threshold || delta < *threshold)
        return;
    if (!take_token(exit_ns)) {
        count_stat(STAT_RATE_LIMITED);
        return;
    }
    struct slow_event ev = {};
    ev.enter_ns = enter_ns;
    ev.exit_ns = exit_ns;
    ev.cgroup_id = bpf_get_current_cgroup_id();
    ev.ret = (s64)ctx->args[1];
    /* The first argument is still in the saved user registers at exit (x86: di; arm64
     * keeps it in orig_x0 because x0 now holds the return value). pt_regs is ABI. */
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
#if defined(__TARGET_ARCH_arm64) || defined(__aarch64__)
    bpf_probe_read_kernel(&ev.arg0, sizeof(ev.arg0), &regs->orig_x0);
#else
    bpf_probe_read_kernel(&ev.arg0, sizeof(ev.arg0), &regs->di);
#endif
    u64 pid_tgid = bpf_get_current_pid_tgid();
    ev.tgid = pid_tgid >> 32;
    ev.tid = (u32)pid_tgid;
    ev.nr = nr;
    bpf_get_current_comm(&ev.comm, sizeof(ev.comm));
#ifdef USE_PERF_BUFFER
    if (slow_events.perf_submit(ctx, &ev, sizeof(ev)) < 0)
        count_stat(STAT_BUFFER_FULL);
#else
    if (slow_events.ringbuf_output(&ev, sizeof(ev), 0) < 0)
        count_stat(STAT_BUFFER_FULL);
#endif
}
#endif

/* The histogram of `key` in latency_<which>, inserted when new; NULL when the map is full
 * (counted). `which` is a constant at each call, so each copy touches one map. */
static __always_inline struct hist_value *entry_of(u32 which, struct hist_key *key)
{
    struct hist_value *value = which ? latency_1.lookup(key) : latency_0.lookup(key);
    if (value)
        return value;
    u32 zero = 0;
    struct hist_value *init = zero_value.lookup(&zero);
    if (!init)
        return NULL;
    /* insert() is BPF_NOEXIST: when another CPU inserted the key first, its entry (and
     * its counts) stay and the lookup below finds it. */
    if (which)
        latency_1.insert(key, init);
    else
        latency_0.insert(key, init);
    value = which ? latency_1.lookup(key) : latency_0.lookup(key);
    if (!value) {
        count_stat(STAT_MAP_FULL);
        return NULL;
    }
    if (!value->comm[0]) {
        bpf_get_current_comm(&value->comm, sizeof(value->comm));
        value->cgroup_id = bpf_get_current_cgroup_id();
    }
    return value;
}

/* Named on_* rather than BCC's raw_tracepoint__* so that BCC does not attach them on
 * load: user space fills the filter maps first, then attaches. */
int on_sys_enter(struct bpf_raw_tracepoint_args *ctx)
{
    /* args: struct pt_regs *regs, long id */
    if (!wanted())
        return 0;
    struct task_struct *task = (struct task_struct *)bpf_get_current_task_btf();
    struct syscall_start *start = syscall_start.task_storage_get(
        task, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (!start)
        return 0;
    start->nr = (u32)ctx->args[1];
    start->enter_ns = bpf_ktime_get_ns();
    return 0;
}

int on_sys_exit(struct bpf_raw_tracepoint_args *ctx)
{
    struct task_struct *task = (struct task_struct *)bpf_get_current_task_btf();
    struct syscall_start *start = syscall_start.task_storage_get(task, 0, 0);
    if (!start)
        return 0;
    u64 enter_ns = start->enter_ns;
    if (!enter_ns) {
        count_stat(STAT_NO_START);
        return 0;
    }
    start->enter_ns = 0;
    u64 exit_ns = bpf_ktime_get_ns();
    u64 delta = exit_ns - enter_ns;
#ifdef SLOW_EVENTS
    emit_if_slow(ctx, start->nr, enter_ns, exit_ns);
#endif

    struct hist_key key = {.nr = start->nr};
#ifdef KEY_TGID
    key.tgid = bpf_get_current_pid_tgid() >> 32;
#endif
#ifdef KEY_CGROUP
    key.cgroup_id = bpf_get_current_cgroup_id();
#endif

    u32 zero = 0;
    u32 *gen = generation.lookup(&zero);
    struct hist_value *value = gen && *gen ? entry_of(1, &key) : entry_of(0, &key);
    if (!value)
        return 0;

    __sync_fetch_and_add(&value->sum_ns, delta);
    __sync_fetch_and_add(&value->buckets[bucket_slot(delta)], 1);

    /* min_ns == 0 means "unset" in a fresh entry. */
    u64 old = value->min_ns;
#pragma unroll
    for (int i = 0; i < 4 && (old == 0 || delta < old); i++) {
        u64 seen = __sync_val_compare_and_swap(&value->min_ns, old, delta);
        if (seen == old)
            break;
        old = seen;
    }
    old = value->max_ns;
#pragma unroll
    for (int i = 0; i < 4 && delta > old; i++) {
        u64 seen = __sync_val_compare_and_swap(&value->max_ns, old, delta);
        if (seen == old)
            break;
        old = seen;
    }
    return 0;
}
