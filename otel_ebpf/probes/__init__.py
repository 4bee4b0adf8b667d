"""The probe registry. Adding a probe: its .bpf.c under probes/, its decoder module here,
its config class in otel_ebpf.config, one line below."""

from __future__ import annotations

from otel_ebpf.config import Config
from otel_ebpf.kernel.syscalls import SyscallTable
from otel_ebpf.probes.base import Probe

__all__ = ["PROBE_TYPES", "Probe", "build", "enabled_names"]
from otel_ebpf.probes.cpu_profile import CpuProfile
from otel_ebpf.probes.syscall_latency import SyscallLatency
from otel_ebpf.probes.tcp_retransmit import TcpRetransmit

PROBE_TYPES: dict[str, type[Probe]] = {
    SyscallLatency.name: SyscallLatency,
    CpuProfile.name: CpuProfile,
    TcpRetransmit.name: TcpRetransmit,
}


def enabled_names(config: Config) -> list[str]:
    return [name for name in PROBE_TYPES if getattr(config.probes, name).enabled]


def build(config: Config, syscalls: SyscallTable, select_cgroups: bool = False
          ) -> list[Probe]:
    """The enabled probes, constructed but not started. With select_cgroups the probes
    that can filter by cgroup in the kernel are built to (the workload filter)."""
    probes: list[Probe] = []
    if config.probes.syscall_latency.enabled:
        probes.append(SyscallLatency(config.probes.syscall_latency, syscalls,
                                     select_cgroups=select_cgroups))
    if config.probes.cpu_profile.enabled:
        probes.append(CpuProfile(config.probes.cpu_profile, select_cgroups=select_cgroups))
    if config.probes.tcp_retransmit.enabled:
        probes.append(TcpRetransmit(config.probes.tcp_retransmit))
    return probes
