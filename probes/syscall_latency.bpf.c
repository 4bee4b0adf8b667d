/* syscall_latency.bpf.c - per-workload syscall counts and latency histograms.
 *
 * Hooks:      raw_tracepoint/sys_enter, raw_tracepoint/sys_exit (every syscall of every
 *             task) and raw_tracepoint/sched_switch (a task leaving a CPU). Raw
 *             tracepoints skip the argument marshalling of the classic ones.
 * Aggregates: per key - (cgroup id, executable) by default, else (tgid), (cgroup id) or
 *             nothing, as configured - and syscall nr:
 *               calls   every call, exactly, without reading a clock;
 *               a base-2 exponential histogram at scale 2 (exp_histogram.h) of the calls
 *               that were timed, with their sum, min and max. Timed are:
 *               - every call that left the CPU (blocked, or was preempted): the switch
 *                 tracepoint sees the task leave inside the call and reads the clock
 *                 there; the call is timed from that moment (or from its entry when it
 *                 was also sampled) to its exit. Its weight is 1.
 *               - a sample of the calls that stayed on the CPU: one in SAMPLE_PERIOD on
 *                 average (the gap to the next sample is drawn uniformly from
 *                 1..2*SAMPLE_PERIOD-1, so no periodic pattern of calls can hide from it),
 *                 and the first call of each syscall number the probe ever sees, so
 *                 every syscall has a timed call for user space to scale from.
 *               User space scales the sampled calls' buckets to the exact number of
 *               calls that stayed on the CPU, so the exported count is exact and the
 *               quantiles are those of an unbiased sample. SAMPLE_PERIOD=1 times every
 *               call (both clocks on every call: the old cost).
 * Counting:   each CPU keeps the counts of the task running on it in SLOTS (syscall nr,
 *             calls) pairs and adds them to the map when the task leaves the CPU, when a
 *             9th syscall number needs a slot, or when user space flips the generation:
 *             a hash update per flush, not per call. Nothing is lost; a count flushed
 *             after a flip lands in the next interval's map. The switch tracepoint runs
 *             with interrupts off, where a new key of this no-prealloc map may find no
 *             memory: there it adds to keys already in the map only, and the rest waits
 *             for the next flush from a syscall (measured under 200 exits a second:
 *             inserts from the switch lost 10-21 calls a run; none since).
 * Maps:       cpu_state     per-CPU array (1): the call in flight, the sampling countdown,
 *                           the running task's identity and its pending counts.
 *             task_state    task-local storage: the call in flight of a task that left the
 *                           CPU, and the task's identity (computed once, again after an
 *                           exec or a cgroup change); freed with the task.
 *             latency_0/_1  hashes, MAX_ENTRIES keys each, BPF_F_NO_PREALLOC: the current
 *                           interval's values go to the one `generation` names. User
 *                           space flips it, waits out programs still writing the old one,
 *                           then drains that one (lookup and delete).
 *             generation    1-entry array: which latency map is current (generations.h).
 *             timed_once    array by syscall nr: has a call of it been timed yet.
 *             zero_value    1-entry array: the zeroed value to insert (too big for stack).
 *             probe_stats   per-CPU counters of events this program could not record
 *                           (probe_stats.h).
 *             *_filter      hash sets for the optional pid / comm / cgroup filters
 *                           (cgroup_filter.h).
 *             slow_threshold_ns  array by syscall nr (SYSCALL_SLOTS): 0 = never a span.
 *             slow_rate     1-entry array: the rate limiter's state (GCRA, one u64).
 *             slow_events   ring buffer (perf buffer before 5.8) of slow-call events.
 *             user_stacks   with SLOW_STACKS (stacks.h): the user stacks of slow calls,
 *                           STACK_ENTRIES, interned by content; user space ages them out.
 *             unwind_*      with SLOW_STACKS: the DWARF unwinder's tables (user_stack.h),
 *                           shared with the profilers (otel_ebpf/symbolize/unwind/shared.py).
 * Emits:      with SLOW_EVENTS, one event per timed call slower than its syscall's
 *             threshold, at most SLOW_RATE per second (burst SLOW_BURST); calls refused by
 *             the limit or by a full buffer are counted in probe_stats. With SLOW_STACKS,
 *             the event names the user stack that made the call, walked at the exit (the
 *             saved user registers are still the caller's there), only for an event that
 *             passed the limit: one stack walk (user_stack.h, 3-6 us) and a hash lookup
 *             per slow call.
 * Cost:       per call that stays on the CPU: enter - a per-CPU array lookup, the current
 *             task, three stores, a countdown and one array lookup (timed_once); exit - the
 *             per-CPU lookup, one compare, the generation, a scan of 8 slots and an add.
 *             No clock, no hash, no atomic. A sampled call adds two clock reads and a hash
 *             update. Per context switch of a task in a syscall: one clock read and a
 *             task-storage write; per switch of a task with pending counts, one hash
 *             update per syscall number it used. Measured by `make bench` (syscalls and
 *             redis suites) against the empty programs on the same hooks.
 *
 * Compile-time switches (cflags from otel_ebpf/probes/syscall_latency.py):
 *   MAX_ENTRIES, SAMPLE_PERIOD, NR_EXECVE, NR_EXECVEAT, NR_CLONE, NR_CLONE3, NR_FORK,
 *   NR_VFORK (-1 where the architecture has none), FILTER_TGID, FILTER_COMM,
 *   FILTER_CGROUP, KEY_WORKLOAD (+ the offsets workload.h reads), KEY_TGID, KEY_CGROUP,
 *   SLOW_EVENTS, SLOW_MIN_NS, SLOW_RATE, SLOW_BURST, RINGBUF_PAGES, USE_PERF_BUFFER,
 *   SLOW_STACKS, STACK_ENTRIES.
 */
#include <asm/ptrace.h>  /* struct pt_regs: the arguments of sys_enter */
/* task_struct only as an opaque pointer (task storage): linux/sched.h would cost ~1 s of
 * compile time for nothing */
struct task_struct;
#define TASK_COMM_LEN 16
#include "exp_histogram.h"
#include "rate_limit.h"
#ifdef KEY_WORKLOAD
#include "workload.h"
#else
#define EXE_LEN 32
#endif

#define SLOTS 8
#define SYSCALL_SLOTS 1024
#define ERRNO_2BIG 7    /* errno values are ABI */
#define ERRNO_NOMEM 12

#define CALL_OFFCPU 1       /* task_state.flags: a call in flight left the CPU */
#define CALL_ENTRY_EXACT 2  /* ... and its start is its entry, not when it left */

/* The key is hashed once per flush and per timed call, never per call. */
struct hist_key {
    u64 cgroup_id;  /* KEY_WORKLOAD, KEY_CGROUP */
    u64 exe;        /* KEY_WORKLOAD: the executable's inode address, an opaque id */
    u32 tgid;       /* KEY_TGID */
    u32 nr;
};

struct hist_value {
    u64 calls;      /* every call, exact */
    u64 offcpu;     /* calls that left the CPU: each one timed, weight 1 */
    u64 sampled;    /* calls that stayed on the CPU and were timed */
    u64 offcpu_sum_ns;
    u64 sampled_sum_ns;
    u64 min_ns;     /* over the timed calls; 0 = none yet */
    u64 max_ns;
    u64 cgroup_id;  /* of the first caller in the interval */
    u32 tgid;       /* likewise */
    u32 _pad;
    char comm[TASK_COMM_LEN];     /* thread name of the first caller: a fallback identity */
    char exe[EXE_LEN];            /* executable name (KEY_WORKLOAD) */
    u32 offcpu_buckets[HIST_BUCKETS];
    u32 sampled_buckets[HIST_BUCKETS];
};

/* Who a task is, for the key, and what is stored with a new key: its counts may be
 * flushed from another task's syscall, so nothing of a new key comes from `current`. */
struct identity {
    struct hist_key key;  /* nr = 0 */
    u64 cgroup_id;
    u32 tgid;
    u32 _pad;
    char comm[TASK_COMM_LEN];
    char exe[EXE_LEN];
};

struct task_state {
    u64 start_ns;       /* of the call in flight that left the CPU */
    u32 nr;
    u32 flags;          /* CALL_* */
    u64 identity_cgroup;  /* the cgroup id `identity` was computed in; 0 = not computed */
    struct identity identity;
};

struct cpu_state {
    u64 task;           /* whose call is in flight on this CPU (task_struct address) */
    u64 enter_ns;       /* its entry time, when sampled */
    u32 nr;
    u32 sampled;
    u32 countdown;      /* calls until the next sample */
    u32 gen;            /* the generation the pending counts were taken in */
    u64 owner;          /* whose counts are pending (task_struct address); 0: none */
    struct identity owner_id;
    u32 slot_nr[SLOTS];     /* nr + 1; 0 = free */
    u32 slot_calls[SLOTS];
};

enum probe_stat {
    STAT_MAP_FULL = 0,      /* calls lost: their key did not fit in a full latency map */
    STAT_NO_START = 1,      /* sys_exit without a recorded enter (started before attach) */
    STAT_RATE_LIMITED = 2,  /* a slow call refused by the token bucket */
    STAT_BUFFER_FULL = 3,   /* a slow call that found the event buffer full */
    STAT_NO_TASK_STORAGE = 4,  /* a call left the CPU but task storage was unavailable */
    STAT_NO_MEMORY = 5,     /* calls lost: the kernel had no memory for their new key */
    STAT_TIMING_LOST = 6,   /* a timed call whose key could not be inserted (counted still) */
    STAT_SLOW_STACK_LOST = 7,  /* a slow call's user stack not recorded (map full, walk) */
    /* slow calls' user stacks kept but cut short (user_stack.h, enum unwind_reason) */
    STAT_UNWIND_NOT_READY = 8,
    STAT_UNWIND_UNSUPPORTED = 9,
    STAT_UNWIND_READ_FAILED = 10,
    STAT_UNWIND_TRUNCATED = 11,
    STAT_UNWIND_BAD_FRAME = 12,
    STAT_COUNT = 13,
};

BPF_PERCPU_ARRAY(cpu_state, struct cpu_state, 1);
BPF_TASK_STORAGE(task_state, struct task_state);
BPF_F_TABLE("hash", struct hist_key, struct hist_value, latency_0, MAX_ENTRIES,
            BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", struct hist_key, struct hist_value, latency_1, MAX_ENTRIES,
            BPF_F_NO_PREALLOC);
#include "generations.h"
BPF_ARRAY(timed_once, u8, SYSCALL_SLOTS);
BPF_ARRAY(zero_value, struct hist_value, 1);
#include "probe_stats.h"
#include "cgroup_filter.h"

#ifdef SLOW_EVENTS
struct slow_event {
    u64 enter_ns;   /* CLOCK_MONOTONIC: the entry, or when the call left the CPU */
    u64 exit_ns;
    u64 cgroup_id;
    s64 ret;
    u64 arg0;
    u32 tgid;
    u32 tid;
    u32 nr;
    u32 entry_exact;  /* enter_ns is the call's entry */
    char comm[TASK_COMM_LEN];  /* the thread's name */
    char exe[EXE_LEN];         /* the series' executable (KEY_WORKLOAD) */
    u64 user_stack;   /* SLOW_STACKS: id in user_stacks; 0: none recorded */
    s64 user_stack_err;  /* -errno when it could not be recorded */
};

#ifdef SLOW_STACKS
#define STACKS_USER_ONLY
#define USER_STACK_ENTRIES STACK_ENTRIES
/* unwound with DWARF CFI (user_stack.h; the maps are shared with the profilers) */
#define UNWIND_USER_STACKS
#define UNWIND_STAT_FIRST STAT_UNWIND_NOT_READY
#include "stacks.h"
#endif

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
    return current_selected();
}

/* The current task's identity, from its task storage; computed on the task's first call
 * and again when its cgroup changed or it exec'd (NR_EXECVE clears identity_cgroup). */
static __always_inline void current_identity(struct identity *out)
{
    struct task_struct *task = (struct task_struct *)bpf_get_current_task_btf();
    struct task_state *s = task_state.task_storage_get(task, 0,
                                                       BPF_LOCAL_STORAGE_GET_F_CREATE);
    u64 cgroup_id = bpf_get_current_cgroup_id();
    if (s && s->identity_cgroup == cgroup_id && cgroup_id) {
        __builtin_memcpy(out, &s->identity, sizeof(*out));
        return;
    }
    struct identity id = {};
    id.cgroup_id = cgroup_id;
    id.tgid = bpf_get_current_pid_tgid() >> 32;
#if defined(KEY_WORKLOAD) || defined(KEY_CGROUP)
    id.key.cgroup_id = cgroup_id;
#endif
#ifdef KEY_TGID
    id.key.tgid = id.tgid;
#endif
    bpf_get_current_comm(&id.comm, sizeof(id.comm));
#ifdef KEY_WORKLOAD
    u64 exe_file = current_exe_file();
    id.key.exe = exe_id(exe_file);
    exe_name(exe_file, id.exe);
#endif
    if (s) {
        __builtin_memcpy(&s->identity, &id, sizeof(id));
        s->identity_cgroup = cgroup_id;
    }
    __builtin_memcpy(out, &id, sizeof(id));
}

/* The value of `key` in latency_<which>, inserted when new (with `insert`); NULL when it is
 * not there and could not be (*err: -E2BIG, a full map; -ENOMEM, no memory for it, as
 * when the allocator cannot refill its per-CPU reserve with interrupts off, in the switch
 * tracepoint; 0, not asked to insert). `which` is a constant at each call, so each copy
 * touches one map. */
static __always_inline struct hist_value *entry_of(u32 which, struct hist_key *key,
                                                  struct identity *id, int insert, int *err)
{
    struct hist_value *value = which ? latency_1.lookup(key) : latency_0.lookup(key);
    *err = 0;
    if (value || !insert)
        return value;
    u32 zero = 0;
    struct hist_value *init = zero_value.lookup(&zero);
    if (!init)
        return NULL;
    /* insert() is BPF_NOEXIST: when another CPU inserted the key first, its entry (and
     * its counts) stay and the lookup below finds it. */
    int res = which ? latency_1.insert(key, init) : latency_0.insert(key, init);
    value = which ? latency_1.lookup(key) : latency_0.lookup(key);
    if (!value) {
        *err = res ? res : -ERRNO_2BIG;
        return NULL;
    }
    if (!value->comm[0]) {
        __builtin_memcpy(value->comm, id->comm, TASK_COMM_LEN);
        __builtin_memcpy(value->exe, id->exe, EXE_LEN);
        value->cgroup_id = id->cgroup_id;
        value->tgid = id->tgid;
    }
    return value;
}

static __always_inline struct hist_value *entry(u32 gen, struct identity *id, u32 nr,
                                               int insert, int *err)
{
    struct hist_key key = id->key;
    key.nr = nr;
    return gen ? entry_of(1, &key, id, insert, err) : entry_of(0, &key, id, insert, err);
}

/* Add the pending counts to the current map and free their slots. With `insert` off (in
 * the switch tracepoint, where interrupts are off and a new key may find no memory) the
 * counts of keys not yet in the map stay pending, for the next flush from a syscall. */
static __always_inline void flush(struct cpu_state *c, u32 gen, int insert)
{
    /* a loop, not unrolled: inlined at four places, each slot's body holds two map
     * paths, and unrolled they made on_sys_exit 7,000 instructions that took LLVM 0.55 s
     * more of every cold start (a flush runs per switch or owner change, not per call) */
#pragma nounroll
    for (int i = 0; i < SLOTS; i++) {
        u32 slot_nr = c->slot_nr[i];
        if (slot_nr) {
            int err;
            struct hist_value *v = entry(gen, &c->owner_id, slot_nr - 1, insert, &err);
            if (v)
                __sync_fetch_and_add(&v->calls, c->slot_calls[i]);
            else if (err)
                count_stats(err == -ERRNO_NOMEM ? STAT_NO_MEMORY : STAT_MAP_FULL,
                            c->slot_calls[i]);
            if (v || err) {
                c->slot_nr[i] = 0;
                c->slot_calls[i] = 0;
            }
        }
    }
}

/* Make the running task the owner of this CPU's pending counts (flushing another's), and
 * flush counts taken before a generation flip. Returns the generation. */
static __always_inline u32 own(struct cpu_state *c, u64 task)
{
    u32 gen = current_generation();
    if (c->owner != task || c->gen != gen) {
        flush(c, gen, 1);
        if (c->owner != task) {
            current_identity(&c->owner_id);
            c->owner = task;
        }
        c->gen = gen;
    }
    return gen;
}

static __always_inline void count_call(struct cpu_state *c, u32 nr)
{
    u32 want = nr + 1;
#pragma unroll
    for (int i = 0; i < SLOTS; i++) {
        if (c->slot_nr[i] == want) {
            c->slot_calls[i]++;
            return;
        }
    }
#pragma unroll
    for (int i = 0; i < SLOTS; i++) {
        if (!c->slot_nr[i]) {
            c->slot_nr[i] = want;
            c->slot_calls[i] = 1;
            return;
        }
    }
    /* a 9th syscall number: make room */
    flush(c, c->gen, 1);
    c->slot_nr[0] = want;
    c->slot_calls[0] = 1;
}

#ifdef SLOW_EVENTS
/* At most SLOW_BURST + t * SLOW_RATE events in any t seconds (rate_limit.h). */
static __always_inline int take_token(u64 now)
{
    u32 zero = 0;
    u64 *tat = slow_rate.lookup(&zero);
    return tat && rate_limit_admit(tat, now, 1000000000ULL / SLOW_RATE, SLOW_BURST);
}

static __always_inline void emit_if_slow(struct bpf_raw_tracepoint_args *ctx,
                                         struct identity *id, u32 nr, u64 start_ns,
                                         u64 exit_ns, u32 entry_exact)
{
    u64 delta = exit_ns - start_ns;
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
    ev.enter_ns = start_ns;
    ev.exit_ns = exit_ns;
    ev.cgroup_id = bpf_get_current_cgroup_id();
    ev.ret = (s64)ctx->args[1];
    ev.entry_exact = entry_exact;
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
    __builtin_memcpy(ev.exe, id->exe, EXE_LEN);
#ifdef SLOW_STACKS
    ev.user_stack_err = intern_stack(ctx, USER_STACK, &ev.user_stack);
    if (ev.user_stack_err && ev.user_stack_err != -EFAULT)
        count_stat(STAT_SLOW_STACK_LOST);
#endif
#ifdef USE_PERF_BUFFER
    if (slow_events.perf_submit(ctx, &ev, sizeof(ev)) < 0)
        count_stat(STAT_BUFFER_FULL);
#else
    if (slow_events.ringbuf_output(&ev, sizeof(ev), 0) < 0)
        count_stat(STAT_BUFFER_FULL);
#endif
}
#endif

/* A timed call: into the off-CPU or the sampled histogram of the owner's key. */
static __always_inline void record(struct bpf_raw_tracepoint_args *ctx, struct cpu_state *c,
                                   u32 gen, u32 nr, u64 start_ns, u64 exit_ns, u32 offcpu,
                                   u32 entry_exact)
{
    u64 delta = exit_ns - start_ns;
#ifdef SLOW_EVENTS
    emit_if_slow(ctx, &c->owner_id, nr, start_ns, exit_ns, entry_exact);
#endif
    int err;
    struct hist_value *v = entry(gen, &c->owner_id, nr, 1, &err);
    if (!v) {
        count_stat(STAT_TIMING_LOST);
        return;
    }
    u32 slot = hist_slot(delta);
    if (offcpu) {
        __sync_fetch_and_add(&v->offcpu, 1);
        __sync_fetch_and_add(&v->offcpu_sum_ns, delta);
        __sync_fetch_and_add(&v->offcpu_buckets[slot], 1);
    } else {
        __sync_fetch_and_add(&v->sampled, 1);
        __sync_fetch_and_add(&v->sampled_sum_ns, delta);
        __sync_fetch_and_add(&v->sampled_buckets[slot], 1);
    }
    hist_extremes(&v->min_ns, &v->max_ns, delta);
}

/* Whether to time this call: the countdown of the sample, or the first call of its
 * number. The gap to the next sample is uniform on 1..2*SAMPLE_PERIOD-1 (mean
 * SAMPLE_PERIOD), so the sample cannot lock onto a periodic pattern of calls. */
static __always_inline u32 sample(struct cpu_state *c, u32 nr)
{
#if SAMPLE_PERIOD > 1
    u8 *once = timed_once.lookup(&nr);
    if (once && !*once) {
        *once = 1;
        return 1;
    }
    if (c->countdown > 1) {
        c->countdown--;
        return 0;
    }
    c->countdown = 1 + bpf_get_prandom_u32() % (2 * SAMPLE_PERIOD - 1);
#endif
    return 1;
}

/* A new task's first return, from the clone or fork its parent entered: no call of its
 * own, so no enter to find. The number is in the saved registers (pt_regs is ABI). */
static __always_inline int is_fork_return(struct bpf_raw_tracepoint_args *ctx)
{
#ifdef NR_CLONE
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    long nr = -1;
#if defined(__TARGET_ARCH_arm64) || defined(__aarch64__)
    bpf_probe_read_kernel(&nr, sizeof(nr), &regs->syscallno);
#else
    bpf_probe_read_kernel(&nr, sizeof(nr), &regs->orig_ax);
#endif
    return nr == NR_CLONE || nr == NR_CLONE3 || nr == NR_FORK || nr == NR_VFORK;
#else
    return 0;
#endif
}

/* Named on_* rather than BCC's raw_tracepoint__* so that BCC does not attach them on
 * load: user space fills the filter maps first, then attaches. */
int on_sys_enter(struct bpf_raw_tracepoint_args *ctx)
{
    /* args: struct pt_regs *regs, long id */
    if (!wanted())
        return 0;
    u32 zero = 0;
    struct cpu_state *c = cpu_state.lookup(&zero);
    if (!c)
        return 0;
    u32 nr = (u32)ctx->args[1];
    c->task = bpf_get_current_task();
    c->nr = nr;
    c->sampled = sample(c, nr);
    if (c->sampled)
        c->enter_ns = bpf_ktime_get_ns();
    return 0;
}

int on_sys_exit(struct bpf_raw_tracepoint_args *ctx)
{
    u32 zero = 0;
    struct cpu_state *c = cpu_state.lookup(&zero);
    if (!c)
        return 0;
    u64 task = bpf_get_current_task();
    u32 nr, gen;
    /* one call of record() below, not one per branch: it walks the stack of a slow call,
     * and the verifier checks each inlined copy of that walk on its own */
    u32 timed = 0, offcpu = 0, exact = 1;
    u64 start_ns = 0;
    if (c->task == task) {
        /* the common case: the call never left this CPU */
        c->task = 0;
        nr = c->nr;
        gen = own(c, task);
        if (c->sampled) {
            timed = 1;
            start_ns = c->enter_ns;
        }
    } else {
#if defined(FILTER_TGID) || defined(FILTER_COMM) || defined(FILTER_CGROUP)
        if (!wanted())
            return 0;
#endif
        struct task_struct *t = (struct task_struct *)bpf_get_current_task_btf();
        struct task_state *s = task_state.task_storage_get(t, 0, 0);
        if (!s || !(s->flags & CALL_OFFCPU)) {
            if (!is_fork_return(ctx))
                count_stat(STAT_NO_START);
            return 0;
        }
        nr = s->nr;
        exact = s->flags & CALL_ENTRY_EXACT ? 1 : 0;
        s->flags = 0;
        gen = own(c, task);
        timed = offcpu = 1;
        start_ns = s->start_ns;
    }
    if (timed)
        record(ctx, c, gen, nr, start_ns, bpf_ktime_get_ns(), offcpu, exact);
    count_call(c, nr);
#ifdef NR_EXECVE
    /* a successful exec changes the executable: recompute the identity */
    if ((nr == NR_EXECVE || nr == NR_EXECVEAT) && (s64)ctx->args[1] == 0) {
        flush(c, c->gen, 1);
        c->owner = 0;
        struct task_struct *t = (struct task_struct *)bpf_get_current_task_btf();
        struct task_state *s = task_state.task_storage_get(t, 0, 0);
        if (s)
            s->identity_cgroup = 0;
    }
#endif
    return 0;
}

/* A task leaves the CPU. Inside a syscall: the call is timed from now (or from its
 * sampled entry) to its exit, whatever CPU that happens on. Its pending counts go to the
 * map, so an idle CPU or an exited task holds none back. */
int on_sched_switch(struct bpf_raw_tracepoint_args *ctx)
{
    /* args: bool preempt, struct task_struct *prev, struct task_struct *next
     * (current is still prev here) */
    u64 prev = ctx->args[1];
    u32 zero = 0;
    struct cpu_state *c = cpu_state.lookup(&zero);
    if (!c)
        return 0;
    if (c->task == prev) {
        c->task = 0;
        struct task_struct *t = (struct task_struct *)bpf_get_current_task_btf();
        struct task_state *s = task_state.task_storage_get(t, 0,
                                                           BPF_LOCAL_STORAGE_GET_F_CREATE);
        if (s) {
            s->nr = c->nr;
            if (c->sampled) {
                s->start_ns = c->enter_ns;
                s->flags = CALL_OFFCPU | CALL_ENTRY_EXACT;
            } else {
                s->start_ns = bpf_ktime_get_ns();
                s->flags = CALL_OFFCPU;
            }
        } else {
            count_stat(STAT_NO_TASK_STORAGE);
        }
    }
    if (c->owner == prev) {
        /* what stays pending (new keys) goes with the next syscall's flush, under the
         * identity kept in owner_id */
        flush(c, current_generation(), 0);
        c->owner = 0;
    }
    return 0;
}
