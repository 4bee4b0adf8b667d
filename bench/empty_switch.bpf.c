/* empty_switch.bpf.c - the cost floor for bench/offcpu.py: a raw tracepoint program on
 * sched_switch that does nothing. What a context-switch storm loses with it attached is the
 * price of any program on that hook (the tracepoint call and the BPF dispatch); the
 * off-CPU probe is measured against it. Same name and hook type as the probe's. */

int on_switch(struct bpf_raw_tracepoint_args *ctx)
{
    return 0;
}
