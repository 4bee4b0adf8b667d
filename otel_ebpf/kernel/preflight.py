"""`otel-ebpf doctor`: can this machine run the enabled probes, and if not, what to do.

Each check returns ok / warn / FAIL with a one-line fix. A FAIL in a check that every
probe needs, or in a probe's own check, means that probe cannot load. In a container the
fix for a missing host path is the mount that brings it in (the image documents them).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from otel_ebpf.kernel import capabilities
from otel_ebpf.kernel import headers as kheaders
from otel_ebpf.kernel.cgroupfs import cgroup2_mounts
from otel_ebpf.kernel.tracefs import tracefs_root

OK, WARN, FAIL = "ok", "warn", "FAIL"
_NR_BPF = {"x86_64": 321, "aarch64": 280}
_BPF_MAP_CREATE, _BPF_MAP_TYPE_ARRAY = 0, 2


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status:<4} {self.name:<32} {self.detail}"
        return text + (f"\n     fix: {self.fix}" if self.fix and self.status != OK else "")


def _status_field(name: str, status: Path = Path("/proc/self/status")) -> str:
    for line in status.read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.split()[1]
    return "0"


def effective_caps(status: Path = Path("/proc/self/status")) -> int:
    return int(_status_field("CapEff", status), 16)


def in_container(root: Path = Path("/"), environ: dict[str, str] | None = None) -> bool:
    """podman, docker, a Kubernetes pod (or systemd-nspawn, LXC): the markers they leave."""
    env = os.environ if environ is None else environ
    return ("container" in env or "KUBERNETES_SERVICE_HOST" in env
            or (root / "run" / ".containerenv").exists() or (root / ".dockerenv").exists())


def mount_fix(path: str, on_host: str, container: bool | None = None) -> str:
    """The fix for a host path the agent does not see: in a container, the mount."""
    if in_container() if container is None else container:
        return (f"mount the host's {path} into the container read-only (podman/docker: "
                f"-v {path}:{path}:ro; Kubernetes: a hostPath volume, as "
                "deploy/kubernetes/daemonset.yaml has)")
    return f"{on_host}; in a container, mount the host's {path} read-only"


def _seccomp_refuses(call: str, cap: str) -> str:
    return (f"{cap} is held, so a seccomp filter refuses {call}(): the default profile of "
            f"older container runtimes (podman < 4.4) allows it only with CAP_SYS_ADMIN; run "
            f"with a profile that allows it to {cap} holders (deploy/image/build.sh writes "
            "one: --security-opt seccomp=<its seccomp.json>)")


def _seccomp_filtered() -> bool:
    return _status_field("Seccomp") == "2"


def check_privileges(effective: int | None = None) -> Check:
    """Every capability of the agent's list (otel_ebpf.kernel.capabilities), each missing
    one named with what it costs: FAIL without one every probe needs, else warn."""
    caps = effective_caps() if effective is None else effective
    who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}"
    lacking = capabilities.missing(caps)
    if not lacking:
        return Check("privileges", OK, f"{who} with {', '.join(capabilities.names())}")
    required = any(c.required for c in lacking)
    detail = f"{who} without " + "; ".join(f"{c.cap_name} ({c.without})" for c in lacking)
    full = " ".join(c.cap_name for c in capabilities.CAPABILITIES)
    return Check("privileges", FAIL if required else WARN, detail,
                 f"grant {', '.join(c.cap_name for c in lacking)} (the agent's set: {full}; "
                 "deploy/ grants exactly these)")


def check_bpf_syscall() -> Check:
    """Create and close a one-entry array map: the cheapest proof that bpf() works."""
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        return Check("bpf() syscall", WARN, f"not probed on {platform.machine()}")
    attr = (ctypes.c_uint32 * 32)()
    attr[0], attr[1], attr[2], attr[3] = _BPF_MAP_TYPE_ARRAY, 4, 4, 1
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(nr, _BPF_MAP_CREATE, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd >= 0:
        os.close(fd)
        return Check("bpf() syscall", OK, "a test map was created")
    err = ctypes.get_errno()
    fixes = {errno.EPERM: "grant CAP_BPF (root lacks it too where a runtime dropped it); "
                          "check kernel.unprivileged_bpf_disabled",
             errno.ENOSYS: "the kernel was built without CONFIG_BPF_SYSCALL"}
    if err == errno.EPERM and capabilities.holds(effective_caps(), "BPF") \
            and _seccomp_filtered():
        fixes[err] = _seccomp_refuses("bpf", "CAP_BPF")
    return Check("bpf() syscall", FAIL, f"BPF_MAP_CREATE failed: {os.strerror(err)}",
                 fixes.get(err, "see dmesg"))


def check_tracefs() -> Check:
    root = tracefs_root()
    if root is not None:
        return Check("tracefs", OK, f"mounted at {root}")
    return Check("tracefs", FAIL, "no tracefs with events/ found",
                 mount_fix("/sys/kernel/tracing",
                           "mount -t tracefs nodev /sys/kernel/tracing (make setup does it)"))


def check_btf(path: Path = Path("/sys/kernel/btf/vmlinux")) -> Check:
    if path.is_file():
        return Check("BTF", OK, f"{path}")
    return Check("BTF", FAIL, f"{path} missing: struct offsets and task storage need the "
                 "kernel's BTF", mount_fix("/sys/kernel/btf", "use a kernel built with "
                                           "CONFIG_DEBUG_INFO_BTF=y (every major distro's is)"))


def check_headers(source: kheaders.HeaderSource | None,
                  modules: Path = kheaders.MODULES_ROOT, release: str | None = None) -> Check:
    if source is None:
        release = release or platform.release()
        build = modules / release / "build"
        install = ("install linux-headers for this kernel or the distribution's (make setup "
                   "installs and links them)")
        if build.is_symlink() and not build.exists():
            # the host's /lib/modules came in, the tree its link points into did not
            target = os.path.normpath(build.parent / os.readlink(build))
            where = "/usr/src" if target.startswith("/usr/src/") else target
            return Check("kernel headers", FAIL, f"{build} links to {target}, which is "
                         "not here", mount_fix(where, install))
        fix = install
        if in_container():
            fix = ("mount the host's /lib/modules and /usr/src into the container read-only "
                   "(podman/docker: -v /lib/modules:/lib/modules:ro -v /usr/src:/usr/src:ro; "
                   "Kubernetes: hostPath volumes, as deploy/kubernetes/daemonset.yaml has), "
                   "after installing the headers on the host")
        return Check("kernel headers", FAIL, f"none found (BCC_KERNEL_SOURCE, {build}, "
                     f"{kheaders.KHEADERS}, {kheaders.USR_SRC})", fix)
    return Check("kernel headers", OK if source.exact else WARN, source.describe(),
                 "fine for these probes; install headers of the running kernel to silence")


def check_bcc() -> Check:
    try:
        import bcc
    except ImportError:
        return Check("BCC", FAIL, "python module bcc not importable",
                     "apt-get install python3-bpfcc; use a venv with --system-site-packages")
    version = getattr(bcc, "__version__", "unknown version")
    return Check("BCC", OK, f"{version} at {os.path.dirname(bcc.__file__)}")


def check_lockdown(path: Path = Path("/sys/kernel/security/lockdown")) -> Check:
    try:
        text = path.read_text()
    except OSError:
        return Check("kernel lockdown", OK, "not enabled (no lockdown LSM)")
    mode = text[text.find("[") + 1 : text.find("]")] if "[" in text else text.strip()
    if mode == "none":
        return Check("kernel lockdown", OK, "none")
    if mode == "integrity":
        return Check("kernel lockdown", WARN, "integrity: some BPF helpers are restricted",
                     "boot with lockdown=none if a probe fails to load")
    return Check("kernel lockdown", FAIL, f"{mode}: BPF programs that read kernel memory "
                 "are refused", "boot with lockdown=none or lockdown=integrity")


def check_perf_paranoid(path: Path = Path("/proc/sys/kernel/perf_event_paranoid")) -> Check:
    try:
        value = int(path.read_text())
    except (OSError, ValueError):
        return Check("perf_event_paranoid", WARN, "unreadable")
    if capabilities.holds(effective_caps(), "PERFMON"):  # uid 0 alone is not enough
        return Check("perf_event_paranoid", OK, f"{value} (no limit with CAP_PERFMON)")
    return Check("perf_event_paranoid", WARN if value > 1 else OK, f"{value}",
                 "grant CAP_PERFMON, or sysctl kernel.perf_event_paranoid=1")


def check_cgroup(mounts: Path = Path("/proc/self/mounts")) -> Check:
    """The host's whole cgroup v2 tree: container ids are read from it by the cgroup id the
    probes record, which works even after the process exited."""
    roots = cgroup2_mounts(mounts)
    fix = mount_fix("/sys/fs/cgroup", "mount -t cgroup2 none /sys/fs/cgroup/unified")
    if not roots:
        return Check("cgroup v2 tree", WARN, "no cgroup2 mount: workloads are identified from "
                     "/proc/<pid>/cgroup only, so a process that exits before the agent "
                     "looks loses its container", fix)
    root = roots[0]
    try:
        ino = os.stat(root).st_ino
    except OSError as exc:
        return Check("cgroup v2 tree", WARN, f"{root}: {exc.strerror}", fix)
    if ino != 1:  # the hierarchy's root cgroup has id (inode) 1
        return Check("cgroup v2 tree", WARN, f"{root} is a subtree of the host's cgroups (a "
                     "container's own view): other containers' cgroups are not in it, so "
                     "their processes are identified from /proc only", fix)
    return Check("cgroup v2 tree", OK, f"{root} (the host's whole tree)")


def check_kprobes() -> Check:
    root = tracefs_root()
    has = root is not None and (root / "kprobe_events").exists()
    return Check("kprobes", OK, "available" if has else
                 "not available (not needed: every probe uses tracepoints or perf events)")


def check_events(probe: str, events: Sequence[str], optional: Sequence[str] = ()) -> Check:
    """The probe's trace events: a missing required one fails, a missing optional one
    warns (the probe runs without it)."""
    root = tracefs_root()
    if root is None:
        return Check(f"{probe}: tracepoints", FAIL, "tracefs missing", "see tracefs above")
    missing = [e for e in events if not (root / "events" / e).is_dir()]
    if missing:
        return Check(f"{probe}: tracepoints", FAIL, f"missing {', '.join(missing)}",
                     "this kernel lacks the tracepoints; CONFIG_FTRACE_SYSCALLS for syscalls")
    absent = [e for e in optional if not (root / "events" / e).is_dir()]
    if absent:
        return Check(f"{probe}: tracepoints", WARN, f"optional {', '.join(absent)} missing",
                     "the probe runs without them (`otel-ebpf probes` says what is lost)")
    return Check(f"{probe}: tracepoints", OK, ", ".join([*events, *optional]))


_NR_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}
_PERF_TYPE_SOFTWARE, _PERF_COUNT_SW_CPU_CLOCK = 1, 0


def check_cpu_clock(probe: str) -> Check:
    """Open (and close) one software cpu-clock event on CPU 0, as the profiler will."""
    nr = _NR_PERF_EVENT_OPEN.get(platform.machine())
    if nr is None:
        return Check(f"{probe}: perf events", WARN, f"not probed on {platform.machine()}")
    attr = (ctypes.c_uint8 * 128)()
    ctypes.memmove(attr, ctypes.byref(ctypes.c_uint32(_PERF_TYPE_SOFTWARE)), 4)
    ctypes.memmove(ctypes.byref(attr, 4), ctypes.byref(ctypes.c_uint32(128)), 4)  # size
    ctypes.memmove(ctypes.byref(attr, 8), ctypes.byref(ctypes.c_uint64(
        _PERF_COUNT_SW_CPU_CLOCK)), 8)
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(nr, ctypes.byref(attr), -1, 0, -1, 0)
    if fd >= 0:
        os.close(fd)
        return Check(f"{probe}: perf events", OK, "software cpu-clock can be opened")
    err = ctypes.get_errno()
    fix = ("grant CAP_PERFMON or run as root; check kernel.perf_event_paranoid and "
           "seccomp/container policy")
    if err == errno.EPERM and capabilities.holds(effective_caps(), "PERFMON") \
            and _seccomp_filtered():
        fix = _seccomp_refuses("perf_event_open", "CAP_PERFMON")
    return Check(f"{probe}: perf events", FAIL, f"perf_event_open(cpu-clock): "
                 f"{os.strerror(err)}", fix)


def timed_load_check(probe: str, load: object) -> Check:
    """Compile and verify without attaching; `load` is a zero-argument callable."""
    start = time.monotonic()
    try:
        load()  # type: ignore[operator]
    except Exception as exc:
        return Check(f"{probe}: load", FAIL, str(exc).splitlines()[0][:300],
                     "the compiler or verifier output is printed above this report")
    return Check(f"{probe}: load", OK, f"compiled and verified in "
                 f"{time.monotonic() - start:.1f}s")
