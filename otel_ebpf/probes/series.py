"""Which series a probe keys its counts by, as configured by its `aggregation`, for every
probe that keys by workload: the -D switches its program takes, and the workload and
attributes of a key it drained.

workload (the default): the container, else cgroup, and executable - bounded whatever
the process churn; process: one series per pid; cgroup; system: one series.
"""

from __future__ import annotations

from typing import Literal

from otel_ebpf.kernel import btf as kbtf
from otel_ebpf.kernel.engine import EngineError
from otel_ebpf.model import AttributeValue, Workload
from otel_ebpf.probes.task_layout import offset_flags

Aggregation = Literal["workload", "process", "cgroup", "system"]


def aggregation_flags(probe: str, aggregation: Aggregation) -> list[str]:
    """KEY_WORKLOAD (with the offsets workload.h reads), KEY_TGID, KEY_CGROUP or none."""
    if aggregation == "process":
        return ["-DKEY_TGID"]
    if aggregation == "cgroup":
        return ["-DKEY_CGROUP"]
    if aggregation == "system":
        return []
    try:
        return ["-DKEY_WORKLOAD", *offset_flags(kbtf.vmlinux())]
    except kbtf.BtfError as exc:
        raise EngineError(
            f"{probe}: cannot find a task's executable in this kernel: {exc}. Workload "
            "series read it at offsets from /sys/kernel/btf/vmlinux "
            f"(CONFIG_DEBUG_INFO_BTF=y); where there is none, set probes.{probe}."
            "aggregation: cgroup") from exc


def workload_of(aggregation: str, tgid: int, comm: str, cgroup_id: int, exe: str
                ) -> tuple[Workload, dict[str, AttributeValue]]:
    """The series of a key, as the kernel keyed it: its workload, and its attributes."""
    if aggregation == "workload":
        attributes: dict[str, AttributeValue] = (
            {"process.executable.name": exe} if exe else {})
        return Workload(0, exe or comm, cgroup_id), attributes
    if aggregation == "process":
        return Workload(tgid, comm, cgroup_id), {}
    if aggregation == "cgroup":
        return Workload(0, comm, cgroup_id), {}
    return Workload(0, comm, 0), {}
