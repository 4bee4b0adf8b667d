"""User space's half of probes/generations.h: a map kept in two generations, drained
exactly. The drain flips `generation`, waits out the programs still writing the old map,
then drains that one, so no count lands in an entry the drain already copied."""

from __future__ import annotations

import ctypes as ct
import time
from typing import Any

from otel_ebpf.kernel.engine import Program

# After the generation flips, programs that read the old one may still be adding to its
# map: they finish within microseconds unless preempted; this covers a preempted one on
# anything but a hopelessly overloaded machine. The collecting thread sleeps, at no cost.
GENERATION_GRACE_S = 0.05


class Generations:
    """The maps `<name>_0` and `<name>_1` of a loaded program; the programs write the one
    the `generation` array names (0 at load)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.current = 0  # which one the programs write

    def drain(self, program: Program) -> list[tuple[Any, Any]]:
        """Every entry written since the previous drain, as (key, value) structs."""
        drained, self.current = self.current, self.current ^ 1
        program.map("generation").set(ct.c_int(0), ct.c_uint32(self.current))
        time.sleep(GENERATION_GRACE_S)
        return program.map(f"{self.name}_{drained}").drain()
