/* empty_tracepoints.bpf.c - the cost floor for bench/run.py.
 *
 * Two raw tracepoint programs that do nothing, attached where probes/syscall_latency.bpf.c
 * attaches (sys_enter and sys_exit). Whatever a getppid storm slows down with these
 * attached is the price of having any BPF program on those hooks at all: the syscall
 * slow path (SYSCALL_WORK_SYSCALL_TRACEPOINT on every task), the tracepoint call and the
 * BPF dispatch. A real probe cannot go below it; the bench reports how far above it is.
 *
 * Same names and hook type as the real probe, so the two differ only in the bodies.
 */

int on_sys_enter(struct bpf_raw_tracepoint_args *ctx)
{
    return 0;
}

int on_sys_exit(struct bpf_raw_tracepoint_args *ctx)
{
    return 0;
}
