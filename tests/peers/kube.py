"""A real Kubernetes control plane as a test peer: etcd and kube-apiserver on loopback.

The binaries are built from the Go module proxy by ``tests/peers/build-kube.sh`` (cached
outside the repository, see there for the cost); ``ensure_built()`` builds them on first
use. ``KubeApiServer`` runs them in a private temporary directory with everything a cluster
makes at install time, generated afresh:

* a CA, the API server's serving certificate (127.0.0.1, localhost and the in-cluster
  names) and an admin client certificate (group ``system:masters``) for ``kubectl``;
* the service-account signing key pair, so that the TokenRequest API
  (``kubectl create token``) mints real, bound service-account tokens, which the API
  server then authenticates as it does in any cluster;
* RBAC, after the Node authorizer (which only ever answers for kubelets' identities), as
  the authorizers, so ``kubectl auth can-i`` answers as a cluster would.

There is no controller-manager, scheduler or kubelet: pods are created with
``spec.nodeName`` set, their status is written through the ``status`` subresource, and
the ``default`` service account a namespace needs before it accepts pods is created by
``namespace()``. etcd listens on plain HTTP on loopback (no traffic leaves the machine).
The ``--service-cluster-ip-range`` is configuration only: nothing runs there.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.peers.process import LOOPBACK, PeerProcess, WorkDir

BUILD = Path(__file__).with_name("build-kube.sh")
ISSUER = "https://kubernetes.default.svc.cluster.local"


def ensure_built(*names: str) -> Path:
    """The directory holding etcd and kube-apiserver (and `names`), built if missing."""
    done = subprocess.run(["bash", str(BUILD), *names], capture_output=True, text=True,
                          timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{BUILD.name} failed:\n{done.stderr[-3000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


class _Pki:
    """A CA and the certificates it signs, as PEM files in `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca_name = _name("otel-ebpf-test-ca")
        self.ca = self._sign(self.ca_name, self.ca_key.public_key(), ca=True)
        self.ca_path = directory / "ca.crt"
        self.ca_path.write_bytes(self.ca.public_bytes(serialization.Encoding.PEM))

    def _sign(self, subject: x509.Name, public: ec.EllipticCurvePublicKey, *, ca: bool = False,
              usage: x509.ObjectIdentifier | None = None,
              sans: list[x509.GeneralName] | None = None) -> x509.Certificate:
        now = datetime.now(UTC)
        builder = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(self.ca_name)
            .public_key(public).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=ca, crl_sign=ca, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        )
        if not ca:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()),
                critical=False)
        if usage is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(self.ca_key, hashes.SHA256())

    def issue(self, stem: str, subject: x509.Name, usage: x509.ObjectIdentifier,
              sans: list[x509.GeneralName] | None = None) -> tuple[Path, Path]:
        """<stem>.crt and <stem>.key."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._sign(subject, key.public_key(), usage=usage, sans=sans)
        crt, key_path = self.directory / f"{stem}.crt", self.directory / f"{stem}.key"
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key)
        return crt, key_path


class KubeApiServer:
    """etcd + kube-apiserver on free loopback ports; `kubectl()` acts as cluster admin."""

    def __init__(self, bindir: Path, startup_timeout: float = 180.0) -> None:
        self.bindir = bindir
        self.startup_timeout = startup_timeout
        self._etcd = PeerProcess(startup_timeout=30.0)
        self._apiserver = PeerProcess(startup_timeout=startup_timeout)
        self.workdir = WorkDir("kube-api")
        self.port = 0
        self._final_logs: str | None = None
        self._pki: _Pki | None = None

    @property
    def url(self) -> str:
        return f"https://{LOOPBACK}:{self.port}"

    @property
    def ca_path(self) -> Path:
        return self.workdir / "ca.crt"

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    def __enter__(self) -> KubeApiServer:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        d = self.workdir.make()
        pki = self._pki = _Pki(d)
        serving = pki.issue("apiserver", _name("kube-apiserver"), ExtendedKeyUsageOID.SERVER_AUTH,
                            [x509.IPAddress(IPv4Address(LOOPBACK)), x509.DNSName("localhost"),
                             x509.DNSName("kubernetes"), x509.DNSName("kubernetes.default.svc")])
        admin = pki.issue("admin", _name("otel-ebpf-test-admin", "system:masters"),
                          ExtendedKeyUsageOID.CLIENT_AUTH)
        signing = ec.generate_private_key(ec.SECP256R1())
        _write_key(d / "sa.key", signing)
        (d / "sa.pub").write_bytes(signing.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        etcd_ports = self._etcd.launch(
            lambda client, peer: [
                str(self.bindir / "etcd"), "--name=test", f"--data-dir={d / 'etcd'}",
                f"--listen-client-urls=http://{LOOPBACK}:{client}",
                f"--advertise-client-urls=http://{LOOPBACK}:{client}",
                f"--listen-peer-urls=http://{LOOPBACK}:{peer}",
                f"--initial-advertise-peer-urls=http://{LOOPBACK}:{peer}",
                f"--initial-cluster=test=http://{LOOPBACK}:{peer}",
                "--unsafe-no-fsync", "--log-level=warn"],
            d / "etcd.log", cwd=d)
        if etcd_ports is None:
            self._fail("etcd did not start")
        assert etcd_ports is not None
        ports = self._apiserver.launch(
            lambda port: [
                str(self.bindir / "kube-apiserver"), f"--etcd-servers=http://{LOOPBACK}:"
                f"{etcd_ports[0]}", f"--bind-address={LOOPBACK}",
                f"--advertise-address={LOOPBACK}", f"--secure-port={port}",
                f"--tls-cert-file={serving[0]}", f"--tls-private-key-file={serving[1]}",
                f"--client-ca-file={pki.ca_path}", f"--cert-dir={d / 'certs'}",
                f"--service-account-issuer={ISSUER}", f"--service-account-key-file={d / 'sa.pub'}",
                f"--service-account-signing-key-file={d / 'sa.key'}",
                "--service-cluster-ip-range=10.96.0.0/16", "--authorization-mode=Node,RBAC",
                "--endpoint-reconciler-type=none", "--profiling=false"],
            d / "apiserver.log", count=1, cwd=d)
        if ports is None:
            self._fail("kube-apiserver did not start")
        assert ports is not None
        self.port = ports[0]
        self._write_kubeconfig(self.kubeconfig, admin)
        self._wait_ready(admin)

    def _write_kubeconfig(self, path: Path, cert: tuple[Path, Path]) -> None:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "default",
            "clusters": [{"name": "test", "cluster": {"server": self.url,
                                                      "certificate-authority": str(self.ca_path)}}],
            "users": [{"name": "user", "user": {"client-certificate": str(cert[0]),
                                                "client-key": str(cert[1])}}],
            "contexts": [{"name": "default", "context": {"cluster": "test", "user": "user"}}],
        }))

    def client_kubeconfig(self, stem: str, user: str, group: str | None = None) -> Path:
        """<stem>.kubeconfig in the private directory: a client certificate for `user` (in
        `group`) signed by the cluster's CA, e.g. a kubelet's ``system:node:<name>`` in
        ``system:nodes``, whom the Node authorizer then confines to its own pods."""
        if self._pki is None:
            raise RuntimeError("KubeApiServer not started")
        cert = self._pki.issue(stem, _name(user, group), ExtendedKeyUsageOID.CLIENT_AUTH)
        path = self.workdir / f"{stem}.kubeconfig"
        self._write_kubeconfig(path, cert)
        return path

    def _wait_ready(self, admin: tuple[Path, Path]) -> None:
        """/readyz answers ok once every post-start hook (bootstrap RBAC roles, priority
        classes, ...) has run."""
        context = ssl.create_default_context(cafile=str(self.ca_path))
        context.load_cert_chain(str(admin[0]), str(admin[1]))
        deadline = time.monotonic() + self.startup_timeout
        last = ""
        while time.monotonic() < deadline:
            if self._apiserver.proc is None or self._apiserver.proc.poll() is not None:
                self._fail("kube-apiserver exited")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", context=context,
                                            timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            time.sleep(0.5)
        self._fail(f"kube-apiserver not ready within {self.startup_timeout:.0f}s ({last})")

    def _fail(self, why: str) -> None:
        logs = self.read_logs()
        self.stop()
        raise RuntimeError(f"{why}; output:\n{logs[-6000:]}")

    def read_logs(self) -> str:
        if self._final_logs is not None:
            return self._final_logs
        out = []
        for name in ("etcd.log", "apiserver.log"):
            path = self.workdir / name
            if path.exists():
                out.append(f"--- {name} ---\n{path.read_text(errors='replace')}")
        return "\n".join(out)

    def stop(self) -> None:
        """SIGTERM the API server, then etcd (SIGKILL after a grace); remove the directory,
        keeping the logs for read_logs()."""
        if not self.workdir.exists:
            return
        self._apiserver.terminate(timeout=20.0)
        self._etcd.terminate(timeout=10.0)
        self._final_logs = self.read_logs()
        self.workdir.remove()

    # ---- helpers for tests -------------------------------------------------------------

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True,
                timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """`kubectl` as cluster admin; raises with its output when `check` and it fails."""
        kubectl = shutil.which("kubectl")
        if kubectl is None:
            raise RuntimeError("kubectl is not installed")
        done = subprocess.run([kubectl, f"--kubeconfig={self.kubeconfig}", *args], input=stdin,
                              capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({done.returncode}):\n"
                               f"{done.stdout}{done.stderr}")
        return done

    def apply(self, *objects: dict[str, Any]) -> None:
        self.kubectl("apply", "-f", "-", stdin=json.dumps(
            {"apiVersion": "v1", "kind": "List", "items": list(objects)}))

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        ns = [f"--namespace={namespace}"] if namespace else []
        obj: dict[str, Any] = json.loads(self.kubectl("get", kind, name, *ns, "-o",
                                                      "json").stdout)
        return obj

    def namespace(self, name: str) -> None:
        """A namespace that accepts pods: with the `default` service account the
        controller-manager would otherwise create."""
        self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
                   {"apiVersion": "v1", "kind": "ServiceAccount",
                    "metadata": {"name": "default", "namespace": name}})

    def token(self, namespace: str, service_account: str, path: Path) -> Path:
        """A bound token of the service account (TokenRequest API), written to `path`."""
        token = self.kubectl("create", "token", service_account, f"--namespace={namespace}",
                             "--duration=1h").stdout.strip()
        path.write_text(token + "\n")
        return path

    def run_pod(self, namespace: str, name: str, node: str, containers: dict[str, str],
                labels: dict[str, str] | None = None) -> str:
        """A pod bound to `node` whose containers (name -> 64-hex id) run, as a kubelet
        using containerd would report them; returns the uid the API server gave it."""
        self.apply({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
            "spec": {"nodeName": node, "containers": [
                {"name": c, "image": "registry.invalid/workload:1"} for c in containers]},
        })
        started = "2025-01-01T00:00:00Z"
        status = {"phase": "Running", "containerStatuses": [
            {"name": c, "containerID": f"containerd://{cid}", "ready": True, "started": True,
             "restartCount": 0, "image": "registry.invalid/workload:1", "imageID": "",
             "state": {"running": {"startedAt": started}}}
            for c, cid in containers.items()]}
        self.kubectl("patch", "pod", name, f"--namespace={namespace}", "--subresource=status",
                     "--type=merge", "-p", json.dumps({"status": status}))
        uid: str = self.get("pod", name, namespace)["metadata"]["uid"]
        return uid
