/* runqueue_latency.bpf.c - how long runnable tasks wait for a CPU, per workload.
 *
 * Hooks:      raw_tracepoint/sched_wakeup (a sleeping task becomes runnable),
 *             raw_tracepoint/sched_wakeup_new (a new task; optional: without it a new
 *             task's first wait is not measured) and raw_tracepoint/sched_switch (a task
 *             leaves the CPU - still runnable when it was preempted or yielded - and
 *             another gets it). The switch reads its prev_state argument (Linux 5.18+).
 * Measures:   each wait on a run queue, from becoming runnable (woken, or switched out
 *             while runnable) to getting a CPU: what the kernel's schedstat run_delay
 *             sums per task. A wait is measured when the task gets the CPU and recorded
 *             when it leaves it again: it is then `current`, so its cgroup and executable
 *             are read the cheap way (workload.h), never from another task's struct.
 * Aggregates: per key - (cgroup id, executable) by default, else (tgid), (cgroup id) or
 *             nothing, as configured - and how the task came to wait (WAIT_VOLUNTARY: it
 *             was woken after giving up the CPU, or is new; WAIT_INVOLUNTARY: it was
 *             preempted while it could run): every wait, exactly, as a base-2
 *             exponential histogram at scale 2 (exp_histogram.h) with count, sum, min
 *             and max.
 * Maps:       tasks         hash (preallocated: written with interrupts off), TASKS
 *                           entries: each task (task_struct address) that is waiting or
 *                           running with a wait to record; a task that blocks leaves it.
 *                           Full: that wait is not measured (tasks_full).
 *             waits_0/_1    hashes (preallocated), MAX_ENTRIES keys each, in generations
 *                           (generations.h): user space flips, waits out writers, drains
 *                           the old one. Full: the wait is lost (map_full).
 *             zero_value    1-entry array: the zeroed value to insert (too big for stack).
 *             probe_stats   per-CPU counters (probe_stats.h).
 *             cgroup_filter with FILTER_CGROUP (cgroup_filter.h): the selected workloads;
 *                           applied when a wait is recorded.
 *             Preallocated, the defaults (TASKS 16384, MAX_ENTRIES 2048) hold about 4.5 MB
 *             of kernel memory: ~0.8 KB a key in each generation, ~80 bytes a task.
 * Cost:       per wakeup, one hash lookup and, for a task that was sleeping, one insert;
 *             per context switch, a clock read and two hash lookups (the task leaving,
 *             the one arriving), and for a task that waited, its identity (one helper
 *             and three probe reads for the executable), a lookup of its key and five
 *             atomic adds. Measured with the kernel's BPF run-time statistics on this
 *             2-vCPU VM while two processes ping-pong over pipes on one CPU (~60,000
 *             switches a second): on_switch 240-285 ns a run, on_wakeup 160-175 ns,
 *             where an empty program on sched_switch reads 45 ns (the statistics' own
 *             clock reads): about 0.2 us more per context switch and 0.12 us per wakeup.
 *
 * Compile-time switches (cflags from otel_ebpf/probes/runqueue_latency.py): TASKS,
 * MAX_ENTRIES, KEY_WORKLOAD (+ the offsets workload.h reads), KEY_TGID, KEY_CGROUP,
 * FILTER_CGROUP.
 */
#define TASK_COMM_LEN 16
#define TASK_RUNNING 0
#include "exp_histogram.h"
#ifdef KEY_WORKLOAD
#include "workload.h"
#else
#define EXE_LEN 32
#endif

#define WAIT_VOLUNTARY 0
#define WAIT_INVOLUNTARY 1
#define ERRNO_EXIST 17  /* errno values are ABI */

struct wait_key {
    u64 cgroup_id;  /* KEY_WORKLOAD, KEY_CGROUP */
    u64 exe;        /* KEY_WORKLOAD: the executable's inode address, an opaque id */
    u32 tgid;       /* KEY_TGID */
    u32 type;       /* WAIT_* */
};

struct wait_value {
    u64 count;
    u64 sum_ns;
    u64 min_ns;     /* 0 = none yet */
    u64 max_ns;
    u64 cgroup_id;  /* of the first task recorded in the interval */
    u32 tgid;       /* likewise */
    u32 _pad;
    char comm[TASK_COMM_LEN];
    char exe[EXE_LEN];          /* executable name (KEY_WORKLOAD) */
    u32 buckets[HIST_BUCKETS];
};

struct task_wait {
    u64 queued_ns;  /* when it became runnable; 0: it is running */
    u64 waited_ns;  /* its wait that ended when it got the CPU, to record; 0: none */
    u32 type;       /* how it came to be queued */
    u32 waited_type;
};

enum probe_stat {
    STAT_TASKS_FULL = 0,  /* a task could not be tracked: that wait is not measured */
    STAT_MAP_FULL = 1,    /* a wait whose key did not fit in the map: lost */
    STAT_COUNT = 2,
};

BPF_HASH(tasks, u64, struct task_wait, TASKS);
BPF_HASH(waits_0, struct wait_key, struct wait_value, MAX_ENTRIES);
BPF_HASH(waits_1, struct wait_key, struct wait_value, MAX_ENTRIES);
BPF_ARRAY(zero_value, struct wait_value, 1);
#include "generations.h"
#include "probe_stats.h"
#include "cgroup_filter.h"

/* The value of `key` in waits_<which>, inserted (with the current task's names) when new;
 * NULL when the map is full. `which` is a constant at each call. */
static __always_inline struct wait_value *entry(u32 which, struct wait_key *key, u32 tgid)
{
    struct wait_value *v = which ? waits_1.lookup(key) : waits_0.lookup(key);
    if (v)
        return v;
    u32 zero = 0;
    struct wait_value *init = zero_value.lookup(&zero);
    if (!init)
        return NULL;
    /* BPF_NOEXIST: when another CPU inserted the key first, its entry stays */
    which ? waits_1.insert(key, init) : waits_0.insert(key, init);
    v = which ? waits_1.lookup(key) : waits_0.lookup(key);
    if (v && !v->tgid) {
        v->tgid = tgid;
        v->cgroup_id = bpf_get_current_cgroup_id();
        bpf_get_current_comm(&v->comm, sizeof(v->comm));
#ifdef KEY_WORKLOAD
        exe_name(current_exe_file(), v->exe);
#endif
    }
    return v;
}

/* A wait of the current task, into its workload's histogram. */
static __always_inline void record(u64 wait_ns, u32 type, u32 tgid)
{
    if (!current_selected())
        return;
    struct wait_key key = {.type = type};
#if defined(KEY_WORKLOAD) || defined(KEY_CGROUP)
    key.cgroup_id = bpf_get_current_cgroup_id();
#endif
#ifdef KEY_TGID
    key.tgid = tgid;
#endif
#ifdef KEY_WORKLOAD
    key.exe = exe_id(current_exe_file());
#endif
    u32 gen = current_generation();
    struct wait_value *v = gen ? entry(1, &key, tgid) : entry(0, &key, tgid);
    if (!v) {
        count_stat(STAT_MAP_FULL);
        return;
    }
    __sync_fetch_and_add(&v->count, 1);
    __sync_fetch_and_add(&v->sum_ns, wait_ns);
    __sync_fetch_and_add(&v->buckets[hist_slot(wait_ns)], 1);
    hist_extremes(&v->min_ns, &v->max_ns, wait_ns);
}

/* A task becomes runnable (sched_wakeup, sched_wakeup_new). A task already tracked is
 * queued (its first wakeup is its start) or running (a wakeup that found it not yet
 * asleep): either way, nothing new. Named on_* rather than BCC's raw_tracepoint__* so
 * that BCC does not attach it on load. */
int on_wakeup(struct bpf_raw_tracepoint_args *ctx)
{
    /* args: struct task_struct *p */
    u64 task = ctx->args[0];
    if (tasks.lookup(&task))
        return 0;
    struct task_wait w = {.queued_ns = bpf_ktime_get_ns(), .type = WAIT_VOLUNTARY};
    int err = tasks.insert(&task, &w);
    if (err && err != -ERRNO_EXIST)  /* EEXIST: another CPU's wakeup of it came first */
        count_stat(STAT_TASKS_FULL);
    return 0;
}

int on_switch(struct bpf_raw_tracepoint_args *ctx)
{
    /* args: bool preempt, struct task_struct *prev, struct task_struct *next,
     * unsigned int prev_state; current is still prev */
    u64 prev = ctx->args[1];
    u64 next = ctx->args[2];
    u64 now = bpf_ktime_get_ns();
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid) {  /* not the idle task: it never waits */
        struct task_wait *w = tasks.lookup(&prev);
        if (w && w->waited_ns) {
            record(w->waited_ns, w->waited_type, pid_tgid >> 32);
            w->waited_ns = 0;
        }
        /* still runnable (preempted, or yielded): queued again from now */
        if (ctx->args[0] || (u32)ctx->args[3] == TASK_RUNNING) {
            struct task_wait queued = {.queued_ns = now, .type = WAIT_INVOLUNTARY};
            if (tasks.update(&prev, &queued))
                count_stat(STAT_TASKS_FULL);
        } else if (w) {
            tasks.delete(&prev);
        }
    }
    struct task_wait *n = tasks.lookup(&next);
    if (n && n->queued_ns) {
        u64 wait = now - n->queued_ns;
        n->waited_ns = wait ? wait : 1;
        n->waited_type = n->type;
        n->queued_ns = 0;
    }
    return 0;
}
