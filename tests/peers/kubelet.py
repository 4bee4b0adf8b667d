"""A real Kubernetes node as a test peer: kube-controller-manager and kube-scheduler (so a
DaemonSet's pods are made and bound as in any cluster) and a kubelet that runs them with
the private containerd of tests/peers/containerd.py, all joined to the etcd +
kube-apiserver of tests/peers/kube.py.

Built from the Go module proxy by tests/peers/build-kube.sh like the API server; the pause
image by tests/peers/build-pause.sh. What this machine needs (DESIGN.md, "Deploying"):

* ``failCgroupV1: false`` and ``cgroupDriver: cgroupfs``: cgroups are v1 (hybrid) and
  systemd is not PID 1;
* the kubelet refuses a loopback node IP, and no CNI plugin is installed (no traffic may
  leave the machine anyway): the node's network never becomes ready, so only
  ``hostNetwork`` pods run, which the kubelet starts regardless;
* its API (port, healthz) listens on loopback only; its files are private: ``--root-dir``,
  ``podLogsDir`` (instead of /var/log/pods) and its pods' cgroups under a ``cgroupRoot``
  of its own, created here in every cgroup hierarchy.

The kubelet authenticates as ``system:node:<name>`` (group ``system:nodes``), so the
API server's Node authorizer gives it exactly its own pods' secrets, config maps and
service-account tokens. The controller-manager runs only the DaemonSet controller and the
publisher of the ``kube-root-ca.crt`` ConfigMap (every pod's service-account volume needs
it) and the garbage collector (deleting a DaemonSet deletes its pods); both loops run as
cluster admin.

``stop()`` leaves the machine as it was: the kubelet's sysctls are restored (it sets
``vm.overcommit_memory``, ``kernel.panic``, ... at start), its mounts below the root
directory unmounted, the /var/log/containers links to its logs removed, and its cgroups
removed from every hierarchy. Stop the pods first (``KubeNode.drain``): the kubelet does
not stop containers when it exits; the containerd peer kills what is left.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from tests.peers.containerd import unmount_below
from tests.peers.process import LOOPBACK, PeerProcess, WorkDir

if TYPE_CHECKING:
    from tests.peers.containerd import Containerd
    from tests.peers.kube import KubeApiServer

BUILD_PAUSE = Path(__file__).with_name("build-pause.sh")
BINARIES = ("kubelet", "kube-controller-manager", "kube-scheduler")
# what the kubelet sets at start (pkg/kubelet/cm: setupKernelTunables)
SYSCTLS = ("vm.overcommit_memory", "vm.panic_on_oom", "kernel.panic", "kernel.panic_on_oops",
           "kernel.keys.root_maxkeys", "kernel.keys.root_maxbytes")
CONTAINER_LOG_LINKS = Path("/var/log/containers")  # fixed in the kubelet


def build_pause() -> Path:
    """The pause image archive (docker-archive), built if missing."""
    done = subprocess.run(["bash", str(BUILD_PAUSE)], capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{BUILD_PAUSE.name} failed:\n{done.stderr[-3000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def pause_image_name() -> str:
    text = BUILD_PAUSE.read_text()
    version = text.split('PAUSE_VERSION="', 1)[1].split('"', 1)[0]
    return f"localhost/kubernetes/pause:{version}"


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def cgroup_mounts() -> list[Path]:
    """Every cgroup hierarchy's mount point (v1 controllers, named ones, v2)."""
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] in ("cgroup", "cgroup2"):
            out.append(Path(fields[1]))
    return out


def remove_cgroup_tree(top: Path, attempts: int = 50) -> list[Path]:
    """rmdir `top` and every cgroup below it, deepest first, retrying each for up to
    `attempts` tenths of a second; those that would not go."""
    if not top.is_dir():
        return []
    stuck = []
    for current in sorted((w[0] for w in os.walk(top)), key=lambda d: -d.count("/")):
        for _ in range(attempts):
            try:
                os.rmdir(current)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)  # a process is still leaving it
        else:
            stuck.append(Path(current))
    return stuck


def sweep_stale_cgroups() -> None:
    """Empty cgroup roots of kubelets whose test process is gone (a session killed before
    its teardown): removed. One with a process still in it stays (rmdir refuses)."""
    for mount in cgroup_mounts():
        for top in mount.glob("otel-ebpf-test-kubelet-*"):
            pid = top.name.rsplit("-", 1)[1]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                remove_cgroup_tree(top, attempts=1)


class ControlLoops:
    """kube-controller-manager (DaemonSet controller, garbage collector, root CA publisher) and
    kube-scheduler, against `api`, on no port of their own."""

    def __init__(self, api: KubeApiServer, bindir: Path) -> None:
        self.api = api
        self.bindir = bindir
        self._procs: dict[str, PeerProcess] = {}
        self.workdir = WorkDir("kube-loops")
        self._final_logs = ""

    def start(self) -> ControlLoops:
        d = self.workdir.make()
        common = [f"--kubeconfig={self.api.kubeconfig}", "--leader-elect=false",
                  "--secure-port=0", f"--bind-address={LOOPBACK}"]
        commands = {
            "kube-controller-manager": [
                "--controllers=daemonset-controller,garbage-collector-controller,"
                "root-ca-certificate-publisher-controller",
                f"--root-ca-file={self.api.ca_path}", "--use-service-account-credentials=false"],
            "kube-scheduler": [],
        }
        for name, args in commands.items():
            peer = self._procs[name] = PeerProcess(startup_timeout=0)
            with open(d / f"{name}.log", "ab") as log:
                peer.proc = subprocess.Popen([str(self.bindir / name), *common, *args],
                                             stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, cwd=d)
        return self

    def read_logs(self) -> str:
        if not self.workdir.exists:
            return self._final_logs
        return "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')}"
                         for p in sorted(self.workdir.path.glob("*.log")))

    def check_running(self) -> None:
        for name, peer in self._procs.items():
            if peer.proc is None or peer.proc.poll() is not None:
                raise RuntimeError(f"{name} exited; output:\n{self.read_logs()[-6000:]}")

    def stop(self) -> None:
        """Stop both; their output stays readable."""
        for peer in self._procs.values():
            peer.terminate(timeout=10.0)
        self._final_logs = self.read_logs()
        self.workdir.remove()


class Kubelet:
    """A kubelet named `name` registered with `api`, running pods with `runtime`."""

    def __init__(self, api: KubeApiServer, runtime: Containerd, bindir: Path, name: str,
                 startup_timeout: float = 120.0) -> None:
        self.api = api
        self.runtime = runtime
        self.bindir = bindir
        self.name = name
        self.startup_timeout = startup_timeout
        self.cgroup_root = f"/otel-ebpf-test-kubelet-{os.getpid()}"
        self.port = 0  # its HTTPS API (x509 clients of the cluster CA), once started
        self._peer = PeerProcess(startup_timeout)
        self.workdir = WorkDir("kubelet")
        # where its pods' logs were: leftovers() still knows after stop() removed them
        self._logs_prefix = ""
        self._sysctls: dict[str, str] = {}
        self._made_log_links_dir = False
        self._final_log = ""

    @property
    def pod_logs(self) -> Path:
        """Where the kubelet writes container logs (what /var/log/pods is elsewhere)."""
        return self.workdir / "pods-logs"

    def config(self, port: int, healthz: int) -> dict[str, object]:
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "failCgroupV1": False, "cgroupDriver": "cgroupfs", "cgroupRoot": self.cgroup_root,
            "containerRuntimeEndpoint": self.runtime.endpoint,
            "address": LOOPBACK, "port": port, "readOnlyPort": 0,
            "healthzBindAddress": LOOPBACK, "healthzPort": healthz,
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                               "x509": {"clientCAFile": str(self.api.ca_path)}},
            "authorization": {"mode": "AlwaysAllow"},  # its API is on loopback only
            "podLogsDir": str(self.pod_logs), "failSwapOn": False,
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "registerNode": True, "syncFrequency": "10s", "fileCheckFrequency": "10s",
            "nodeStatusUpdateFrequency": "5s",
        }

    def start(self) -> Kubelet:
        sweep_stale_cgroups()
        d = self.workdir.make()
        self._logs_prefix = str(self.pod_logs)
        self._sysctls = {n: _sysctl_path(n).read_text().strip() for n in SYSCTLS}
        self._made_log_links_dir = not CONTAINER_LOG_LINKS.exists()
        for mount in cgroup_mounts():
            (mount / self.cgroup_root.lstrip("/")).mkdir(exist_ok=True)
        kubeconfig = self.api.client_kubeconfig("kubelet", f"system:node:{self.name}",
                                                "system:nodes")
        config_path = d / "kubelet.yaml"
        ports = self._peer.launch(
            lambda port, healthz: (
                config_path.write_text(json.dumps(self.config(port, healthz))),
                [str(self.bindir / "kubelet"), f"--config={config_path}",
                 f"--kubeconfig={kubeconfig}", f"--hostname-override={self.name}",
                 f"--root-dir={d / 'root'}", "--v=1"])[1],
            d / "kubelet.log", attempts=1, count=2, cwd=d)
        if ports is None:
            self._fail("kubelet did not start")
        assert ports is not None
        self.port = ports[0]
        deadline = time.monotonic() + self.startup_timeout
        while self.api.kubectl("get", "node", self.name, check=False).returncode != 0:
            if time.monotonic() > deadline:
                self._fail(f"node {self.name} did not register")
            self.check_running()
            time.sleep(0.5)
        with urllib.request.urlopen(f"http://{LOOPBACK}:{ports[1]}/healthz", timeout=10) as r:
            if r.read() != b"ok":
                self._fail("kubelet /healthz is not ok")
        return self

    def check_running(self) -> None:
        if self._peer.proc is None or self._peer.proc.poll() is not None:
            self._fail("kubelet exited")

    def _fail(self, why: str) -> None:
        log = self.read_log()
        self.stop()
        raise RuntimeError(f"{why}; output:\n{log[-8000:]}")

    def read_log(self) -> str:
        if not self.workdir.exists:
            return self._final_log
        try:
            return (self.workdir / "kubelet.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def container_logs(self, namespace: str, pod: str, container: str) -> str:
        """Every log file of `container` in `pod` (all restarts), as the kubelet wrote them
        (CRI format: time, stream, P/F tag, text)."""
        out = []
        for path in sorted(self.pod_logs.glob(f"{namespace}_{pod}_*/{container}/*.log")):
            out.append(path.read_text(errors="replace"))
        return "".join(out)

    def leftovers(self) -> list[str]:
        """What of this kubelet is still on the machine (after stop(): nothing)."""
        found = [str(m / self.cgroup_root.lstrip("/")) for m in cgroup_mounts()
                 if (m / self.cgroup_root.lstrip("/")).exists()]
        found += [f"{n}={_sysctl_path(n).read_text().strip()} (was {v})"
                  for n, v in self._sysctls.items() if _sysctl_path(n).read_text().strip() != v]
        if CONTAINER_LOG_LINKS.is_dir() and self._logs_prefix:
            found += [str(p) for p in CONTAINER_LOG_LINKS.iterdir()
                      if p.is_symlink() and os.readlink(p).startswith(self._logs_prefix)]
        return found

    def stop(self) -> None:
        """Stop the kubelet and undo what it did to the machine; idempotent."""
        if not self.workdir.exists:
            return
        self._peer.terminate(timeout=20.0)
        if CONTAINER_LOG_LINKS.is_dir():
            for link in CONTAINER_LOG_LINKS.iterdir():
                if link.is_symlink() and os.readlink(link).startswith(str(self.pod_logs)):
                    link.unlink()
            if self._made_log_links_dir and not any(CONTAINER_LOG_LINKS.iterdir()):
                CONTAINER_LOG_LINKS.rmdir()
        unmount_below(self.workdir.path)
        for name, value in self._sysctls.items():
            if _sysctl_path(name).read_text().strip() != value:
                _sysctl_path(name).write_text(value)
        self._final_log = self.read_log()
        self.workdir.remove()

    def remove_cgroups(self) -> list[Path]:
        """The cgroup root in every hierarchy, once no container runs (after the runtime
        stopped); the cgroups that would not go."""
        stuck: list[Path] = []
        for mount in cgroup_mounts():
            stuck += remove_cgroup_tree(mount / self.cgroup_root.lstrip("/"))
        return stuck
