"""Kubernetes, node tier: the DaemonSet of deploy/kubernetes, run by a real kubelet with
containerd and runc, with the image deploy/image/build.sh builds.

The cluster is real and private to this module: etcd + kube-apiserver (tests/peers/kube.py),
the DaemonSet controller and the scheduler, a kubelet named NODE with its own containerd
(tests/peers/kubelet.py, tests/peers/containerd.py). The image goes from podman to
containerd as users move an image without a registry (`podman save`, `ctr images import`).
The kustomize base is deployed through an overlay that changes only what this machine
needs: the image's local name with `imagePullPolicy: Never`, `hostNetwork` (the kubelet
runs no pod network here), the OTLP endpoint (a recording OTLP/gRPC receiver,
tests/peers/otlp_sink.py, on the host's loopback) and the API server's loopback address
in place of the cluster IP that no kube-proxy serves.

Proven: the DaemonSet controller makes the pod, the kubelet starts it, its startup,
readiness and liveness probes (`otel-ebpf health`) pass as the kubelet counts them; a
workload pod's syscalls arrive counted exactly, with that pod's Kubernetes identity as the
API server knows it and containerd's container id; the agent's own process carries its own
pod's name. Deleting the DaemonSet stops the agent cleanly (its SIGTERM flush), and the
node leaves nothing behind: no process, mount, cgroup, sysctl or log link.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from otel_ebpf.kernel.capabilities import BITS
from tests.e2e.test_agent import N_GETPPID
from tests.peers.containerd import Containerd, image_archive, mounts_below
from tests.peers.kube import KubeApiServer, ensure_built
from tests.peers.kubelet import ControlLoops, Kubelet, build_pause, pause_image_name
from tests.peers.otlp_sink import OtlpSink, attrs_to_dict
from tests.peers.process import LOOPBACK

pytestmark = [pytest.mark.e2e, pytest.mark.kernel]

ROOT = Path(__file__).resolve().parents[2]
BUILD_IMAGE = ROOT / "deploy" / "image" / "build.sh"
TAG = "otel-ebpf:kube-node-test"  # its own tag: other tiers rebuild and prune 0.1.0
NODE = "otel-ebpf-test-node"
AGENT_NS, WORKLOAD_NS = "otel-ebpf", "workload"
AGENT_LABEL = "app.kubernetes.io/name=otel-ebpf"


@dataclass
class Node:
    api: KubeApiServer
    runtime: Containerd
    loops: ControlLoops
    kubelet: Kubelet
    image: str

    def pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = json.loads(self.api.kubectl(
            "get", "pods", f"--namespace={namespace}", f"--selector={selector}", "-o",
            "json").stdout)["items"]
        return items

    def wait(self, what: str, check: Callable[[], Any], timeout: float) -> Any:
        """`check()`'s first truthy value; fails with the node's logs after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            self.loops.check_running()
            self.kubelet.check_running()
            if value := check():
                return value
            if time.monotonic() > deadline:
                pytest.fail(f"{what} within {timeout:.0f}s\n--- kubelet ---\n"
                            f"{self.kubelet.read_log()[-6000:]}\n{self.loops.read_logs()[-3000:]}")
            time.sleep(1)

    def teardown(self) -> list[str]:
        """Delete what runs through the API (the kubelet stops the pods as in any
        cluster), stop everything; what is left on the machine."""
        left: list[str] = []
        private = [peer.workdir.path for peer in (self.runtime, self.kubelet)
                   if peer.workdir.exists]
        try:
            for namespace in (AGENT_NS, WORKLOAD_NS):
                self.api.kubectl("delete", "daemonsets,pods", "--all", f"--namespace={namespace}",
                                 "--wait=false", check=False)
            deadline = time.monotonic() + 90
            while (pods := [f"pod {p['metadata']['namespace']}/{p['metadata']['name']}: "
                            f"{p.get('status', {}).get('phase')}"
                            for ns in (AGENT_NS, WORKLOAD_NS) for p in self.pods(ns, "")]):
                if time.monotonic() > deadline:
                    left += pods
                    break
                time.sleep(1)
        finally:
            for stop in (self.kubelet.stop, self.loops.stop, self.runtime.stop):
                try:
                    stop()
                except Exception as exc:  # the others must stop all the same
                    left.append(f"{stop.__qualname__}: {exc!r}")
        left += [f"cgroup {p}" for p in self.kubelet.remove_cgroups()]
        left += self.kubelet.leftovers()
        left += [f"mount {m}" for d in private for m in mounts_below(d)]
        left += [f"directory {d}" for d in private if d.exists()]
        return left


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """The node, torn down at the end of the module; the logs of its kubelet, control
    loops and containerd are kept in a directory the output names."""
    bindir = ensure_built("kubelet", "kube-controller-manager", "kube-scheduler")
    pause = build_pause()
    began = time.monotonic()
    image, archive = image_archive(BUILD_IMAGE, TAG)
    built = time.monotonic()
    with KubeApiServer(bindir) as api:
        runtime = Containerd(pause_image_name()).start()
        loops = ControlLoops(api, bindir)
        kubelet = Kubelet(api, runtime, bindir, NODE)
        the_node = Node(api, runtime, loops, kubelet, image)
        try:
            runtime.import_image(pause)
            runtime.import_image(archive)
            imported = time.monotonic()
            loops.start()
            kubelet.start()
            print(f"image build + save {built - began:.1f}s, containerd + import "
                  f"{imported - built:.1f}s, node up {time.monotonic() - imported:.1f}s")
            yield the_node
        finally:
            left = the_node.teardown()
            logs = tmp_path_factory.mktemp("node-logs")
            (logs / "kubelet.log").write_text(kubelet.read_log())
            (logs / "containerd.log").write_text(runtime.read_log())
            (logs / "control-loops.log").write_text(loops.read_logs())
            print(f"node logs in {logs}")
    assert not left, f"the node tier left: {left}"


@pytest.fixture(scope="module")
def sink() -> Iterator[OtlpSink]:
    with OtlpSink() as recording:
        yield recording


def overlay(directory: Path, node: Node, endpoint: str, cache: Path) -> str:
    """A kustomize overlay of deploy/kubernetes with this machine's settings, rendered."""
    name, tag = node.image.rsplit(":", 1)
    (directory / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(ROOT / "deploy" / "kubernetes", directory)],
        "images": [{"name": "otel-ebpf", "newName": name, "newTag": tag}],
        "patches": [{"path": "node.yaml"}],
    }))
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
           "KUBERNETES_SERVICE_HOST": LOOPBACK,
           "KUBERNETES_SERVICE_PORT": str(node.api.port), "OTEL_METRIC_EXPORT_INTERVAL": "2000"}
    (directory / "node.yaml").write_text(yaml.safe_dump({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "otel-ebpf", "namespace": AGENT_NS},
        "spec": {"template": {"spec": {
            "hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet",
            "containers": [{"name": "otel-ebpf", "imagePullPolicy": "Never",
                            "env": [{"name": k, "value": v} for k, v in env.items()]}],
            "volumes": [{"name": "cache", "hostPath": {"path": str(cache),
                                                       "type": "Directory"}}],
        }}},
    }))
    return node.api.kubectl("kustomize", str(directory)).stdout


@dataclass
class Deployed:
    node: Node
    pod: dict[str, Any]
    sink: OtlpSink


def ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True"
               for c in pod.get("status", {}).get("conditions", []))


@pytest.fixture(scope="module")
def deployed(node: Node, sink: OtlpSink, tmp_path_factory: pytest.TempPathFactory
             ) -> Deployed:
    rendered = overlay(tmp_path_factory.mktemp("overlay"), node, sink.endpoint,
                       tmp_path_factory.mktemp("agent-cache"))
    node.api.kubectl("apply", "-f", "-", stdin=rendered)
    began = time.monotonic()
    pod = node.wait("the DaemonSet's pod Ready", lambda: next(
        (p for p in node.pods(AGENT_NS, AGENT_LABEL) if ready(p)), None), timeout=600)
    print(f"agent pod {pod['metadata']['name']} Ready {time.monotonic() - began:.1f}s "
          "after the DaemonSet was applied")
    return Deployed(node, pod, sink)


def test_the_daemonset_controller_runs_one_pod_on_the_node(deployed: Deployed) -> None:
    pod = deployed.pod
    assert pod["spec"]["nodeName"] == NODE
    (owner,) = pod["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"]) == ("DaemonSet", "otel-ebpf")
    (status,) = pod["status"]["containerStatuses"]
    assert status["ready"] and status["started"] and status["restartCount"] == 0
    assert status["image"].endswith(deployed.node.image.split("/", 1)[1])
    ds = deployed.node.api.get("daemonset", "otel-ebpf", AGENT_NS)
    assert ds["status"]["numberReady"] == ds["status"]["desiredNumberScheduled"] == 1


def test_the_kubelet_applies_the_daemonsets_security_context(deployed: Deployed) -> None:
    """The agent's process, as containerd started it for the kubelet: uid 0 with exactly
    the DaemonSet's capabilities, no privilege escalation, a seccomp filter (containerd's
    RuntimeDefault lets CAP_BPF/CAP_PERFMON holders call bpf() and perf_event_open())."""
    (status,) = deployed.pod["status"]["containerStatuses"]
    container = status["containerID"].removeprefix("containerd://")
    tasks = deployed.node.runtime.ctr("tasks", "list").stdout.splitlines()
    (pid,) = [int(line.split()[1]) for line in tasks if line.split()[0] == container]
    proc = dict(line.split(":\t", 1) for line in
                Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
    caps = deployed.pod["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]
    wanted = sum(1 << BITS[c] for c in caps)
    assert proc["Uid"].split()[:2] == ["0", "0"]
    for field in ("CapEff", "CapPrm", "CapBnd"):
        assert int(proc[field], 16) == wanted, (field, proc[field])
    assert proc["NoNewPrivs"].strip() == "1" and proc["Seccomp"].strip() == "2", proc
    assert b"otel-ebpf\0run\0" in Path(f"/proc/{pid}/cmdline").read_bytes()


def probe_results(node: Node, pod: str) -> dict[tuple[str, str], float]:
    """The kubelet's own probe counters for `pod`: (probe type, result) -> count."""
    context = ssl.create_default_context(cafile=None)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the kubelet's self-signed serving certificate
    context.load_cert_chain(str(node.api.workdir / "admin.crt"),
                            str(node.api.workdir / "admin.key"))
    port = node.kubelet.port
    with urllib.request.urlopen(f"https://{LOOPBACK}:{port}/metrics/probes", context=context,
                                timeout=10) as resp:
        text = resp.read().decode()
    out: dict[tuple[str, str], float] = {}
    for m in re.finditer(r'^prober_probe_total\{([^}]*)\} (\S+)$', text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels.get("pod") == pod:
            key = (labels["probe_type"], labels["result"])
            out[key] = out.get(key, 0) + float(m.group(2))
    return out


def test_the_agents_probes_pass(deployed: Deployed) -> None:
    """Startup, readiness and liveness (`otel-ebpf health`) as the kubelet ran them: the
    startup probe succeeded (it may fail while the agent compiles its probes, as its
    failureThreshold allows), then readiness and liveness succeeded and never failed, and
    the container never restarted."""
    name = deployed.pod["metadata"]["name"]
    results = deployed.node.wait("a liveness probe success", lambda: (
        r if (r := probe_results(deployed.node, name)).get(("Liveness", "successful"))
        else None), timeout=120)
    assert results.get(("Startup", "successful"), 0) >= 1, results
    for probe in ("Readiness", "Liveness"):
        assert results.get((probe, "successful"), 0) >= 1, results
        assert results.get((probe, "failed"), 0) == 0, results
    (pod,) = deployed.node.pods(AGENT_NS, AGENT_LABEL)
    assert pod["status"]["containerStatuses"][0]["restartCount"] == 0


def workload_pod(node: Node, binary: Path) -> dict[str, Any]:
    """A pod whose one container makes N_GETPPID getppid calls (tests/helpers, mounted from
    the host into the agent's image, which has its C library), then sleeps: it stays until
    the agent has exported (the agent names containers from the cgroup tree)."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "getppid", "namespace": WORKLOAD_NS,
                     "labels": {"app": "getppid"}},
        "spec": {
            "hostNetwork": True, "tolerations": [{"operator": "Exists"}],
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "work", "image": node.image, "imagePullPolicy": "Never",
                "command": ["sh", "-c", f"/work/syscall_workload {N_GETPPID} 3 20 && "
                            "exec sleep 600"],
                "volumeMounts": [{"name": "bin", "mountPath": "/work", "readOnly": True}],
            }],
            "volumes": [{"name": "bin", "hostPath": {"path": str(binary.parent),
                                                     "type": "Directory"}}],
        },
    }


def getppid_points(sink: OtlpSink, pod: str) -> list[tuple[dict[str, Any], Any]]:
    """The workload's getppid series (runc's init and the shell make a few calls too, in
    the pod's sandbox and container cgroups: those are not the workload's)."""
    out = []
    for resource, point in sink.metrics_points("linux.syscall.duration"):
        attrs = attrs_to_dict(point.attributes)
        if (resource.get("k8s.pod.name") == pod and attrs.get("linux.syscall.name") == "getppid"
                and str(attrs.get("process.executable.name")).startswith("syscall_workloa")):
            out.append((resource, point))
    return out


def test_a_workload_pod_is_counted_exactly_under_its_pod(deployed: Deployed,
                                                         syscall_workload: Path) -> None:
    node = deployed.node
    node.api.namespace(WORKLOAD_NS)
    node.api.apply(workload_pod(node, syscall_workload))
    pod = node.wait("the workload pod running", lambda: next(
        (p for p in node.pods(WORKLOAD_NS, "app=getppid") if ready(p)), None), timeout=120)
    node.wait("the workload's 'done'", lambda: "done" in node.kubelet.container_logs(
        WORKLOAD_NS, "getppid", "work"), timeout=60)
    # the container's name comes with the kubelet's status update, which the watch may
    # deliver after the first export of the count: wait for both
    resource = node.wait(f"a getppid count of {N_GETPPID} under container work", lambda: next(
        (r for r, p in getppid_points(deployed.sink, "getppid")
         if p.count == N_GETPPID and "k8s.container.name" in r), None), timeout=60)
    points = getppid_points(deployed.sink, "getppid")
    assert max(p.count for _, p in points) == N_GETPPID  # exact, never more
    (status,) = node.api.get("pod", "getppid", WORKLOAD_NS)["status"]["containerStatuses"]
    assert status["restartCount"] == 0, status
    assert {f"containerd://{r['container.id']}" for r, _ in points} == {status["containerID"]}
    assert resource["k8s.namespace.name"] == WORKLOAD_NS
    assert resource["k8s.container.name"] == "work"
    assert resource["k8s.pod.uid"] == pod["metadata"]["uid"]
    assert resource["k8s.node.name"] == NODE


def test_the_agent_names_its_own_pod(deployed: Deployed) -> None:
    """The agent's own python process, seen by its own probes, carries its own pod's
    identity: what the kubelet's downward API, service-account token and the API server's
    list/watch give it inside the DaemonSet."""
    name = deployed.pod["metadata"]["name"]

    def own() -> list[dict[str, Any]]:
        # with its container's name, which may come after the pod's (see above)
        return [r for r, _ in deployed.sink.metrics_points("linux.syscall.duration")
                if r.get("k8s.pod.name") == name and "k8s.container.name" in r]

    resources = deployed.node.wait(f"a series under the agent's pod {name}", own, timeout=60)
    resource = resources[-1]
    assert resource["k8s.namespace.name"] == AGENT_NS
    assert resource["k8s.container.name"] == "otel-ebpf"
    assert resource["k8s.pod.uid"] == deployed.pod["metadata"]["uid"]
    (status,) = deployed.pod["status"]["containerStatuses"]
    assert status["containerID"] == f"containerd://{resource['container.id']}"


def test_deleting_the_daemonset_stops_the_agent_cleanly(deployed: Deployed) -> None:
    """As a user uninstalls it: the garbage collector deletes the DaemonSet's pod, the
    kubelet sends SIGTERM, the agent flushes, detaches its BPF programs and exits 0."""
    node, name = deployed.node, deployed.pod["metadata"]["name"]
    watch = subprocess.Popen(
        ["kubectl", f"--kubeconfig={node.api.kubeconfig}", "get", "pods", "--watch",
         f"--namespace={AGENT_NS}", "-o", "jsonpath={.metadata.name} {.status.phase} "
         "{.status.containerStatuses[0].state.terminated.exitCode}{\"\\n\"}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # the kubelet removes the log with the pod: read it through a descriptor held open
    (path,) = node.kubelet.pod_logs.glob(f"{AGENT_NS}_{name}_*/otel-ebpf/0.log")
    with path.open(errors="replace") as held:
        try:
            time.sleep(1)  # the watch is established
            node.api.kubectl("delete", "daemonset", "otel-ebpf", f"--namespace={AGENT_NS}",
                             "--wait=false")
            node.wait(f"pod {name} gone", lambda: not node.pods(AGENT_NS, AGENT_LABEL),
                      timeout=90)
        finally:
            watch.terminate()
            events, _ = watch.communicate(timeout=10)
        log = held.read()
    assert f"{name} Succeeded 0" in events.splitlines(), events
    assert "SIGTERM received, flushing and detaching" in log, log[-4000:]
    assert "Traceback" not in log and " ERROR " not in log, log[-4000:]
    ids = {int(i) for m in re.finditer(r"BPF program ids ([\d ]+)$", log, re.M)
           for i in m.group(1).split()}
    assert ids, log[-4000:]
    shown = subprocess.run(["bpftool", "prog", "show", "--json"], capture_output=True,
                           text=True, check=True).stdout
    assert not ids & {p["id"] for p in json.loads(shown)}
