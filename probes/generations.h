/* generations.h - a map kept in two generations, so user space can drain one exactly.
 *
 * The program writes <map>_0 or <map>_1, whichever the 1-entry array `generation` names.
 * User space flips it, waits out programs still writing the old one, then drains that
 * one (otel_ebpf/probes/generations.py): no count can land in an entry the drain has
 * already copied and deleted, as it could with a lookup-and-delete of a live map.
 *
 * Cost: one array lookup per write.
 */
#ifndef OTEL_EBPF_GENERATIONS_H
#define OTEL_EBPF_GENERATIONS_H

BPF_ARRAY(generation, u32, 1);

static __always_inline u32 current_generation(void)
{
    u32 zero = 0;
    u32 *gen = generation.lookup(&zero);
    return gen ? *gen : 0;
}

#endif
