/* churn_execs.bpf.c - ground truth for bench/churn.py: how many processes exec'd a
 * program named "true" machine-wide, and how many of them the churn driver spawned.
 *
 * The agent counts every /bin/true of the machine in one series per (cgroup, executable);
 * on a shared machine someone else may run one too. This tells ours from theirs, so a
 * difference between the agent's count and the driver's is not blamed on the agent.
 *
 * Only tracepoint arguments and a helper (no kernel structs: the headers here are another
 * kernel version's): sched_process_fork marks the children of a parent named
 * "churn_spawn" (LRU hash, deleted at exec); sched_process_exec counts the task whose
 * name is now "true" (exec sets it to the file's base name) as ours if it was marked.
 *
 * counts[0]: "true" exec'd by a child of the driver; counts[1]: any other "true".
 */
BPF_TABLE("lru_hash", u32, u8, driver_children, 16384);
BPF_ARRAY(counts, u64, 2);

static __always_inline int is_driver(const char *comm)
{
    const char want[] = "churn_spawn";
#pragma unroll
    for (int i = 0; i < sizeof(want); i++) {
        if (comm[i] != want[i])
            return 0;
    }
    return 1;
}

TRACEPOINT_PROBE(sched, sched_process_fork)
{
    char parent[16] = {};
    unsigned short loc = args->data_loc_parent_comm & 0xFFFF;
    bpf_probe_read_kernel_str(parent, sizeof(parent), (void *)args + loc);
    if (is_driver(parent)) {
        u32 child = args->child_pid;
        u8 one = 1;
        driver_children.update(&child, &one);
    }
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    char comm[16] = {};
    bpf_get_current_comm(comm, sizeof(comm));
    if (comm[0] != 't' || comm[1] != 'r' || comm[2] != 'u' || comm[3] != 'e' || comm[4])
        return 0;
    u32 pid = args->pid;
    u32 index = driver_children.lookup(&pid) ? 0 : 1;
    if (!index)
        driver_children.delete(&pid);
    u64 *count = counts.lookup(&index);
    if (count)
        __sync_fetch_and_add(count, 1);
    return 0;
}
