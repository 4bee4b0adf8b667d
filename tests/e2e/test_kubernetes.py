"""Pod identity from a real Kubernetes API server (etcd + kube-apiserver built from Go
modules, tests/peers/kube.py): the agent, as a process, authenticates as the ServiceAccount
of deploy/kubernetes (a bound token from the TokenRequest API, the in-cluster environment
variables the kubelet sets, NODE_NAME as the DaemonSet sets it) and lists and watches the
pods of its node. Pods are created and updated through the API, with container statuses
whose ids name real cgroups, made as containerd under the kubelet names them; a known
workload runs in them, and its exported series must carry the pod's names.

A ServiceAccount missing one of the two verbs gets one error naming it (KubernetesPods in
process: the refusal comes from the real RBAC authorizer)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from otel_ebpf.config import KubernetesConfig
from otel_ebpf.enrich.kubernetes import KubernetesPods
from otel_ebpf.kernel.cgroupfs import cgroup2_root
from tests.e2e.agent_config import agent_config
from tests.e2e.test_agent import AgentProcess
from tests.e2e.test_identity import go, start_in_cgroup
from tests.peers.kube import KubeApiServer
from tests.peers.otlp_sink import OtlpSink, attrs_to_dict
from tests.peers.rotel import RotelCollector

AGENT_NS, AGENT_SA = "otel-ebpf", "otel-ebpf"  # deploy/kubernetes
K8S_KEYS = ("k8s.pod.name", "k8s.namespace.name", "k8s.container.name", "k8s.node.name",
            "k8s.pod.uid", "k8s.pod.label.version", "container.id")

MakeCgroup = Callable[[str, str], Path]


@pytest.fixture
def pod_cgroups() -> Iterator[MakeCgroup]:
    """(pod uid, container id) -> a cgroup v2 directory named as containerd with the
    kubelet's systemd driver names it, below a test slice; removed afterwards."""
    root = cgroup2_root()
    tag = f"otel-ebpf-k8s-{os.getpid()}.slice"
    made: list[Path] = []

    def make(pod_uid: str, container_id: str) -> Path:
        path = (root / tag / "kubepods.slice" / "kubepods-burstable.slice" /
                f"kubepods-burstable-pod{pod_uid.replace('-', '_')}.slice" /
                f"cri-containerd-{container_id}.scope")
        path.mkdir(parents=True)
        made.append(path)
        return path

    yield make
    for path in reversed(made):  # leaves first, then each parent once it is empty
        for directory in [path, *path.parents]:
            if directory == root:
                break
            try:
                directory.rmdir()
            except OSError:
                break


def _run_workload(cpu_hot: Path, cgroup: Path, seconds: str) -> subprocess.Popen[str]:
    proc = start_in_cgroup(cpu_hot, cgroup, seconds)
    go(proc)
    return proc


def _resources(sink: OtlpSink, pid: int) -> list[dict[str, Any]]:
    """The k8s part of the resource of every syscall series point of `pid`."""
    return [{k: r.get(k) for k in K8S_KEYS}
            for r, p in sink.metrics_points("linux.syscall.duration")
            if attrs_to_dict(p.attributes).get("process.pid") == pid]


@pytest.mark.e2e
@pytest.mark.kernel
def test_agent_names_pods_listed_and_watched_from_a_real_api_server(
    kube_api: KubeApiServer, kube_agent_objects: object, pod_cgroups: MakeCgroup,
    cpu_hot: Path, tmp_path: Path, rotel: RotelCollector, otlp_sink: OtlpSink,
) -> None:
    node, ns = f"node-{secrets.token_hex(4)}", f"shop-{secrets.token_hex(3)}"
    kube_api.namespace(ns)
    ids = {name: secrets.token_hex(32) for name in ("web", "web-v2", "api", "elsewhere")}
    web = kube_api.run_pod(ns, "web", node, {"app": ids["web"]}, {"version": "v1"})
    elsewhere = kube_api.run_pod(ns, "elsewhere", "another-node", {"app": ids["elsewhere"]})
    token = kube_api.token(AGENT_NS, AGENT_SA, tmp_path / "token")
    config = agent_config(
        {"syscall_latency": {"interval": "500ms", "aggregation": "process",
                             "filter": {"comms": ["cpu_hot"]}}},
        identity={"kubernetes": {"token_path": str(token), "ca_path": str(kube_api.ca_path),
                                 "labels": ["version"]}})
    agent = AgentProcess(tmp_path, "--export-interval", "1s", config_text=config, env={
        **rotel.grpc_env, "NODE_NAME": node,
        # what the kubelet puts in every container's environment
        "KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(kube_api.port)})
    procs: list[subprocess.Popen[str]] = []
    try:
        agent.wait_for_log("probe syscall_latency attached", timeout=120)
        # listed at start: the pod existed before the agent
        procs += [_run_workload(cpu_hot, pod_cgroups(web, ids["web"]), "0.3"),
                  _run_workload(cpu_hot, pod_cgroups(elsewhere, ids["elsewhere"]), "0.3")]
        for proc in procs:
            proc.wait(timeout=30)
        first, other = procs[0].pid, procs[1].pid
        assert otlp_sink.wait_for(lambda: _resources(otlp_sink, first) and
                                  _resources(otlp_sink, other), timeout=30), "".join(agent.stderr)
        assert {str(r) for r in _resources(otlp_sink, first)} == {str({
            "k8s.pod.name": "web", "k8s.namespace.name": ns, "k8s.container.name": "app",
            "k8s.node.name": node, "k8s.pod.uid": web, "k8s.pod.label.version": "v1",
            "container.id": ids["web"]})}
        # a pod of another node is not listed (field selector): only what the cgroup says
        assert {str(r) for r in _resources(otlp_sink, other)} == {str({
            **dict.fromkeys(K8S_KEYS), "k8s.pod.uid": elsewhere,
            "container.id": ids["elsewhere"]})}

        # while the agent runs, through its watch: a new pod with two containers, a
        # relabelled pod whose container restarted (new id, the old one as lastState)
        api = kube_api.run_pod(ns, "api", node, {"server": ids["api"],
                                                 "sidecar": secrets.token_hex(32)})
        kube_api.kubectl("label", "pod", "web", f"--namespace={ns}", "version=v2",
                         "--overwrite")
        kube_api.kubectl("patch", "pod", "web", f"--namespace={ns}", "--subresource=status",
                         "--type=json", "-p", _restart_patch(ids["web"], ids["web-v2"]))
        procs += [_run_workload(cpu_hot, pod_cgroups(api, ids["api"]), "2"),
                  _run_workload(cpu_hot, pod_cgroups(web, ids["web-v2"]), "2")]
        new_api, new_web = procs[2].pid, procs[3].pid

        def watched() -> bool:
            return (any(r["k8s.pod.name"] == "api" for r in _resources(otlp_sink, new_api))
                    and any(r["k8s.pod.label.version"] == "v2" and r["k8s.container.name"]
                            for r in _resources(otlp_sink, new_web)))

        assert otlp_sink.wait_for(watched, timeout=30), (
            _resources(otlp_sink, new_api), _resources(otlp_sink, new_web),
            "".join(agent.stderr))
        named = [r for r in _resources(otlp_sink, new_api) if r["k8s.pod.name"]]
        assert {str(r) for r in named} == {str({
            "k8s.pod.name": "api", "k8s.namespace.name": ns, "k8s.container.name": "server",
            "k8s.node.name": node, "k8s.pod.uid": api, "k8s.pod.label.version": None,
            "container.id": ids["api"]})}
        relabelled = [r for r in _resources(otlp_sink, new_web)
                      if r["k8s.pod.label.version"] == "v2"]
        assert {(r["k8s.pod.name"], r["k8s.container.name"], r["container.id"])
                for r in relabelled} == {("web", "app", ids["web-v2"])}
        for proc in procs:
            proc.wait(timeout=30)
        code, _ = agent.stop()
        assert code == 0
        logged = "".join(agent.stderr)
        assert "kubernetes:" not in logged, logged  # no warning, no error: it just worked
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        agent.kill()


def _restart_patch(old: str, new: str) -> str:
    return json.dumps([
        {"op": "replace", "path": "/status/containerStatuses/0/containerID",
         "value": f"containerd://{new}"},
        {"op": "replace", "path": "/status/containerStatuses/0/restartCount", "value": 1},
        {"op": "add", "path": "/status/containerStatuses/0/lastState", "value": {
            "terminated": {"exitCode": 1, "reason": "Error", "containerID": f"containerd://{old}",
                           "startedAt": "2025-01-01T00:00:00Z",
                           "finishedAt": "2025-01-01T00:01:00Z"}}},
    ])


# ---- a ServiceAccount missing a permission ------------------------------------------

def _limited_account(kube_api: KubeApiServer, verbs: list[str],
                     tmp_path: Path) -> tuple[str, Path]:
    """A ServiceAccount bound to a ClusterRole with only `verbs` on pods; its user name
    and a token for it."""
    name = f"limited-{secrets.token_hex(3)}"
    kube_api.namespace(name)
    kube_api.apply(
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": "agent", "namespace": name}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": name},
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": verbs}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": name},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": "agent", "namespace": name}]})
    return name, kube_api.token(name, "agent", tmp_path / "token")


async def _eventually(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("missing", ["watch", "list"])
async def test_a_missing_permission_is_one_error_naming_it(
    kube_api: KubeApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, missing: str,
) -> None:
    caplog.set_level(logging.DEBUG, "otel_ebpf.enrich.kubernetes")
    granted = [v for v in ("list", "watch") if v != missing]
    name, token = _limited_account(kube_api, granted, tmp_path)
    node = f"node-{secrets.token_hex(4)}"
    first = kube_api.run_pod(name, "first", node, {"app": secrets.token_hex(32)})
    pods = KubernetesPods(KubernetesConfig(mode="on", api_url=kube_api.url,
                                           token_path=token, ca_path=kube_api.ca_path,
                                           node_name=node),
                          env={}, backoff_base=0.01, backoff_cap=0.05)
    task = asyncio.create_task(pods.run())

    def refusals() -> int:  # logged at some level, each
        return sum("HTTP 403" in r.getMessage() for r in caplog.records)

    try:
        await _eventually(lambda: refusals() >= 6)  # six requests refused by the server
        problems = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert [r.levelno for r in problems] == [logging.ERROR], [
            r.getMessage() for r in problems]
        error = problems[0].getMessage()
        user = f'User "system:serviceaccount:{name}:agent" cannot {missing} resource "pods"'
        assert f"refuses to {missing} pods (HTTP 403" in error and user in error, error
        assert "exactly list and watch on pods" in error, error
        # without watch, what the list says is still used
        assert (pods.lookup(first, None).get("k8s.pod.name") == "first") == (missing == "watch")

        # granted: the agent recovers by itself, says so once, and follows the watch
        kube_api.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                        "metadata": {"name": name},
                        "rules": [{"apiGroups": [""], "resources": ["pods"],
                                   "verbs": ["list", "watch"]}]})
        await _eventually(lambda: any(f"allows {missing} on pods now" in r.getMessage()
                                      for r in caplog.records))
        second = await asyncio.to_thread(kube_api.run_pod, name, "second", node,
                                         {"app": secrets.token_hex(32)})
        await _eventually(lambda: bool(pods.lookup(second, None)))
        assert pods.lookup(first, None)["k8s.pod.name"] == "first"
        assert [r.levelno for r in caplog.records if r.levelno >= logging.WARNING] == [
            logging.ERROR]
    finally:
        await pods.close()
        assert task.done()
