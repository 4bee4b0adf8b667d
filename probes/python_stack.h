/* python_stack.h - the CPython frames of the current thread, walked in the kernel.
 *
 * User space (otel_ebpf/symbolize/python/) recognises a Python process, reads its
 * version and the address of _PyRuntime, and writes {layout id, runtime address} into
 * py_procs; the layout (member offsets of the runtime, interpreter, thread state, frame
 * and code object) of each CPython version in use is one entry of py_layouts, so one
 * compiled program serves 3.8 to 3.13.
 *
 * Per sample of a Python process: the thread's PyThreadState (cached per thread in
 * py_threads, else found on the interpreter's thread list, at most PY_MAX_THREADS long,
 * by native_thread_id == tid where the version has it, else thread_id == pthread_self()
 * == the task's fsbase on x86-64), then its frame chain, leaf first: the code object,
 * the instruction offset and whether the frame is the first one an eval-loop C call ran
 * (3.8-3.10: every frame; 3.11: is_entry; 3.12+: the frame above an owner == C stack
 * shim, which is not recorded). The stack is interned by content like the native ones
 * (py_stacks); each code object not seen before in this process has its name, file and
 * first line copied into py_codes, so a process that exited before the collection is
 * still named. Lines come from the line tables read by user space while it lives.
 *
 * A code object is recorded as a word: its address in the low PY_ADDRESS_BITS (user
 * addresses fit) and a 16-bit stamp of its first line and name pointer above. A freed
 * code object's address is soon another's (pymalloc hands the same block out again), so
 * by address alone both stacks and py_codes would name the new one after the old.
 *
 * What it gives up on keeps what it has and is counted: STAT_PY_TRUNCATED (deeper than
 * PY_MAX_FRAMES), STAT_PY_READ_FAILED (a pointer that could not be read: a thread state
 * or frame being torn down), STAT_PY_THREAD_LOST (no thread state within PY_MAX_THREADS),
 * STAT_PY_STACK_LOST (py_stacks full).
 *
 * Cost (Python processes only; others pay one hash lookup): a cached thread state is
 * 1 read to check it; per frame 5-6 user-memory reads; one multiply-xor per frame; a
 * lookup of py_codes per frame (about 10 reads and a copy for a code object seen first).
 *
 * The program defines those STAT_ values, PY_STACK_ENTRIES, and TASK_FSBASE_OFF (the
 * offset of task_struct.thread.fsbase from BTF, or -1).
 */
#ifndef OTEL_EBPF_PYTHON_STACK_H
#define OTEL_EBPF_PYTHON_STACK_H

#define PY_MAX_FRAMES 64
#define PY_ADDRESS_BITS 48
#define PY_ADDRESS_MASK ((1ULL << PY_ADDRESS_BITS) - 1)
#define PY_MAX_THREADS 32
#define PY_NAME_LEN 64
#define PY_FILE_LEN 128
#define PY_NONE 0xffffffffU     /* a member this version does not have */
#define PY_OWNED_BY_CSTACK 3    /* _PyInterpreterFrame.owner of an entry shim (3.12+) */

/* how the instruction is found: f_lasti of a PyFrameObject, or a pointer into the code
 * object's co_code_adaptive */
#define PY_INSTR_LASTI 0
#define PY_INSTR_POINTER 1

struct py_layout {
    u32 runtime_interpreters_head;
    u32 interp_tstate_head;
    u32 tstate_next;
    u32 tstate_thread_id;
    u32 tstate_native_thread_id; /* PY_NONE: match thread_id with fsbase */
    u32 tstate_frame;            /* the current frame directly, or PY_NONE */
    u32 tstate_cframe;           /* else through tstate->cframe->current_frame */
    u32 cframe_current_frame;
    u32 frame_previous;
    u32 frame_code;
    u32 frame_instr;
    u32 frame_is_entry;          /* 3.11 only */
    u32 frame_owner;             /* 3.11+ */
    u32 code_adaptive;
    u32 code_name;               /* co_qualname where there is one */
    u32 code_filename;
    u32 code_firstlineno;
    u32 unicode_state;
    u32 unicode_ascii_size;
    u32 instr_kind;              /* PY_INSTR_* */
};

struct py_proc {
    u64 runtime;                 /* address of _PyRuntime in the process */
    u32 layout;                  /* index into py_layouts */
    u32 pad;
};

struct py_stack {
    u64 code[PY_MAX_FRAMES];     /* leaf first; stamped words (py_code_word) */
    s32 instr[PY_MAX_FRAMES];    /* f_lasti, or bytes from co_code_adaptive */
    u64 entries;                 /* bit i: frame i is the first of an eval-loop call */
    u32 depth;
    u32 truncated;
};

struct py_code_key {
    u32 tgid;
    u32 pad;
    u64 code;                    /* the stamped word */
};

struct py_code_info {
    s32 firstlineno;
    u32 flags;                   /* bit 0: name read, bit 1: file read */
    char name[PY_NAME_LEN];
    char file[PY_FILE_LEN];
};

BPF_TABLE("lru_hash", u32, struct py_proc, py_procs, 4096);
BPF_ARRAY(py_layouts, struct py_layout, 16);
BPF_TABLE("lru_hash", u32, u64, py_threads, 8192);   /* tid -> its PyThreadState */
BPF_F_TABLE("hash", u64, struct py_stack, py_stacks, PY_STACK_ENTRIES, BPF_F_NO_PREALLOC);
BPF_TABLE("lru_hash", struct py_code_key, struct py_code_info, py_codes, 8192);
BPF_PERCPU_ARRAY(py_scratch, struct py_stack, 1);
BPF_PERCPU_ARRAY(py_code_scratch, struct py_code_info, 1);

static __always_inline u64 py_read_ptr(u64 addr, int *failed)
{
    u64 value = 0;
    if (bpf_probe_read_user(&value, sizeof(value), (void *)addr) < 0)
        *failed = 1;
    return value;
}

/* The PyThreadState of the current thread, 0 when it has none. */
static __always_inline u64 py_thread_state(struct py_proc *proc, struct py_layout *l,
                                           u32 tid, int *failed)
{
    u64 want = tid;
    u32 id_off = l->tstate_native_thread_id;
    if (id_off == PY_NONE) {
#if TASK_FSBASE_OFF >= 0
        id_off = l->tstate_thread_id;
        void *task = (void *)bpf_get_current_task();
        if (bpf_probe_read_kernel(&want, sizeof(want), task + TASK_FSBASE_OFF) < 0)
            return 0;
#else
        return 0;
#endif
    }
    u64 *cached = py_threads.lookup(&tid);
    if (cached) {
        u64 id = 0;
        if (bpf_probe_read_user(&id, sizeof(id), (void *)(*cached + id_off)) == 0 &&
            id == want)
            return *cached;
    }
    u64 interp = py_read_ptr(proc->runtime + l->runtime_interpreters_head, failed);
    if (!interp)
        return 0;
    u64 ts = py_read_ptr(interp + l->interp_tstate_head, failed);
#pragma clang loop unroll(disable)
    for (int i = 0; i < PY_MAX_THREADS; i++) {
        if (!ts || *failed)
            return 0;
        u64 id = py_read_ptr(ts + id_off, failed);
        if (id == want) {
            py_threads.update(&tid, &ts);
            return ts;
        }
        ts = py_read_ptr(ts + l->tstate_next, failed);
    }
    if (ts)
        count_stat(STAT_PY_THREAD_LOST);
    return 0;
}

/* The code object at `code` as a stamped word (a stamp is never 0: a bare address is
 * user space's own walk); what cannot be read counts as zero. Mirrored by code_word() in
 * otel_ebpf/symbolize/python/code.py. */
static __always_inline u64 py_code_word(u64 code, struct py_layout *l)
{
    s32 first = 0;
    u64 name = 0;
    bpf_probe_read_user(&first, sizeof(first), (void *)(code + l->code_firstlineno));
    bpf_probe_read_user(&name, sizeof(name), (void *)(code + l->code_name));
    u64 stamp = ((u32)first ^ (name >> 4) ^ (name >> 20) ^ (name >> 36)) & 0xffff;
    return code | (stamp ? stamp : 1) << PY_ADDRESS_BITS;
}

/* Copy the name, file and first line of a code object not seen before in this process. */
static __always_inline void py_remember_code(u32 tgid, u64 word, struct py_layout *l)
{
    struct py_code_key key = {.tgid = tgid, .code = word};
    if (py_codes.lookup(&key))
        return;
    u64 code = word & PY_ADDRESS_MASK;
    u32 zero = 0;
    struct py_code_info *info = py_code_scratch.lookup(&zero);
    if (!info)
        return;
    info->flags = 0;
    info->name[0] = info->file[0] = 0;
    info->firstlineno = 0;
    bpf_probe_read_user(&info->firstlineno, sizeof(info->firstlineno),
                        (void *)(code + l->code_firstlineno));
    u64 name = 0, file = 0;
    u32 state = 0;
    bpf_probe_read_user(&name, sizeof(name), (void *)(code + l->code_name));
    bpf_probe_read_user(&file, sizeof(file), (void *)(code + l->code_filename));
    /* compact ASCII strings only (their text follows the header, NUL-terminated);
     * user space reads any other string from the live process */
    if (name && bpf_probe_read_user(&state, sizeof(state),
                                    (void *)(name + l->unicode_state)) == 0 &&
        (state & 0x60) == 0x60 &&
        bpf_probe_read_user_str(info->name, sizeof(info->name),
                                (void *)(name + l->unicode_ascii_size)) > 0)
        info->flags |= 1;
    if (file && bpf_probe_read_user(&state, sizeof(state),
                                    (void *)(file + l->unicode_state)) == 0 &&
        (state & 0x60) == 0x60 &&
        bpf_probe_read_user_str(info->file, sizeof(info->file),
                                (void *)(file + l->unicode_ascii_size)) > 0)
        info->flags |= 2;
    py_codes.update(&key, info);
}

/* Walk the current thread's Python frames into py_stacks; *id stays 0 when the task is
 * not running Python code (or its process is not known as Python). */
static __always_inline void python_stack(u32 tgid, u32 tid, u64 *id)
{
    struct py_proc *proc = py_procs.lookup(&tgid);
    if (!proc)
        return;
    u32 layout_id = proc->layout;
    struct py_layout *l = py_layouts.lookup(&layout_id);
    u32 zero = 0;
    struct py_stack *st = py_scratch.lookup(&zero);
    if (!l || !st)
        return;
    int failed = 0;
    u64 ts = py_thread_state(proc, l, tid, &failed);
    if (!ts) {
        if (failed)
            count_stat(STAT_PY_READ_FAILED);
        return;
    }
    u64 frame;
    if (l->tstate_frame != PY_NONE) {
        frame = py_read_ptr(ts + l->tstate_frame, &failed);
    } else {
        u64 cframe = py_read_ptr(ts + l->tstate_cframe, &failed);
        frame = cframe ? py_read_ptr(cframe + l->cframe_current_frame, &failed) : 0;
    }
    st->entries = 0;
    st->truncated = 0;
    st->depth = 0;
    /* the process is part of the id: forked workers share code addresses, and a new
     * stack is when its code objects are remembered for this process */
    u64 hash = 0x9e3779b97f4a7c15ULL ^ tgid;
    /* The depth is kept in the map value, not in a local: the verifier then sees an
     * unknown bounded index instead of one exact count per path, and its states of
     * different iterations prune each other (a local count made it give up). */
#pragma clang loop unroll(disable)
    for (int i = 0; i < PY_MAX_FRAMES * 2; i++) {  /* shims take a turn, not a slot */
        if (!frame || failed)
            break;
        u32 slot = st->depth;
        if (slot >= PY_MAX_FRAMES)
            break;
        u64 code = py_read_ptr(frame + l->frame_code, &failed);
        u64 previous = py_read_ptr(frame + l->frame_previous, &failed);
        s32 instr = 0;
        u8 entry = 1;
        if (l->instr_kind == PY_INSTR_POINTER) {
            u8 owner = 0;
            bpf_probe_read_user(&owner, sizeof(owner), (void *)(frame + l->frame_owner));
            if (owner == PY_OWNED_BY_CSTACK) {
                /* the frame above it is the first its eval-loop call ran */
                st->entries |= (u64)(slot > 0) << ((slot - 1) & (PY_MAX_FRAMES - 1));
                frame = previous;
                continue;
            }
            u64 ptr = py_read_ptr(frame + l->frame_instr, &failed);
            instr = (s32)(ptr - code - l->code_adaptive);
            entry = 0;
            if (l->frame_is_entry != PY_NONE)
                bpf_probe_read_user(&entry, sizeof(entry),
                                    (void *)(frame + l->frame_is_entry));
        } else {
            bpf_probe_read_user(&instr, sizeof(instr), (void *)(frame + l->frame_instr));
        }
        if (code >> PY_ADDRESS_BITS)
            failed = 1;          /* no user address: not a code object */
        if (failed || !code)
            break;
        code = py_code_word(code, l);
        slot &= PY_MAX_FRAMES - 1;
        st->code[slot] = code;
        st->instr[slot] = instr;
        st->entries |= (u64)(entry != 0) << slot;
        hash = (hash ^ code) * 0xff51afd7ed558ccdULL;
        hash = (hash ^ (u32)instr) * 0xff51afd7ed558ccdULL;
        hash ^= hash >> 32;
        st->depth = slot + 1;
        frame = previous;
    }
    u32 n = st->depth;
    if (failed)
        count_stat(STAT_PY_READ_FAILED);
    else if (frame && n >= PY_MAX_FRAMES) {
        st->truncated = 1;
        count_stat(STAT_PY_TRUNCATED);
    }
    if (n == 0)
        return;
    hash = (hash ^ st->entries ^ n) * 0xff51afd7ed558ccdULL;
    hash |= 1;
    if (!py_stacks.lookup(&hash)) {
        int err = py_stacks.insert(&hash, st);
        if (err && err != -EEXIST) {
            count_stat(STAT_PY_STACK_LOST);
            return;
        }
        /* a new stack: name the code objects it holds that are new to this process */
#pragma clang loop unroll(disable)
        for (u32 i = 0; i < PY_MAX_FRAMES; i++) {
            /* the depth read from the map at each step, as above: compared with a local
             * copy, its range narrowed per iteration and the verifier's work doubled */
            if (i >= st->depth)
                break;
            py_remember_code(tgid, st->code[i], l);
        }
    }
    *id = hash;
}

#endif
