"""The container image as users run it: built for real by deploy/image/build.sh (podman,
a debootstrapped debian:12-slim, offline), then run as the DaemonSet runs it - uid 0 with
exactly the DaemonSet's capabilities (--cap-drop=all --cap-add=...), not privileged, in the
host's PID namespace and network, with the DaemonSet's read-only host mounts.

In it, `otel-ebpf doctor` passes, and names the mount to add when one is missing;
`otel-ebpf run --duration 20s` exports through rotel on the host's loopback, and a
workload in a second container arrives with podman's id for that container as its
`container.id` and its syscalls counted exactly; the HEALTHCHECK says healthy while the
agent runs and unhealthy where no agent runs.

Cold, the build costs a debootstrap and a full image build (minutes, once per machine, all
cached outside the repository); warm, a few seconds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from otel_ebpf import config as agent_config
from otel_ebpf import probes as registry
from otel_ebpf.kernel.capabilities import BITS
from tests.e2e.test_agent import N_GETPPID
from tests.peers.otlp_sink import OtlpSink, attrs_to_dict
from tests.peers.rotel import RotelCollector

pytestmark = [pytest.mark.e2e, pytest.mark.kernel]

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "deploy" / "image" / "build.sh"
DAEMONSET = ROOT / "deploy" / "kubernetes" / "daemonset.yaml"
TAG = "otel-ebpf:0.1.0"


def _daemonset_container() -> tuple[dict[str, Any], dict[str, Any]]:
    pod = yaml.safe_load(DAEMONSET.read_text())["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def daemonset_capabilities() -> list[str]:
    return list(_daemonset_container()[1]["securityContext"]["capabilities"]["add"])


def daemonset_host_mounts() -> list[str]:
    """The host paths the DaemonSet mounts read-only (the cache is mounted apart)."""
    pod, container = _daemonset_container()
    host = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    return [m["mountPath"] for m in container["volumeMounts"]
            if m.get("readOnly") and m["name"] in host and host[m["name"]] == m["mountPath"]]


@dataclass(frozen=True)
class Image:
    tag: str
    id: str
    env: dict[str, str]  # CONTAINERS_CONF when the build wrote one
    seccomp: str  # the profile to run with, "" when the runtime's default allows BPF


@pytest.fixture(scope="module")
def image() -> Image:
    began = time.monotonic()
    done = subprocess.run(["bash", str(BUILD), TAG], capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, f"{BUILD} failed:\n{done.stderr[-4000:]}"
    out = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    env = dict(os.environ)
    env.pop("CONTAINERS_CONF", None)
    if out["containers_conf"]:
        env["CONTAINERS_CONF"] = out["containers_conf"]
    image = Image(out["image"], out["id"], env, out["seccomp"])
    size = podman(image, "image", "inspect", "--format", "{{.Size}}", image.tag).stdout
    print(f"image {image.tag} {image.id[:12]}: {int(size) / 1e6:.0f} MB, build.sh took "
          f"{time.monotonic() - began:.1f}s")
    return image


def podman(image: Image, *args: str, check: bool = True, timeout: float = 300
           ) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, env=image.env,
                          timeout=timeout)
    if check:
        assert done.returncode == 0, f"podman {' '.join(args)}:\n{done.stdout}{done.stderr}"
    return done


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The agent's /var/cache/otel-ebpf (the DaemonSet's hostPath), this module's own."""
    return tmp_path_factory.mktemp("image-cache")


_names = iter(range(1_000_000))


def container_name(role: str) -> str:
    return f"otel-ebpf-test-{role}-{os.getpid()}-{next(_names)}"


def agent_argv(image: Image, cache: Path, name: str, args: Sequence[str], *,
               omit: Sequence[str] = (), seccomp: bool = True,
               extra: Sequence[str] = ()) -> list[str]:
    """`podman run` of the image as the DaemonSet runs it, minus the `omit`ted mounts."""
    argv = ["podman", "run", "--rm", "--name", name, "--pid=host", "--network=host",
            "--user", "0", "--cap-drop=all", f"--cap-add={','.join(daemonset_capabilities())}"]
    if seccomp and image.seccomp:
        argv += ["--security-opt", f"seccomp={image.seccomp}"]
    for path in daemonset_host_mounts():
        if path not in omit:
            argv += ["-v", f"{path}:{path}:ro"]
    return [*argv, "-v", f"{cache}:/var/cache/otel-ebpf", *extra, image.tag, *args]


def test_mounts_and_capabilities_are_the_documented_ones() -> None:
    mounts = daemonset_host_mounts()
    assert sorted(mounts) == ["/lib/modules", "/sys/fs/cgroup", "/sys/kernel/btf",
                              "/sys/kernel/tracing", "/usr/src"]
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"\n(podman run [^`]*?otel-ebpf:0\.1\.0)\n", readme.replace("\\\n", ""))
    assert command, "README's Deploy section has no `podman run ... otel-ebpf:0.1.0` command"
    words = command.group(1).split()
    assert f"--cap-add={','.join(daemonset_capabilities())}" in words
    assert "--cap-drop=all" in words and "--pid=host" in words and "--privileged" not in words
    for path in mounts:
        assert f"{path}:{path}:ro" in words, path
        assert path in (ROOT / "Dockerfile").read_text(), path


def test_the_agent_holds_exactly_the_listed_capabilities(image: Image, cache: Path) -> None:
    argv = agent_argv(image, cache, container_name("caps"), ["/proc/self/status"],
                      extra=["--entrypoint", "cat"])
    done = subprocess.run(argv, capture_output=True, text=True, env=image.env, timeout=300)
    assert done.returncode == 0, done.stderr
    status = dict(line.split(":\t", 1) for line in done.stdout.splitlines() if ":\t" in line)
    wanted = sum(1 << BITS[c] for c in daemonset_capabilities())
    assert status["Uid"].split()[:2] == ["0", "0"]
    for field in ("CapEff", "CapPrm", "CapBnd"):
        assert int(status[field], 16) == wanted, (field, status[field])
    assert status["Seccomp"].strip() == "2"  # filtered, not unconfined


def test_image_labels(image: Image) -> None:
    labels = json.loads(podman(image, "image", "inspect", "--format",
                               "{{json .Config.Labels}}", image.tag).stdout)
    revision = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                              capture_output=True, text=True, check=True).stdout.strip()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert labels["org.opencontainers.image.revision"] == revision
    assert labels["org.opencontainers.image.version"] == project["version"]
    assert labels["org.opencontainers.image.licenses"] == project["license"]["text"]
    assert labels["org.opencontainers.image.title"] == "otel-ebpf"


def test_doctor_passes_in_the_image(image: Image, cache: Path) -> None:
    name = container_name("doctor")
    done = subprocess.run(agent_argv(image, cache, name, ["doctor"]), capture_output=True,
                          text=True, env=image.env, timeout=600)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    config, _ = agent_config.load(ROOT / "config" / "otel-ebpf.yaml", env={})
    for probe in registry.enabled_names(config):
        assert re.search(rf"^ok +{probe}: load +compiled and verified", report, re.M), report
    for check in ("privileges", "bpf\\(\\) syscall", "tracefs", "BTF", "cgroup v2 tree"):
        assert re.search(rf"^ok +{check} ", report, re.M), (check, report)
    assert "configuration: /etc/otel-ebpf/otel-ebpf.yaml" in report


@pytest.mark.parametrize(("omit", "extra", "code", "line", "fix"), [
    (["/sys/kernel/tracing"], [], 1, "FAIL tracefs",
     "-v /sys/kernel/tracing:/sys/kernel/tracing:ro"),
    (["/usr/src"], [], 1, "FAIL kernel headers",
     "mount the host's /usr/src into the container read-only"),
    (["/lib/modules", "/usr/src"], [], 1, "FAIL kernel headers",
     "-v /lib/modules:/lib/modules:ro -v /usr/src:/usr/src:ro"),
    (["/sys/kernel/btf"], ["--security-opt", "mask=/sys/kernel/btf"], 1, "FAIL BTF",
     "-v /sys/kernel/btf:/sys/kernel/btf:ro"),
    # identity degrades but every probe loads: a warning, exit 0
    (["/sys/fs/cgroup"], [], 0, "warn cgroup v2 tree",
     "-v /sys/fs/cgroup:/sys/fs/cgroup:ro"),
], ids=["tracefs", "usr-src", "headers", "btf", "cgroup"])
def test_doctor_names_a_missing_mount(image: Image, cache: Path, omit: list[str],
                                      extra: list[str], code: int, line: str,
                                      fix: str) -> None:
    # podman's own sysfs has /sys/kernel/btf: a runtime that hides it is stood for by a mask
    argv = agent_argv(image, cache, container_name("doctor"), ["doctor", "--no-load"],
                      omit=omit, extra=extra)
    done = subprocess.run(argv, capture_output=True, text=True, env=image.env, timeout=300)
    assert done.returncode == code, done.stdout + done.stderr
    found = [(a, b) for a, b in zip(done.stdout.splitlines(), done.stdout.splitlines()[1:],
                                    strict=False) if a.startswith(line)]
    assert found, done.stdout
    assert found[0][1].strip().startswith("fix: ") and fix in found[0][1], done.stdout


def test_doctor_names_the_seccomp_profile(image: Image, cache: Path) -> None:
    """Without the profile build.sh wrote, the runtime's default refuses bpf()."""
    argv = agent_argv(image, cache, container_name("doctor"), ["doctor", "--no-load"],
                      seccomp=False)
    done = subprocess.run(argv, capture_output=True, text=True, env=image.env, timeout=300)
    if not image.seccomp:  # this runtime's default profile lets CAP_BPF holders in
        assert done.returncode == 0, done.stdout + done.stderr
        return
    assert done.returncode == 1, done.stdout + done.stderr
    assert re.search(r"^FAIL bpf\(\) syscall .*\n +fix: CAP_BPF is held, so a seccomp filter "
                     r"refuses bpf\(\)", done.stdout, re.M), done.stdout


class Running:
    """A foreground `podman run` whose stderr is collected as it comes."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self.lines: list[str] = []
        self.out: list[str] = []
        for stream, sink in ((self.proc.stderr, self.lines), (self.proc.stdout, self.out)):
            threading.Thread(target=lambda s=stream, k=sink: k.extend(s), daemon=True).start()

    def wait_for(self, fragment: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if any(fragment in line for line in list(self.lines)):
                return True
            time.sleep(0.2)
        return any(fragment in line for line in list(self.lines))


@pytest.fixture
def started(image: Image) -> Iterator[list[str]]:
    """Names of containers a test started: removed whatever happens."""
    names: list[str] = []
    yield names
    for name in names:
        podman(image, "rm", "-f", "--time", "0", "--ignore", name, check=False)


def getppid_points(sink: OtlpSink, container_id: str) -> list[tuple[dict[str, Any], Any]]:
    out = []
    for resource, point in sink.metrics_points("linux.syscall.duration"):
        attrs = attrs_to_dict(point.attributes)
        if (resource.get("container.id") == container_id
                and attrs.get("linux.syscall.name") == "getppid"
                and str(attrs.get("process.executable.name")).startswith("syscall_workloa")):
            out.append((resource, point))
    return out


def test_agent_in_the_image_exports_a_containers_identity(
    image: Image, cache: Path, started: list[str], rotel: RotelCollector,
    otlp_sink: OtlpSink, syscall_workload: Path,
) -> None:
    agent_name = container_name("agent")
    started.append(agent_name)
    # the image's own configuration; rotel listens on the host's loopback
    agent = Running(agent_argv(image, cache, agent_name, [
        "run", "--config", "/etc/otel-ebpf/otel-ebpf.yaml", "--duration", "20s",
        "--export-interval", "2s", "--otlp-endpoint", rotel.grpc_endpoint,
        "--otlp-protocol", "grpc"]), image.env)
    try:
        assert agent.wait_for("running: probes", timeout=300), "".join(agent.lines)
        # a second container running a workload whose syscalls are known; it stays until
        # the agent has exported: container ids are read from the cgroup tree when the
        # agent exports, and podman removes a container's cgroup as soon as it exits
        workload = container_name("workload")
        started.append(workload)
        created = podman(image, "create", "--name", workload, "--network=none",
                         "-v", f"{syscall_workload}:/usr/local/bin/syscall_workload:ro",
                         "debian:12-slim", "sh", "-c",
                         f"/usr/local/bin/syscall_workload {N_GETPPID} 3 20 && exec sleep 300")
        workload_id = created.stdout.strip().splitlines()[-1]
        assert re.fullmatch(r"[0-9a-f]{64}", workload_id), created.stdout
        podman(image, "start", workload)
        deadline = time.monotonic() + 60
        while "done" not in (logs := podman(image, "logs", workload).stdout):
            assert time.monotonic() < deadline, logs
            time.sleep(0.2)

        # the HEALTHCHECK, while the agent runs (podman runs it on demand without systemd)
        health = podman(image, "healthcheck", "run", agent_name, check=False)
        assert health.returncode == 0, health.stdout + health.stderr
        assert agent.proc.wait(timeout=120) == 0, "".join(agent.lines)
    finally:
        if agent.proc.poll() is None:
            agent.proc.kill()
            agent.proc.wait()
    log = "".join(agent.lines)
    assert "Traceback" not in log, log

    def arrived() -> bool:
        return any(p.count == N_GETPPID for _, p in getppid_points(otlp_sink, workload_id))

    ok = otlp_sink.wait_for(arrived, timeout=15)
    seen = {r.get("container.id") for r, _ in otlp_sink.metrics_points("linux.syscall.duration")}
    assert ok, (
        f"no getppid count {N_GETPPID} with container.id {workload_id}; container ids seen: "
        f"{seen}\nagent log:\n{log}")
    points = getppid_points(otlp_sink, workload_id)
    assert max(p.count for _, p in points) == N_GETPPID  # exact, never more
    resource = points[-1][0]
    assert resource["container.runtime.name"] == "podman"
    assert resource["host.name"] == os.uname().nodename


def test_healthcheck_is_unhealthy_without_a_running_agent(image: Image) -> None:
    config = podman(image, "image", "inspect", "--format",
                    "{{json .Config.Healthcheck.Test}}", image.tag).stdout.strip()
    assert config == '["CMD","otel-ebpf","health"]'
    done = podman(image, "run", "--rm", "--network=none", "--entrypoint", "otel-ebpf",
                  image.tag, "health", check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout.startswith("unhealthy: no report at /tmp/otel-ebpf.health"), done.stdout
