"""Workload identity on all three signals: a helper moved into real cgroup v2 directories
named as each container runtime names them must carry the same container.id (and pod UID
for Kubernetes) on its syscall metrics, its slow-call spans and its profile samples."""

from __future__ import annotations

import os
import secrets
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from otel_ebpf.kernel.cgroupfs import cgroup2_root
from tests.e2e.agent_config import agent_config
from tests.e2e.test_agent import AgentProcess
from tests.peers.otlp_sink import OtlpSink, attrs_to_dict
from tests.peers.rotel import RotelCollector

pytestmark = [pytest.mark.e2e, pytest.mark.kernel]

# the helper's syscalls per process, its sleeps slow calls (spans)
SYSCALLS = {"interval": "500ms", "aggregation": "process", "filter": {"comms": ["cpu_hot"]},
            "slow_spans": {"include": ["nanosleep", "clock_nanosleep"]}}


def runtime_paths(tag: str) -> dict[str, tuple[str, str, str | None]]:
    """name -> (cgroup path below the v2 root, container id, pod uid)."""
    ids = {name: secrets.token_hex(32) for name in ("docker", "containerd", "crio", "podman")}
    pod = str(uuid.uuid4())
    pod_slice = f"kubepods-burstable-pod{pod.replace('-', '_')}.slice"
    return {
        "docker": (f"{tag}.slice/docker-{ids['docker']}.scope", ids["docker"], None),
        "containerd": (f"{tag}.slice/kubepods.slice/kubepods-burstable.slice/{pod_slice}/"
                       f"cri-containerd-{ids['containerd']}.scope", ids["containerd"], pod),
        "crio": (f"{tag}.slice/crio-{ids['crio']}.scope", ids["crio"], None),
        "podman": (f"{tag}.slice/libpod-{ids['podman']}.scope", ids["podman"], None),
    }


def start_in_cgroup(cpu_hot: Path, cgroup: Path, seconds: str) -> subprocess.Popen[str]:
    """`cpu_hot mixed` inside a cgroup from its first syscall: the shell joins the cgroup,
    then execs the helper (same pid). No preexec_fn: the test process has threads. The
    helper waits for a line on stdin; returns it ready."""
    proc = subprocess.Popen(
        ["sh", "-c", 'echo $$ > "$1" && exec "$2" mixed "$3"', "sh",
         str(cgroup / "cgroup.procs"), str(cpu_hot), seconds],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline().startswith("ready")
    return proc


def go(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()


@pytest.fixture
def cgroups() -> Iterator[dict[str, tuple[Path, str, str | None]]]:
    root = cgroup2_root()
    tag = f"otel-ebpf-test-{os.getpid()}"
    made = {}
    for name, (rel, cid, pod) in runtime_paths(tag).items():
        path = root / rel
        path.mkdir(parents=True)
        made[name] = (path, cid, pod)
    try:
        yield made
    finally:
        for path, _, _ in made.values():  # leaves first, then their parents
            for directory in [path, *path.parents]:
                if directory == root or not str(directory).startswith(str(root)):
                    break
                try:
                    directory.rmdir()
                except OSError:
                    break


def test_same_container_identity_on_metrics_spans_and_profiles(
    cgroups: dict[str, tuple[Path, str, str | None]], cpu_hot: Path, tmp_path: Path,
    otlp_sink: OtlpSink,
) -> None:
    config = agent_config({"syscall_latency": SYSCALLS, "cpu_profile": {"frequency": 199}})
    agent = AgentProcess(tmp_path, "--export-interval", "1s", config_text=config,
                         env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_sink.endpoint,
                              "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    helpers: dict[str, subprocess.Popen[str]] = {}
    try:
        agent.wait_for_log(" running: probes")  # every probe: they attach side by side
        for name, (path, _, _) in cgroups.items():
            helpers[name] = start_in_cgroup(cpu_hot, path, "0.5")
        for proc in helpers.values():
            go(proc)
        for proc in helpers.values():
            proc.wait(timeout=30)
        pids = {name: proc.pid for name, proc in helpers.items()}

        def seen() -> dict[str, dict[str, set[tuple[str | None, str | None]]]]:
            out: dict[str, dict[str, set[tuple[str | None, str | None]]]] = {
                n: {"metrics": set(), "spans": set(), "profiles": set()} for n in pids}
            by_pid = {pid: name for name, pid in pids.items()}
            for resource, point in otlp_sink.metrics_points("linux.syscall.duration"):
                pid = attrs_to_dict(point.attributes).get("process.pid")
                if pid in by_pid:
                    out[by_pid[pid]]["metrics"].add(
                        (resource.get("container.id"), resource.get("k8s.pod.uid")))
            for resource, span in otlp_sink.spans():
                pid = attrs_to_dict(span.attributes).get("process.pid")
                if pid in by_pid:
                    out[by_pid[pid]]["spans"].add(
                        (resource.get("container.id"), resource.get("k8s.pod.uid")))
            for request in otlp_sink.profiles_requests:
                d = request.dictionary
                for rp in request.resource_profiles:
                    resource = attrs_to_dict(rp.resource.attributes)
                    for sp in rp.scope_profiles:
                        for prof in sp.profiles:
                            for sample in prof.samples:
                                attrs = {d.string_table[d.attribute_table[i].key_strindex]:
                                         d.attribute_table[i].value
                                         for i in sample.attribute_indices}
                                pid = attrs["process.pid"].int_value
                                # the helper, not the shell that started it (same pid,
                                # sampled before it joined the cgroup)
                                if (pid in by_pid
                                        and attrs["thread.name"].string_value == "cpu_hot"):
                                    out[by_pid[pid]]["profiles"].add(
                                        (resource.get("container.id"),
                                         resource.get("k8s.pod.uid")))
            return out

        def complete() -> bool:
            return all(all(signals.values()) for signals in seen().values())

        assert otlp_sink.wait_for(complete, timeout=30), (seen(), "".join(agent.stderr))
        for name, signals in seen().items():
            _, cid, pod = cgroups[name]
            for signal, identities in signals.items():
                assert identities == {(cid, pod)}, (name, signal, identities)
        code, _ = agent.stop()
        assert code == 0
    finally:
        for proc in helpers.values():
            proc.kill()
            proc.wait()
        agent.kill()


def test_workload_filter_selects_containers_in_the_kernel(
    cgroups: dict[str, tuple[Path, str, str | None]], cpu_hot: Path, tmp_path: Path,
    otlp_sink: OtlpSink,
) -> None:
    """Only the docker container is selected (by a short id prefix): the helpers in the
    other cgroups produce no syscall metrics and no profile samples at all."""
    _, docker_id, _ = cgroups["docker"]
    config = agent_config({"syscall_latency": SYSCALLS, "cpu_profile": {"frequency": 199}},
                          identity={"filter": {"container_ids": [docker_id[:12]]}})
    agent = AgentProcess(tmp_path, "--export-interval", "1s", config_text=config,
                         env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_sink.endpoint,
                              "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    try:
        agent.wait_for_log("workload filter: ")
        pids = {}
        for name in ("docker", "crio"):
            proc = start_in_cgroup(cpu_hot, cgroups[name][0], "0.3")
            go(proc)
            proc.wait(timeout=30)
            pids[name] = proc.pid

        def metric_pids() -> set[int]:
            return {attrs_to_dict(p.attributes).get("process.pid")
                    for _, p in otlp_sink.metrics_points("linux.syscall.duration")}

        assert otlp_sink.wait_for(lambda: pids["docker"] in metric_pids(), timeout=20), (
            "".join(agent.stderr))
        code, _ = agent.stop()
        assert code == 0
        assert pids["crio"] not in metric_pids()
        containers = {r.get("container.id") for r, _ in
                      otlp_sink.metrics_points("linux.syscall.duration")}
        assert containers == {docker_id}
    finally:
        agent.kill()


def test_resource_attributes_through_rotel(
    cgroups: dict[str, tuple[Path, str, str | None]], cpu_hot: Path, tmp_path: Path,
    rotel: RotelCollector, otlp_sink: OtlpSink,
) -> None:
    """Through a real collector: the container's resource carries the container, the pod,
    the host and OTEL_RESOURCE_ATTRIBUTES; the process is on the data point."""
    path, container_id, pod_uid = cgroups["containerd"]
    agent = AgentProcess(tmp_path, "--export-interval", "1s",
                         config_text=agent_config({"syscall_latency": SYSCALLS}),
                         env={**rotel.grpc_env,
                              "OTEL_RESOURCE_ATTRIBUTES": "k8s.cluster.name=e2e"})
    try:
        agent.wait_for_log("probe syscall_latency attached")
        proc = start_in_cgroup(cpu_hot, path, "0.2")
        go(proc)
        proc.wait(timeout=30)

        def mine() -> list[tuple[dict[str, object], object]]:
            return [(r, p) for r, p in otlp_sink.metrics_points("linux.syscall.duration")
                    if attrs_to_dict(p.attributes).get("process.pid") == proc.pid]

        assert otlp_sink.wait_for(lambda: bool(mine()), timeout=20), "".join(agent.stderr)
        resource, point = mine()[0]
        assert resource["container.id"] == container_id
        assert resource["container.runtime.name"] == "containerd"
        assert resource["k8s.pod.uid"] == pod_uid
        assert resource["k8s.cluster.name"] == "e2e"
        for key in ("host.name", "host.arch", "os.type", "service.name"):
            assert resource.get(key), (key, resource)
        assert "process.pid" not in resource  # the process is a point attribute here
        assert attrs_to_dict(point.attributes)["process.executable.name"] == "cpu_hot"
        code, _ = agent.stop()
        assert code == 0
    finally:
        agent.kill()
