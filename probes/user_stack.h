/* user_stack.h - the current task's user stack, unwound in the kernel with the DWARF
 * call-frame information of its code (.eh_frame, .debug_frame) where user space loaded it,
 * with frame pointers elsewhere (JIT code, the vDSO, files without tables).
 *
 * capture_user_stack_unwound(ctx, out) fills out->ips leaf first (a 0 after the last
 * frame) and returns the bytes filled, or -EFAULT when the task has no user context (a
 * kernel thread): stacks.h's capture contract. Why a walk stopped short is counted in
 * probe_stats from UNWIND_STAT_FIRST (enum unwind_reason; not when the stack ended where
 * stacks end: a return address of 0, the outermost frame of its CFI, a frame-pointer
 * chain's 0); the frames found until then are kept either way. user_stack() is the same
 * with the reason returned.
 *
 * Tables (user space compiles and writes them: otel_ebpf/symbolize/unwind/):
 *   unwind_rows    array (mmapable), UNWIND_ROWS rows of 8 bytes: every loaded file's
 *                  rows, each file's sorted by pc (its own virtual address) in one run.
 *   unwind_tables  array, UNWIND_TABLES: a file's run {first row, row count, generation};
 *                  a count of 0 is a table being replaced or evicted.
 *   unwind_procs   hash (not preallocated), UNWIND_PROCS processes: each one's executable
 *                  mappings, sorted by start (at most UNWIND_MAPPINGS; table ~0: none):
 *                  {start, end, bias (address - bias = file's virtual address), table,
 *                  generation}. A pc in no mapping marks the process `missed`, so user
 *                  space rereads its maps (dlopen).
 * Walk: the thread's user registers (bpf_task_pt_regs: a sample may interrupt the kernel),
 * then bpf_loop, per frame: the mapping (the previous frame's, else a binary search of <= 8
 * steps), the row (binary search, <= 24 steps), the CFA from rsp or rbp, the return
 * address at CFA - 8 and the saved rbp with bpf_probe_read_user (one read of both when
 * rbp sits just below). Without a row the frame-pointer step (rbp -> saved rbp, return
 * address above it). Bounded: MAX_STACK_DEPTH frames. The callback is linked into the
 * program by the engine (otel_ebpf/kernel/callbacks.py: BCC 0.26 cannot).
 * Cost: 3.1-6.0 us a sample of 3..36 frames (bench/run.py --suite unwind; README). At
 * load, the verifier walks the callback as a loop: ~90k instructions processed for
 * syscall_latency's on_sys_exit, ~330k for cpu_profile's on_cpu_sample with the CPython
 * walk (0.1-0.25 s; keeping the searches' bounds in unwind_state cut them from 575k and
 * 900k of the kernel's 1M limit).
 *
 * stacks.h includes it (UNWIND_USER_STACKS) after struct stack; count_stat (probe_stats.h)
 * must be defined first when UNWIND_STAT_FIRST is.
 */
#ifndef OTEL_EBPF_USER_STACK_H
#define OTEL_EBPF_USER_STACK_H
#include <asm/ptrace.h> /* struct pt_regs: the task's user registers */

#ifndef UNWIND_ROWS
#define UNWIND_ROWS (1 << 20)
#endif
#ifndef UNWIND_TABLES
#define UNWIND_TABLES 1024
#endif
#ifndef UNWIND_PROCS
#define UNWIND_PROCS 4096
#endif
#define UNWIND_MAPPINGS 128 /* a power of two */
#define UNWIND_MAPPING_STEPS 8 /* log2(UNWIND_MAPPINGS) + 1 */
#define UNWIND_ROW_STEPS 24    /* log2(the largest table) + 1: 16M rows */

enum unwind_kind {
    CFA_NONE = 0,        /* no information here: step with frame pointers */
    CFA_RSP = 1,         /* CFA = rsp + offset */
    CFA_RBP = 2,         /* CFA = rbp + offset */
    CFA_PLT = 3,         /* CFA = rsp + 8, + 8 from byte `rbp_off` of a 16-byte PLT entry */
    CFA_END = 4,         /* the outermost frame: the stack ends here */
    CFA_UNSUPPORTED = 5, /* a rule this unwinder cannot evaluate */
};
#define RBP_SAME 0     /* rbp_off: rbp still holds the caller's value */
#define RBP_UNKNOWN 127 /* rbp_off: the caller's rbp is not recoverable */

enum unwind_reason {
    UNWIND_OK = 0,
    UNWIND_NOT_READY = 1,   /* the process's tables are not loaded yet: frame pointers only */
    UNWIND_UNSUPPORTED = 2, /* a CFA rule that cannot be evaluated */
    UNWIND_READ_FAILED = 3, /* a stack read failed (not mapped, paged out) */
    UNWIND_TRUNCATED = 4,   /* MAX_STACK_DEPTH frames and more to go */
    UNWIND_BAD_FRAME = 5,   /* the next frame would not be above this one */
};

struct unwind_row {
    u32 pc;      /* the file's virtual address */
    u16 cfa_off; /* in units of 8 bytes */
    u8 kind;     /* enum unwind_kind */
    u8 rbp_off;  /* (s8) where the caller's rbp was saved, from the CFA, in units of 8 bytes */
};

struct unwind_table {
    u32 first;
    u32 count;
    u32 gen;
    u32 pad;
};

struct unwind_mapping {
    u64 start;
    u64 end;
    u64 bias;
    u32 table;
    u32 gen;
};

struct unwind_proc {
    u32 count;
    u32 missed; /* set here when a pc fell in no mapping; user space clears it */
    struct unwind_mapping mappings[UNWIND_MAPPINGS];
};

BPF_F_TABLE("array", u32, struct unwind_row, unwind_rows, UNWIND_ROWS, BPF_F_MMAPABLE);
BPF_ARRAY(unwind_tables, struct unwind_table, UNWIND_TABLES);
BPF_F_TABLE("hash", u32, struct unwind_proc, unwind_procs, UNWIND_PROCS, BPF_F_NO_PREALLOC);

/* The walk in progress on this CPU: bpf_loop's callback takes it from here (BCC would
 * rewrite a second parameter of a function that is not static, so the callback takes no
 * context from bpf_loop). */
struct unwind_state {
    u64 pc;
    u64 sp;
    u64 bp;
    u32 tgid;
    u32 depth;
    s32 reason;
    u32 missed;
    /* the mapping of the previous frame, whose table most callers share: no process or
     * table lookup for them (end 0: none yet) */
    u64 map_start;
    u64 map_end;
    u64 map_bias;
    u32 table_first;
    u32 table_count;
    /* a binary search's bounds, kept here rather than in locals: the verifier then sees
     * unknown values at each step rather than ranges narrowed per path, and the states
     * of a step's two outcomes prune each other */
    u32 lo;
    u32 hi;
    u64 ips[MAX_STACK_DEPTH];
};
BPF_PERCPU_ARRAY(unwind_state, struct unwind_state, 1);

/* Find the mapping of `pc` in the process's list and its table into s->map_* and
 * s->table_*; 0, or -1 where there is none (s->missed set when no mapping holds pc). */
static __always_inline int unwind_find_mapping(struct unwind_state *s, u64 pc)
{
    struct unwind_proc *proc = unwind_procs.lookup(&s->tgid);
    if (!proc)
        return -1;
    s->lo = 0;
    s->hi = proc->count < UNWIND_MAPPINGS ? proc->count : UNWIND_MAPPINGS;
#pragma clang loop unroll(disable)
    for (int step = 0; step < UNWIND_MAPPING_STEPS; step++) {
        u32 lo = s->lo, hi = s->hi;
        if (lo >= hi)
            break;
        u32 mid = (lo + hi) / 2;
        if (proc->mappings[mid & (UNWIND_MAPPINGS - 1)].start <= pc)
            s->lo = mid + 1;
        else
            s->hi = mid;
    }
    u32 lo = s->lo;
    struct unwind_mapping *m = &proc->mappings[(lo - 1) & (UNWIND_MAPPINGS - 1)];
    if (lo == 0 || pc >= m->end) {
        s->missed = 1;
        return -1;
    }
    s->map_start = m->start;
    s->map_end = m->end;
    s->map_bias = m->bias;
    s->table_count = 0;
    u32 table_id = m->table;
    struct unwind_table *table = unwind_tables.lookup(&table_id);
    if (table && table->gen == m->gen) {
        s->table_first = table->first;
        s->table_count = table->count;
    }
    return 0;
}

/* The row for `pc` (a return address is looked up one byte back); NULL where there is
 * none. */
static __always_inline struct unwind_row *unwind_find_row(struct unwind_state *s, u64 pc)
{
    if (pc < s->map_start || pc >= s->map_end) {
        if (unwind_find_mapping(s, pc)) {
            s->map_end = 0;
            return NULL;
        }
    }
    if (s->table_count == 0)
        return NULL;
    u64 rel = pc - s->map_bias;
    if (rel >> 32)
        return NULL;
    u32 first = s->table_first;
    s->lo = first;
    s->hi = first + s->table_count;
#pragma clang loop unroll(disable)
    for (int step = 0; step < UNWIND_ROW_STEPS; step++) {
        u32 lo = s->lo, hi = s->hi;
        if (lo >= hi)
            break;
        u32 mid = lo + (hi - lo) / 2;
        struct unwind_row *row = unwind_rows.lookup(&mid);
        if (!row)
            return NULL;
        if (row->pc <= (u32)rel)
            s->lo = mid + 1;
        else
            s->hi = mid;
    }
    u32 lo = s->lo;
    if (lo == first)
        return NULL;
    lo -= 1;
    return unwind_rows.lookup(&lo);
}

/* One frame up from s; UNWIND_OK with s->pc == 0 at the end of the stack. */
static __always_inline int unwind_step(struct unwind_state *s, int leaf)
{
    struct unwind_row *row = unwind_find_row(s, leaf ? s->pc : s->pc - 1);
    u8 kind = row ? row->kind : CFA_NONE;
    u64 cfa, ra, bp = s->bp;
    u64 pair[2]; /* one user read where the saved rbp sits just below the return address */
    if (kind == CFA_END) {
        s->pc = 0;
        return UNWIND_OK;
    }
    if (kind == CFA_UNSUPPORTED)
        return UNWIND_UNSUPPORTED;
    if (kind == CFA_NONE) {
        /* frame pointers: [rbp] = the caller's rbp, [rbp + 8] = the return address */
        if (s->bp == 0) {
            s->pc = 0;
            return UNWIND_OK;
        }
        if (s->bp < s->sp)
            return UNWIND_BAD_FRAME;
        if (bpf_probe_read_user(pair, sizeof(pair), (void *)s->bp))
            return UNWIND_READ_FAILED;
        bp = pair[0];
        ra = pair[1];
        cfa = s->bp + 16;
    } else {
        if (kind == CFA_RBP)
            cfa = s->bp + row->cfa_off * 8;
        else if (kind == CFA_PLT)
            cfa = s->sp + 8 + ((s->pc & 15) >= (u64)row->rbp_off ? 8 : 0);
        else
            cfa = s->sp + row->cfa_off * 8;
        s8 saved = kind == CFA_PLT ? RBP_SAME : (s8)row->rbp_off;
        if (saved == -2) {
            /* rbp pushed first (CFA - 16), as most functions that save it do */
            if (bpf_probe_read_user(pair, sizeof(pair), (void *)(cfa - 16)))
                return UNWIND_READ_FAILED;
            bp = pair[0];
            ra = pair[1];
        } else {
            if (bpf_probe_read_user(&ra, sizeof(ra), (void *)(cfa - 8)))
                return UNWIND_READ_FAILED;
            if (saved == RBP_UNKNOWN)
                bp = 0;
            else if (saved != RBP_SAME &&
                     bpf_probe_read_user(&bp, sizeof(bp), (void *)(cfa + (s64)saved * 8)))
                return UNWIND_READ_FAILED;
        }
    }
    if (cfa <= s->sp)
        return UNWIND_BAD_FRAME;
    s->pc = ra;
    s->sp = cfa;
    s->bp = bp;
    return UNWIND_OK;
}

/* bpf_loop's callback: records the frame at s->pc and steps to its caller; 1 stops. The
 * engine links it into the program (otel_ebpf.kernel.compiler.link_callback). */
int loop_callback_unwind(void *unused)
{
    u32 zero = 0;
    struct unwind_state *s = unwind_state.lookup(&zero);
    if (!s)
        return 1;
    u32 i = s->depth;
    if (i >= MAX_STACK_DEPTH)
        return 1;
    s->ips[i] = s->pc;
    s->depth = i + 1;
    int err = unwind_step(s, i == 0);
    if (err) {
        if (s->reason == UNWIND_OK)
            s->reason = err;
        return 1;
    }
    if (s->pc == 0)
        return 1;
    if (i == MAX_STACK_DEPTH - 1 && s->reason == UNWIND_OK)
        s->reason = UNWIND_TRUNCATED;
    return 0;
}

/* The current task's user stack into out->ips, a 0 after the last frame; the depth, or
 * -EFAULT without a user context. *reason: why it stopped short (enum unwind_reason). */
static __always_inline int user_stack(struct stack *out, u32 tgid, int *reason)
{
    struct pt_regs regs;
    struct task_struct *task = bpf_get_current_task_btf();
    *reason = UNWIND_OK;
    if (bpf_probe_read_kernel(&regs, sizeof(regs), (void *)bpf_task_pt_regs(task)))
        return -EFAULT;
    if ((regs.cs & 3) != 3 || regs.ip == 0)
        return -EFAULT; /* a kernel thread: no user context to unwind */
    u32 zero = 0;
    struct unwind_state *s = unwind_state.lookup(&zero);
    if (!s)
        return -ENOENT;
    s->pc = regs.ip;
    s->sp = regs.sp;
    s->bp = regs.bp;
    s->tgid = tgid;
    s->depth = 0;
    s->missed = 0;
    s->map_start = s->map_end = 0;
    s->reason = unwind_procs.lookup(&tgid) ? UNWIND_OK : UNWIND_NOT_READY;
    bpf_loop(MAX_STACK_DEPTH, loop_callback_unwind, NULL, 0);
    u32 depth = s->depth;
    if (depth > MAX_STACK_DEPTH)
        depth = MAX_STACK_DEPTH;
    if (depth > 0 && bpf_probe_read_kernel(out->ips, depth * sizeof(u64), s->ips))
        return -EFAULT;
    /* readers stop at the first 0 (what lies past it is an earlier sample's) */
    if (depth < MAX_STACK_DEPTH)
        out->ips[depth] = 0;
    if (s->missed) {
        struct unwind_proc *proc = unwind_procs.lookup(&tgid);
        if (proc && !proc->missed)
            proc->missed = 1;
    }
    *reason = s->reason;
    return depth;
}

/* stacks.h's capture contract: the bytes of out->ips filled, or -errno. A walk cut short
 * is counted in probe_stats at UNWIND_STAT_FIRST - 1 + reason when the includer defines
 * UNWIND_STAT_FIRST (its enum probe_stat holding the reasons' counters in their order). */
static __always_inline long capture_user_stack_unwound(void *ctx, struct stack *out)
{
#if defined(__x86_64__)
    int reason;
    int frames = user_stack(out, bpf_get_current_pid_tgid() >> 32, &reason);
#ifdef UNWIND_STAT_FIRST
    if (reason != UNWIND_OK)
        count_stat(UNWIND_STAT_FIRST - UNWIND_NOT_READY + reason);
#endif
    return frames < 0 ? frames : frames * (long)sizeof(u64);
#else
    /* the tables are x86_64's: frame pointers elsewhere */
    return bpf_get_stack(ctx, out->ips, sizeof(out->ips), BPF_F_USER_STACK);
#endif
}

#endif
