"""A private containerd (Debian's package, with runc) as a test peer: the container runtime
of the Kubernetes node tier.

Everything it owns lives in one temporary directory - its root and state directories, its
gRPC socket, the CNI and ``opt`` directories - so it shares nothing with a containerd the
host may run. Settings this machine needs (see DESIGN.md, "Deploying"):

* ``restrict_oom_score_adj = true``: the kubelet asks for negative OOM score adjustments,
  which need CAP_SYS_RESOURCE; containerd then keeps them at the caller's own;
* runc with cgroupfs (no systemd as PID 1; cgroups v1 or hybrid);
* runc's state directory (``Root``) is the peer's too;
* ``sandbox_image``: the pause image of tests/peers/build-pause.sh, imported before
  any pod starts, since no registry is reachable.

Images come as users move them without a registry: ``image_archive()`` saves the image
deploy/image/build.sh builds with ``podman save`` (cached by image id) and
``Containerd.import_image()`` loads it with ``ctr images import``.

``stop()`` leaves nothing behind: every task is killed and deleted (so no
containerd-shim outlives it), containerd is stopped, whatever it mounted below its
directory is unmounted, and the directory is removed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.peers.process import PeerProcess, WorkDir

CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
RUNC = "/usr/sbin/runc"
NAMESPACE = "k8s.io"  # the containerd namespace of the CRI plugin: what the kubelet sees
IMAGE_ARCHIVES = Path(os.environ.get("KUBE_CACHE", "/var/cache/otel-ebpf/kube")) / "images"
# containerd 1.6 puts its shims' sockets in /run/containerd/s/<hash> whatever its state
# directory (made if missing, removed at stop() if this peer made it)
SHIM_RUN = Path("/run/containerd")


def missing() -> str | None:
    """What is not installed, or None."""
    for path in (CONTAINERD, CTR, RUNC):
        if not os.access(path, os.X_OK):
            return f"{path} is missing; run `deploy/host-setup.sh --test` (containerd, runc)"
    return None


def mounts_below(directory: Path) -> list[str]:
    """Mount points at or below `directory`, deepest (last mounted) first."""
    prefix = str(directory)
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return points[::-1]


def unmount_below(directory: Path) -> list[str]:
    """Unmount (lazily, as a last resort) everything below `directory`; what it found."""
    found = mounts_below(directory)
    for point in found:
        if subprocess.run(["umount", point], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", point], capture_output=True)
    return found


def image_archive(build: Path, tag: str) -> tuple[str, Path]:
    """The image `build` (deploy/image/build.sh) makes as `tag`, saved by podman as a
    docker-archive for `ctr images import`: its name in the archive and the archive, kept in
    IMAGE_ARCHIVES by image id (~0.6 GB: older ones are removed)."""
    done = subprocess.run(["bash", str(build), tag], capture_output=True, text=True,
                          timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{build} failed:\n{done.stderr[-4000:]}")
    out = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    env = {k: v for k, v in os.environ.items() if k != "CONTAINERS_CONF"}
    if out["containers_conf"]:
        env["CONTAINERS_CONF"] = out["containers_conf"]
    name = f"localhost/{tag}"
    IMAGE_ARCHIVES.mkdir(parents=True, exist_ok=True)
    archive = IMAGE_ARCHIVES / f"{out['id']}.tar"
    if not archive.exists():
        for old in IMAGE_ARCHIVES.glob("*.tar"):
            old.unlink()
        partial = archive.with_suffix(".partial")
        partial.unlink(missing_ok=True)
        # by name: the archive then names the image (saved by id, it would be nameless)
        saved = subprocess.run(["podman", "save", "--format", "docker-archive", "-o",
                                str(partial), name], capture_output=True, text=True,
                               env=env, timeout=600)
        if saved.returncode != 0:
            raise RuntimeError(f"podman save {name} failed:\n{saved.stderr}")
        partial.rename(archive)
    return name, archive


class Containerd:
    """containerd on a private socket; `ctr()` talks to it in the CRI namespace."""

    def __init__(self, sandbox_image: str, startup_timeout: float = 60.0) -> None:
        self.sandbox_image = sandbox_image
        self.startup_timeout = startup_timeout
        self._peer = PeerProcess(startup_timeout)
        self.workdir = WorkDir("containerd")
        self._final_log = ""
        self._made_shim_run = False

    @property
    def socket(self) -> Path:
        return self.workdir / "containerd.sock"

    @property
    def endpoint(self) -> str:
        """The CRI endpoint, as the kubelet's containerRuntimeEndpoint takes it."""
        return f"unix://{self.socket}"

    def config(self) -> str:
        d = self.workdir.path
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        runc = f'{cri}.containerd.runtimes.runc'
        return f"""version = 2
root = "{d / 'root'}"
state = "{d / 'state'}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
                    "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d / 'opt'}"
[{cri}]
  sandbox_image = "{self.sandbox_image}"
  restrict_oom_score_adj = true
  [{cri}.cni]
    bin_dir = "{d / 'cni' / 'bin'}"
    conf_dir = "{d / 'cni' / 'net.d'}"
  [{cri}.containerd]
    default_runtime_name = "runc"
    [{runc}]
      runtime_type = "io.containerd.runc.v2"
      [{runc}.options]
        BinaryName = "{RUNC}"
        Root = "{d / 'runc'}"
        SystemdCgroup = false
"""

    def start(self) -> Containerd:
        if (why := missing()) is not None:
            raise RuntimeError(why)
        self._made_shim_run = not SHIM_RUN.exists()
        d = self.workdir.make()
        (d / "containerd.toml").write_text(self.config())
        with open(d / "containerd.log", "ab") as log:
            self._peer.proc = subprocess.Popen(
                [CONTAINERD, "--config", str(d / "containerd.toml")], stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=d)
        deadline = time.monotonic() + self.startup_timeout
        while self.ctr("version", check=False).returncode != 0:
            if self._peer.proc.poll() is not None or time.monotonic() > deadline:
                log_text = self.read_log()
                self.stop()
                raise RuntimeError(f"containerd did not start; output:\n{log_text[-4000:]}")
            time.sleep(0.2)
        return self

    def __enter__(self) -> Containerd:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def read_log(self) -> str:
        if not self.workdir.exists:
            return self._final_log
        try:
            return (self.workdir / "containerd.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def ctr(self, *args: str, check: bool = True, timeout: float = 300.0
            ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([CTR, "--address", str(self.socket), "--namespace", NAMESPACE,
                               *args], capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)} failed ({done.returncode}):\n"
                               f"{done.stdout}{done.stderr}")
        return done

    def import_image(self, archive: Path) -> None:
        """An image archive (`podman save`, docker-archive) into the CRI's image store."""
        self.ctr("images", "import", "--no-unpack=false", str(archive))

    def images(self) -> list[str]:
        return self.ctr("images", "list", "--quiet").stdout.split()

    def _shims(self) -> list[int]:
        """containerd-shim processes serving this containerd (their -address is ours)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if (argv and argv[0].endswith(b"containerd-shim-runc-v2")
                    and str(self.socket).encode() in argv):
                pids.append(int(entry.name))
        return pids

    def stop(self) -> None:
        """Kill and delete every task and container, stop containerd and any shim it left,
        unmount and remove the directory; idempotent."""
        if not self.workdir.exists:
            return
        if self._peer.proc is not None and self._peer.proc.poll() is None:
            listed = self.ctr("tasks", "list", "--quiet", check=False).stdout.split()
            for task in listed:
                self.ctr("tasks", "kill", "--signal", "SIGKILL", task, check=False)
            for task in listed:
                for _ in range(50):
                    if self.ctr("tasks", "delete", task, check=False).returncode == 0:
                        break
                    time.sleep(0.1)
            for container in self.ctr("containers", "list", "--quiet",
                                      check=False).stdout.split():
                self.ctr("containers", "delete", container, check=False)
        self._peer.terminate(timeout=20.0)
        for pid in self._shims():
            os.kill(pid, signal.SIGKILL)
        unmount_below(self.workdir.path)
        if self._made_shim_run:
            for leaf in (SHIM_RUN / "s", SHIM_RUN):
                try:
                    leaf.rmdir()
                except OSError:
                    break  # not empty: another containerd came meanwhile
        self._final_log = self.read_log()
        # overlay work directories can hold entries only root may unlink: rm -rf does
        shutil.rmtree(self.workdir.path, ignore_errors=True)
        self.workdir.remove()
