/* workload.h - who the current task is, as the probes key their series: its executable.
 *
 * The executable is task->mm->exe_file: its inode's address is the key (one per
 * executable, however many processes run it; an opaque id, never dereferenced by user
 * space) and its dentry's name the executable's name. Offsets come from the running
 * kernel's BTF (otel_ebpf/probes/task_layout.py: TASK_MM_OFF, MM_EXE_FILE_OFF,
 * FILE_INODE_OFF, FILE_DENTRY_OFF, DENTRY_NAME_OFF): the headers BCC compiles with may be
 * another kernel's. Kernel threads have no executable (0, empty name).
 *
 * Cost: three probe reads for the id, two more and a string read for the name. Callers
 * cache it (per task, or per socket) instead of reading it per event.
 */
#ifndef OTEL_EBPF_WORKLOAD_H
#define OTEL_EBPF_WORKLOAD_H

#define EXE_LEN 32

static __always_inline u64 workload_read_ptr(u64 addr)
{
    u64 v = 0;
    if (addr)
        bpf_probe_read_kernel(&v, sizeof(v), (const void *)addr);
    return v;
}

/* The current task's executable file (struct file *), 0 for a kernel thread. */
static __always_inline u64 current_exe_file(void)
{
    u64 task = (u64)bpf_get_current_task();
    u64 mm = workload_read_ptr(task + TASK_MM_OFF);
    return mm ? workload_read_ptr(mm + MM_EXE_FILE_OFF) : 0;
}

/* The id (inode address) of an executable file. */
static __always_inline u64 exe_id(u64 exe_file)
{
    return workload_read_ptr(exe_file ? exe_file + FILE_INODE_OFF : 0);
}

/* The name of an executable file into name[EXE_LEN] (left as it is when unreadable). */
static __always_inline void exe_name(u64 exe_file, char *name)
{
    u64 dentry = workload_read_ptr(exe_file ? exe_file + FILE_DENTRY_OFF : 0);
    u64 str = workload_read_ptr(dentry ? dentry + DENTRY_NAME_OFF : 0);
    if (str)
        bpf_probe_read_kernel_str(name, EXE_LEN, (const void *)str);
}

#endif
