/* cpu_profile.bpf.c - sampled on-CPU stacks, counted in the kernel.
 *
 * Hooks:      perf_event, software cpu-clock at SAMPLE_HZ on every CPU (no hardware PMU is
 *             needed). Each sample records the interrupted task's user stack (DWARF CFI
 *             where user space loaded it, frame pointers elsewhere: user_stack.h) and its
 *             kernel stack (frame pointers).
 * Aggregates: sample counts per (tgid, tid, comm, user stack, kernel stack), the cgroup id
 *             recorded with the key. Stacks are interned by content (stacks.h).
 * Maps:       samples       hash, MAX_SAMPLES keys; drained (lookup and delete) by user
 *                           space every collection.
 *             user_stacks, kernel_stacks, stack_scratch: stacks.h; user space deletes the
 *                           stacks no sample used for a while. Full: the sample is kept
 *                           and counted, its stack reported lost.
 *             seen_tgids    LRU hash (8192): processes already announced to user space, with
 *                           their start time: a reused pid is a new process (pid_max is
 *                           often 32768, and a busy host wraps it in minutes).
 *             new_tgids     ring buffer: "a process appeared", so user space can read its
 *                           memory maps while it lives (short-lived processes are then still
 *                           symbolized after they exit).
 *             py_*          the interpreter's frames of Python processes (python_stack.h).
 *             probe_stats   per-CPU counters (probe_stats.h): idle samples dropped, stacks
 *                           lost, map full, Python walks given up.
 *             cgroup_filter with FILTER_CGROUP (cgroup_filter.h): the selected workloads.
 *             unwind_*      the unwinder's tables and per-process mappings (user_stack.h;
 *                           UNWIND_ROWS x 8 bytes preallocated, UNWIND_PROCS x ~4 KiB).
 * Cost:       per sample (SAMPLE_HZ x CPUs a second, 19 Hz by default): the user stack's
 *             walk (per frame two binary searches and one or two user reads: 3.1-6.0 us a
 *             sample for 3..36-frame stacks, measured by bench/run.py --suite unwind), the
 *             kernel's frame-pointer walk, a multiply-xor pass over each stack's addresses,
 *             two hash lookups (a 1 KiB copy when a stack is new), one LRU lookup, one
 *             hash update. Nothing runs between samples.
 *
 * Compile-time switches: SAMPLE_HZ (informational), MAX_SAMPLES, USER_STACK_ENTRIES,
 * KERNEL_STACK_ENTRIES, UNWIND_ROWS, UNWIND_PROCS, PY_STACK_ENTRIES, TASK_FSBASE_OFF,
 * TASK_GROUP_LEADER_OFF, TASK_START_TIME_OFF, KEEP_IDLE, FILTER_CGROUP.
 */
/* struct bpf_perf_event_data, declared here: <uapi/linux/bpf_perf_event.h> reaches
 * linux/ptrace.h through asm-generic and cost 1.7 s of the 2.1 s this program took to
 * compile; asm/ptrace.h alone costs ~0.05 s. */
#include <asm/ptrace.h>
#include <uapi/asm-generic/errno-base.h>
#if defined(__x86_64__)
typedef struct pt_regs bpf_user_pt_regs_t;
#elif defined(__aarch64__)
typedef struct user_pt_regs bpf_user_pt_regs_t;
#else
#include <uapi/asm/bpf_perf_event.h>
#endif
struct bpf_perf_event_data {
    bpf_user_pt_regs_t regs;
    __u64 sample_period;
    __u64 addr;
};
#define TASK_COMM_LEN 16

struct sample_key {
    u32 tgid;
    u32 tid;
    u64 user_stack;       /* id (content hash) in user_stacks; 0: no stack recorded */
    u64 kernel_stack;
    u64 python_stack;     /* id in py_stacks (python_stack.h); 0: no Python frames */
    s32 user_stack_err;   /* -errno when the stack could not be recorded, else 0 */
    s32 kernel_stack_err;
    char comm[TASK_COMM_LEN];
};

struct sample_value {
    u64 count;
    u64 cgroup_id;
};

struct new_tgid {
    u32 tgid;
};

enum probe_stat {
    STAT_IDLE = 0,             /* samples of the idle task, dropped unless KEEP_IDLE */
    STAT_USER_STACK_LOST = 1,  /* user stack not recorded (stack map full, walk failed) */
    STAT_KERNEL_STACK_LOST = 2,
    STAT_MAP_FULL = 3,         /* a new key did not fit in samples: sample lost */
    STAT_ANNOUNCE_LOST = 4,    /* the new-process ring buffer was full */
    STAT_SAMPLES = 5,          /* every sample taken, for rates */
    /* user stacks kept but cut short (user_stack.h, enum unwind_reason, in its order) */
    STAT_UNWIND_NOT_READY = 6,
    STAT_UNWIND_UNSUPPORTED = 7,
    STAT_UNWIND_READ_FAILED = 8,
    STAT_UNWIND_TRUNCATED = 9,
    STAT_UNWIND_BAD_FRAME = 10,
    STAT_PY_TRUNCATED = 11,    /* Python frames past PY_MAX_FRAMES not recorded */
    STAT_PY_READ_FAILED = 12,  /* a Python thread state or frame could not be read */
    STAT_PY_THREAD_LOST = 13,  /* no thread state within PY_MAX_THREADS */
    STAT_PY_STACK_LOST = 14,   /* py_stacks full */
    STAT_COUNT = 15,
};

BPF_HASH(samples, struct sample_key, struct sample_value, MAX_SAMPLES);
BPF_TABLE("lru_hash", u32, u64, seen_tgids, 8192);  /* tgid -> its start time */
BPF_RINGBUF_OUTPUT(new_tgids, 16);
#include "probe_stats.h"
#include "cgroup_filter.h"
/* user stacks unwound with DWARF CFI (user_stack.h), its reasons counted from here */
#define UNWIND_USER_STACKS
#define UNWIND_STAT_FIRST STAT_UNWIND_NOT_READY
#include "stacks.h"
#include "python_stack.h"

/* The start time of the current process (its thread group leader), from BTF offsets. */
static __always_inline u64 process_start_time(void)
{
    u64 start = 0;
#if TASK_START_TIME_OFF >= 0
    void *task = (void *)bpf_get_current_task();
    void *leader = 0;
    bpf_probe_read_kernel(&leader, sizeof(leader), task + TASK_GROUP_LEADER_OFF);
    if (leader)
        bpf_probe_read_kernel(&start, sizeof(start), leader + TASK_START_TIME_OFF);
#endif
    return start;
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
    if (!current_selected())
        return 0;
    struct sample_key key = {.tgid = tgid, .tid = (u32)pid_tgid};
    bpf_get_current_comm(&key.comm, sizeof(key.comm));
    /* Kernel threads have no user stack: -EFAULT there is expected, not a loss. */
    key.user_stack_err = intern_stack(ctx, USER_STACK, &key.user_stack);
    key.kernel_stack_err = intern_stack(ctx, KERNEL_STACK, &key.kernel_stack);
    if (key.user_stack_err && key.user_stack_err != -EFAULT)
        count_stat(STAT_USER_STACK_LOST);
    if (key.kernel_stack_err && key.kernel_stack_err != -EFAULT)
        count_stat(STAT_KERNEL_STACK_LOST);
    python_stack(tgid, key.tid, &key.python_stack);

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

    u64 start = tgid ? process_start_time() : 0;
    u64 *seen = tgid ? seen_tgids.lookup(&tgid) : 0;
    if (tgid && (!seen || *seen != start)) {
        seen_tgids.update(&tgid, &start);
        struct new_tgid ev = {.tgid = tgid};
        if (new_tgids.ringbuf_output(&ev, sizeof(ev), 0) < 0)
            count_stat(STAT_ANNOUNCE_LOST);
    }
    return 0;
}
