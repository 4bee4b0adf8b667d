"""The Linux capabilities the agent runs with instead of root, and what each one is for.

The one list: `doctor` checks the running process against it, and every deploy artefact
holds a copy that tests/deploy compares with it (deploy/kubernetes/daemonset.yaml, the
Helm chart's values.yaml, deploy/systemd/otel-ebpf.service, the Dockerfile's header).
tests/e2e/test_least_privilege.py runs the agent with exactly these and shows what each
optional one adds. Not needed: SYS_ADMIN (the compile cache reads BTF through the compiler
process's fd, never by id), SYS_RESOURCE (kernels >= 5.11 charge BPF memory to the cgroup:
no RLIMIT_MEMLOCK raise), NET_ADMIN, SYS_MODULE, DAC_OVERRIDE (the agent writes only its
own cache).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Capability:
    name: str  # as Kubernetes spells it; CAP_<name> for capsh, systemd, capabilities(7)
    bit: int
    purpose: str  # what the agent does with it
    without: str  # what is lost without it
    required: bool  # without it no probe loads
    covered_by: tuple[str, ...] = ()  # broader capabilities the kernel accepts instead

    @property
    def cap_name(self) -> str:
        return f"CAP_{self.name}"


CAPABILITIES = (
    Capability("BPF", 39, "bpf(2): maps, BTF, program loads", "no probe loads", True,
               ("SYS_ADMIN",)),
    Capability("PERFMON", 38, "tracing programs, perf_event_open: tracepoints, cpu-clock "
               "sampling on every CPU", "no probe attaches", True, ("SYS_ADMIN",)),
    Capability("SYS_PTRACE", 19, "other processes' /proc/<pid>/maps and /proc/<pid>/root "
               "(their ELF files, in containers too) for symbolization, /proc/<pid>/mem "
               "(CPython code objects: lines)",
               "user frames of other users' processes, and of processes holding "
               "capabilities the agent lacks, stay addresses; Python frames have no line",
               False),
    Capability("SYSLOG", 34, "kernel symbol addresses in /proc/kallsyms",
               "kernel frames stay addresses, unless kernel.kptr_restrict=0 and "
               "kernel.perf_event_paranoid<=1", False),
    Capability("DAC_READ_SEARCH", 2, "ELF files under directories only their owner may "
               "read (0700 homes), tracefs (0700 root) when not uid 0",
               "frames of programs under other users' private directories stay addresses",
               False, ("DAC_OVERRIDE",)),
    Capability("CHECKPOINT_RESTORE", 40, "/proc/<pid>/map_files: a mapped file deleted or "
               "replaced since (upgraded binaries and libraries)",
               "frames in deleted or replaced files stay addresses", False, ("SYS_ADMIN",)),
)

BITS = {"SYS_ADMIN": 21, "DAC_OVERRIDE": 1, **{c.name: c.bit for c in CAPABILITIES}}


def names() -> list[str]:
    """["BPF", "PERFMON", ...]: the list as deploy artefacts hold it."""
    return [c.name for c in CAPABILITIES]


def holds(effective: int, name: str) -> bool:
    """Whether an effective set (a CapEff mask) has capability `name` (of the list) or a
    broader one the kernel accepts instead (SYS_ADMIN for BPF)."""
    cap = next(c for c in CAPABILITIES if c.name == name)
    return any(effective >> BITS[n] & 1 for n in (name, *cap.covered_by))


def missing(effective: int) -> list[Capability]:
    """The capabilities of the list that an effective set lacks."""
    return [c for c in CAPABILITIES if not holds(effective, c.name)]
