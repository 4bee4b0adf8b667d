/* stacks.h - stacks interned by content, for every probe that records stacks.
 *
 * A stack's id is a 64-bit hash of its addresses (never 0, which means "no stack"), so two
 * stacks never compete for one slot (the kernel's stack_trace map buckets by hash and
 * refuses the second stack of a bucket; at 99 Hz that lost up to ~1 % of user stacks) and
 * an id names the same addresses for as long as it lives, which lets user space cache it
 * (otel_ebpf/probes/stacks.py InternedStacks reads and ages these maps).
 *
 * Maps:  user_stacks    hash (not preallocated), USER_STACK_ENTRIES stacks of up to
 *        kernel_stacks  MAX_STACK_DEPTH (127, perf's default) addresses, 1 KiB each, leaf
 *                       first, zero after the last frame; KERNEL_STACK_ENTRIES (none with
 *                       STACKS_USER_ONLY). Full: the stack is not recorded (-E2BIG, -ENOMEM),
 *                       never replaced by another one.
 *        stack_scratch  per-CPU, two slots (user, kernel): the stacks being taken.
 *
 * Capture: a user stack is walked by capture_user_stack() and nothing else, a kernel stack
 * by capture_kernel_stack(), so that another unwinder (DWARF CFI, interpreter frames) can
 * replace the walk alone: it fills `out` leaf first, zeroes the slot past the last frame
 * (readers stop at the first 0; bpf_get_stack zeroes them all) and returns the bytes
 * filled, or -errno.
 *
 * Cost: one walk, a multiply-xor pass over the addresses, a lockless hash lookup (and a
 * 1 KiB copy when the stack is new) per stack interned.
 *
 * Define USER_STACK_ENTRIES (and KERNEL_STACK_ENTRIES, or STACKS_USER_ONLY) first; with
 * UNWIND_USER_STACKS, user stacks are unwound by user_stack.h (DWARF CFI, whose tables
 * the program's user space must load: otel_ebpf/symbolize/unwind/), else with frame
 * pointers.
 */
#ifndef OTEL_EBPF_STACKS_H
#define OTEL_EBPF_STACKS_H
#include <uapi/asm-generic/errno-base.h>  /* ENOENT, EFAULT, EEXIST: ABI */

#define MAX_STACK_DEPTH 127

struct stack {
    u64 ips[MAX_STACK_DEPTH]; /* leaf first; zero after the last frame */
};

#ifdef UNWIND_USER_STACKS
/* user stacks unwound with the DWARF CFI its user space loads (cpu_profile) */
#include "user_stack.h"
#endif

enum stack_kind {
    USER_STACK = 0,
    KERNEL_STACK = 1,
};

BPF_F_TABLE("hash", u64, struct stack, user_stacks, USER_STACK_ENTRIES, BPF_F_NO_PREALLOC);
#ifndef STACKS_USER_ONLY
BPF_F_TABLE("hash", u64, struct stack, kernel_stacks, KERNEL_STACK_ENTRIES,
            BPF_F_NO_PREALLOC);
#endif
BPF_PERCPU_ARRAY(stack_scratch, struct stack, 2);

/* The user stack of the current task (its registers at its last entry into the kernel,
 * or those of `ctx` when it is a perf event that interrupted user code). */
static __always_inline long capture_user_stack(void *ctx, struct stack *out)
{
#ifdef UNWIND_USER_STACKS
    return capture_user_stack_unwound(ctx, out);
#else
    /* frame pointers; the kernel zeroes the buffer past the last frame */
    return bpf_get_stack(ctx, out->ips, sizeof(out->ips), BPF_F_USER_STACK);
#endif
}

static __always_inline long capture_kernel_stack(void *ctx, struct stack *out)
{
    return bpf_get_stack(ctx, out->ips, sizeof(out->ips), 0);
}

static __always_inline u64 stack_content_hash(const struct stack *stack, u32 depth)
{
    u64 hash = 0x9e3779b97f4a7c15ULL ^ depth;
#pragma clang loop unroll(disable)
    for (u32 i = 0; i < MAX_STACK_DEPTH; i++) {
        if (i >= depth)
            break;
        /* the bound the verifier sees whatever loop the compiler makes of this one */
        u32 at = i;
        asm volatile("" : "+r"(at));
        if (at >= MAX_STACK_DEPTH)
            break;
        hash = (hash ^ stack->ips[at]) * 0xff51afd7ed558ccdULL;
        hash ^= hash >> 32;
    }
    return hash | 1; /* 0 means "no stack" */
}

/* Walk the current task's stack of this kind and intern it under the hash of its
 * addresses. *id stays 0 for an empty stack; returns 0, or -errno when nothing was
 * recorded (-EFAULT: no such stack, e.g. the user stack of a kernel thread). */
static __always_inline int intern_stack(void *ctx, enum stack_kind kind, u64 *id)
{
    u32 slot = kind;
    struct stack *scratch = stack_scratch.lookup(&slot);
    if (!scratch)
        return -ENOENT;
    long bytes;
#ifdef STACKS_USER_ONLY
    if (kind != USER_STACK)
        return -EINVAL;
    bytes = capture_user_stack(ctx, scratch);
#else
    bytes = kind == USER_STACK ? capture_user_stack(ctx, scratch)
                               : capture_kernel_stack(ctx, scratch);
#endif
    if (bytes < 0)
        return bytes;
    u32 depth = bytes / sizeof(u64);
    if (depth == 0)
        return 0;
    u64 hash = stack_content_hash(scratch, depth);
    /* a known stack (the common case) costs a lockless lookup, a new one an insert */
    int err = 0;
#ifndef STACKS_USER_ONLY
    if (kind == KERNEL_STACK) {
        if (!kernel_stacks.lookup(&hash))
            err = kernel_stacks.insert(&hash, scratch);
    } else
#endif
    if (!user_stacks.lookup(&hash))
        err = user_stacks.insert(&hash, scratch);
    if (err && err != -EEXIST)
        return err; /* the stack map is full */
    *id = hash;
    return 0;
}

#endif
