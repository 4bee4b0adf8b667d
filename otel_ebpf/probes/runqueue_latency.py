"""Decoder for probes/runqueue_latency.bpf.c: how long runnable tasks waited for a CPU, as
exponential histograms per workload - what users see of noisy neighbours and CPU
starvation.

Every wait is measured in the kernel, from the moment a task became runnable (woken, or
switched out while it could still run) to the moment it got a CPU, and bucketed at OTLP
scale 2 in seconds (exp_histogram.h); the drained buckets are the exported histogram.
`process.context_switch.type` tells how the task came to wait: `voluntary` (it had
given up the CPU, or is new, and was woken) or `involuntary` (it was preempted).
"""

from __future__ import annotations

import platform
import re
from typing import Any

from pydantic import Field

from otel_ebpf.config_base import ProbeConfig
from otel_ebpf.histogram import HIST_MIN_INDEX, HIST_SCALE, trim
from otel_ebpf.kernel.engine import EngineError
from otel_ebpf.model import Collection, ExpHistogramDelta, MetricDescriptor, Record
from otel_ebpf.probes.base import Hook, Probe
from otel_ebpf.probes.generations import Generations
from otel_ebpf.probes.series import Aggregation, aggregation_flags, workload_of

# struct wait_key.type: WAIT_VOLUNTARY (0) and WAIT_INVOLUNTARY (1) of the .bpf.c, named
# as the semantic conventions' process.context_switch.type (a test holds the two equal)
WAIT_TYPES = ("voluntary", "involuntary")
MIN_KERNEL = (5, 18)  # sched_switch passes prev_state

RUNQUEUE_DURATION = MetricDescriptor(
    name="linux.scheduler.runqueue.duration",
    unit="s",
    description="Time runnable tasks waited on a CPU run queue before they ran, per "
                "workload; process.context_switch.type says whether the task had been "
                "woken (voluntary) or preempted (involuntary).",
)


class RunqueueLatencyConfig(ProbeConfig):
    # opt-in: its hooks run on every wakeup and context switch of the machine
    enabled: bool = False
    # distinct (workload, wait type) keys per interval; beyond, waits are counted as lost
    max_entries: int = Field(default=2048, ge=64, le=1 << 16)
    # tasks waiting or running with a wait to record, at once (not the machine's tasks)
    max_tasks: int = Field(default=16384, ge=1024, le=1 << 20)
    # workload: per container (else cgroup) and executable; process: per pid (grows with
    # churn); cgroup; system
    aggregation: Aggregation = "workload"


def kernel_release(release: str | None = None) -> tuple[int, int]:
    numbers = re.findall(r"\d+", (release or platform.release()).split("-")[0])
    return int(numbers[0]), int(numbers[1])


class RunqueueLatency(Probe[RunqueueLatencyConfig]):
    name = "runqueue_latency"
    config_class = RunqueueLatencyConfig
    exports = (RUNQUEUE_DURATION,)  # metrics only, the default signal
    lost_stats = ("tasks_full", "map_full")
    filters_cgroups = True
    summary = ("time runnable tasks wait for a CPU (run-queue latency), as a histogram per "
               "workload, in the kernel")
    hooks = (
        Hook("raw_tracepoint", "sched/sched_switch", "on_switch"),
        Hook("raw_tracepoint", "sched/sched_wakeup", "on_wakeup"),
        Hook("raw_tracepoint", "sched/sched_wakeup_new", "on_wakeup", required=False,
             note="a new task's first wait"),
    )

    def __init__(self, config: RunqueueLatencyConfig, select_cgroups: bool = False) -> None:
        super().__init__(config, select_cgroups=select_cgroups)
        self.waits = Generations("waits")

    def program_flags(self) -> list[str]:
        if kernel_release() < MIN_KERNEL:
            raise EngineError(
                f"{self.name}: needs Linux {'.'.join(map(str, MIN_KERNEL))} or later (its "
                f"sched_switch tracepoint passes the task's state); this is "
                f"{platform.release()}. Set probes.{self.name}.enabled: false")
        return [f"-DTASKS={self.config.max_tasks}", f"-DMAX_ENTRIES={self.config.max_entries}",
                *aggregation_flags(self.name, self.config.aggregation)]

    def collect(self) -> Collection:
        if self._program is None:
            return Collection(self.name)
        entries = self.waits.drain(self._program)
        records: list[Record] = [self.decode(key, value) for key, value in entries]
        return Collection(self.name, records, self.lost(self.take_stats()),
                          map_fill={"waits": (len(entries), self.config.max_entries)})

    def decode(self, key: Any, value: Any) -> ExpHistogramDelta:
        """One drained key: its waits as a histogram of its workload's series."""
        workload, attributes = workload_of(
            self.config.aggregation, int(key.tgid or value.tgid),
            value.comm.decode(errors="replace"), int(key.cgroup_id or value.cgroup_id),
            value.exe.decode(errors="replace"))
        attributes["process.context_switch.type"] = WAIT_TYPES[int(key.type)]
        offset, counts = trim(HIST_MIN_INDEX, bytes(value.buckets))
        return ExpHistogramDelta(
            descriptor=RUNQUEUE_DURATION, workload=workload, attributes=attributes,
            scale=HIST_SCALE, offset=offset, bucket_counts=counts, count=int(value.count),
            sum=value.sum_ns / 1e9, min=value.min_ns / 1e9, max=value.max_ns / 1e9)
