"""Real tier of the Kubernetes artefacts: a real kube-apiserver (etcd + kube-apiserver
built from Go modules, tests/peers/kube.py) admits what kustomize and Helm render, and its
RBAC authorizer grants the agent's ServiceAccount list and watch on pods and nothing else.

No node, no image: pods are not run here (tests/e2e/test_kubernetes.py drives the agent
against the same API server)."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.test_deploy import DEPLOY, _build, _run
from tests.peers.kube import KubeApiServer

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "otel-ebpf"
AGENT = f"system:serviceaccount:{NAMESPACE}:otel-ebpf"
# every identity may ask who it is and what it may do (system:basic-user,
# system:discovery, system:public-info-viewer): not granted by the chart
SELF_REVIEWS = {"selfsubjectreviews.authentication.k8s.io",
                "selfsubjectaccessreviews.authorization.k8s.io",
                "selfsubjectrulesreviews.authorization.k8s.io"}


def _dump(objs: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(objs)


@pytest.fixture(scope="module")
def renders(kube_api: KubeApiServer) -> dict[str, list[dict[str, Any]]]:
    kustomized = kube_api.kubectl("kustomize", str(DEPLOY / "kubernetes")).stdout
    helm = _build(ROOT / "tests" / "peers" / "build-helm.sh")
    out: dict[str, list[dict[str, Any]]] = {
        "kustomize": [d for d in yaml.safe_load_all(kustomized) if d]}
    # Helm's release in a namespace of its own: kube_agent_objects may have applied the
    # kustomize base's DaemonSet in NAMESPACE already, and a DaemonSet's selector (Helm's
    # has the release's instance label) cannot change in place
    for name, extra in (("helm", ["--set", "namespace.create=true"]), ("helm-defaults", [])):
        done = _run([str(helm), "template", "otel-ebpf", str(DEPLOY / "helm" / "otel-ebpf"),
                     "--namespace", f"{NAMESPACE}-{name}", *extra])
        assert done.returncode == 0, done.stderr
        out[name] = [d for d in yaml.safe_load_all(done.stdout) if d]
    # the namespaced objects need their namespace to exist (as `helm install
    # --create-namespace` or the kustomize base's own Namespace would make it)
    for namespace in (NAMESPACE, f"{NAMESPACE}-helm", f"{NAMESPACE}-helm-defaults"):
        kube_api.kubectl("create", "namespace", namespace, check=False)
    return out


@pytest.mark.parametrize("render", ["kustomize", "helm", "helm-defaults"])
def test_server_dry_run_admits_every_object(kube_api: KubeApiServer, render: str,
                                            renders: dict[str, list[dict[str, Any]]]) -> None:
    objs = renders[render]
    done = kube_api.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-",
                            stdin=_dump(objs))
    # "clusterrole.rbac.authorization.k8s.io/otel-ebpf created (server dry run)"
    admitted = re.findall(r"^([a-z]+)(?:\.[\w.]+)?/(\S+) \w+ \(server dry run\)$",
                          done.stdout, re.MULTILINE)
    expected = [(o["kind"].lower(), o["metadata"]["name"]) for o in objs]
    assert sorted(admitted) == sorted(expected), done.stdout


def test_server_dry_run_refuses_a_broken_daemonset(kube_api: KubeApiServer,
                                                   renders: dict[str, list[dict[str, Any]]]
                                                   ) -> None:
    """The dry run above is the server's own validation: an unknown field and a capability
    list of the wrong type are refused."""
    ds = copy.deepcopy(next(o for o in renders["kustomize"] if o["kind"] == "DaemonSet"))
    ds["spec"]["template"]["spec"]["hostPid"] = True  # the real field is hostPID
    done = kube_api.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-",
                            stdin=_dump([ds]), check=False)
    assert done.returncode != 0 and 'unknown field "spec.template.spec.hostPid"' in \
        done.stderr, done.stdout + done.stderr
    ds = copy.deepcopy(next(o for o in renders["kustomize"] if o["kind"] == "DaemonSet"))
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"] \
        = "BPF"
    done = kube_api.kubectl("apply", "--dry-run=server", "-f", "-", stdin=_dump([ds]),
                            check=False)
    assert done.returncode != 0, done.stdout


def _can(kube_api: KubeApiServer, *args: str) -> bool:
    done = kube_api.kubectl("auth", "can-i", f"--as={AGENT}", *args, check=False)
    assert done.stdout.strip() in ("yes", "no"), done.stdout + done.stderr
    return done.stdout.strip() == "yes"


@pytest.mark.parametrize("verb", ["list", "watch"])
@pytest.mark.parametrize("scope", [["--all-namespaces"], ["--namespace=default"],
                                   [f"--namespace={NAMESPACE}"]])
def test_agent_may_list_and_watch_pods(kube_api: KubeApiServer, kube_agent_objects: object,
                                       verb: str, scope: list[str]) -> None:
    assert _can(kube_api, verb, "pods", *scope)


@pytest.mark.parametrize("args", [
    ["get", "pods"], ["create", "pods"], ["delete", "pods"], ["patch", "pods"],
    ["update", "pods", "--subresource=status"], ["get", "pods", "--subresource=log"],
    ["create", "pods", "--subresource=exec"], ["create", "pods", "--subresource=eviction"],
    ["list", "secrets"], ["get", "secrets"], ["list", "configmaps"], ["list", "nodes"],
    ["get", "nodes", "--subresource=proxy"], ["list", "services"], ["list", "events"],
    ["list", "deployments.apps"], ["list", "daemonsets.apps"], ["create", "tokenreviews"],
    ["impersonate", "serviceaccounts"], ["escalate", "clusterroles"], ["*", "*"],
])
def test_agent_may_do_nothing_else(kube_api: KubeApiServer, kube_agent_objects: object,
                                   args: list[str]) -> None:
    assert not _can(kube_api, *args, "--all-namespaces")
    assert not _can(kube_api, *args, f"--namespace={NAMESPACE}")


@pytest.mark.parametrize("namespace", [NAMESPACE, "default"])
def test_agent_rules_are_pod_list_and_watch_only(kube_api: KubeApiServer,
                                                 kube_agent_objects: object,
                                                 namespace: str) -> None:
    """Every rule the authorizer holds for the agent: pods list/watch, plus what any
    authenticated identity may do (self reviews, discovery URLs)."""
    done = kube_api.kubectl("auth", "can-i", "--list", f"--as={AGENT}",
                            f"--namespace={namespace}", "--no-headers")
    resources: dict[str, str] = {}
    for line in done.stdout.splitlines():
        cols = re.split(r"\s{2,}", line.strip())
        if cols and not cols[0].startswith("["):  # a non-resource URL row starts with []
            resources[cols[0]] = cols[-1]
    assert resources.pop("pods") == "[list watch]", done.stdout
    assert set(resources) == SELF_REVIEWS, done.stdout
    assert set(resources.values()) == {"[create]"}, done.stdout
