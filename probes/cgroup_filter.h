/* cgroup_filter.h - the workload filter, in the kernel.
 *
 * With FILTER_CGROUP, only tasks in the cgroups user space put in cgroup_filter (a hash
 * set of cgroup v2 ids: the selected workloads' cgroups and everything below them, or
 * the cgroups a probe's own filter names) are recorded. Without it, every task is.
 * otel_ebpf/probes/base.py fills the set and keeps it current. Like every shared header
 * that calls a map, it is pasted into the program (otel_ebpf.kernel.engine.inline_headers).
 *
 * Cost with FILTER_CGROUP: one hash lookup per filtered event.
 */
#ifndef OTEL_EBPF_CGROUP_FILTER_H
#define OTEL_EBPF_CGROUP_FILTER_H

#ifdef FILTER_CGROUP
#define CGROUP_FILTER_ENTRIES 16384
BPF_HASH(cgroup_filter, u64, u8, CGROUP_FILTER_ENTRIES);
#endif

/* Whether the current task is recorded. Without FILTER_CGROUP it reads nothing. */
static __always_inline int current_selected(void)
{
#ifdef FILTER_CGROUP
    u64 cgroup_id = bpf_get_current_cgroup_id();
    return cgroup_filter.lookup(&cgroup_id) != 0;
#else
    return 1;
#endif
}

#endif
