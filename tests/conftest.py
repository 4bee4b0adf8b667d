"""Test tiers: unit (always), kernel (root + BPF), e2e (the agent as a process).

Kernel and e2e tests skip with the reason when this machine cannot load BPF programs; with
OTEL_EBPF_REQUIRE_KERNEL=1 (set by .ci/run) that skip becomes a failure, so CI can never
pass by skipping.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.peers.kube import KubeApiServer

ROOT = Path(__file__).resolve().parents[1]
HELPERS = Path(__file__).parent / "helpers"
HELPER_BIN = HELPERS / "bin"
REQUIRE_KERNEL = os.environ.get("OTEL_EBPF_REQUIRE_KERNEL") == "1"


@functools.cache
def kernel_unavailable_reason() -> str | None:
    """Why BPF tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (BPF programs)"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "BCC (python3-bpfcc) is not importable; run `make test`"
    from otel_ebpf.kernel import preflight

    for check in (preflight.check_bpf_syscall(), preflight.check_tracefs(),
                  preflight.check_btf()):
        if check.status == preflight.FAIL:
            return f"{check.name}: {check.detail}"
    from otel_ebpf.kernel import headers

    if headers.discover() is None:
        return "no kernel headers for BCC; run `make setup`"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    needs_kernel = [i for i in items if i.get_closest_marker("kernel")]
    if not needs_kernel:
        return
    reason = kernel_unavailable_reason()
    if reason is None:
        return
    for item in needs_kernel:
        if REQUIRE_KERNEL:
            item.add_marker(pytest.mark.usefixtures("_kernel_required_but_missing"))
        else:
            item.add_marker(pytest.mark.skip(reason=f"kernel test skipped: {reason}"))


@pytest.fixture
def _kernel_required_but_missing() -> None:
    pytest.fail(f"OTEL_EBPF_REQUIRE_KERNEL=1 but {kernel_unavailable_reason()}")


@functools.cache
def build_helper(name: str) -> Path:
    """Compile tests/helpers/<name>.c once per session (frame pointers kept for the
    profiler tests)."""
    return build_binary(name, (f"{name}.c",), ("-O1", "-g", "-fno-omit-frame-pointer"))


@functools.cache
def build_binary(name: str, sources: tuple[str, ...], flags: tuple[str, ...]) -> Path:
    """Compile tests/helpers/`sources` with `flags` into tests/helpers/bin/`name`, when
    it is missing or older than a source."""
    paths = [HELPERS / source for source in sources]
    binary = HELPER_BIN / name
    HELPER_BIN.mkdir(exist_ok=True)
    if not binary.exists() or binary.stat().st_mtime < max(p.stat().st_mtime for p in paths):
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            pytest.fail("no C compiler; run `make test`, which installs gcc")
        subprocess.run([cc, *flags, "-o", str(binary), *map(str, paths)], check=True)
    return binary


@pytest.fixture(scope="session")
def syscall_workload() -> Path:
    return build_helper("syscall_workload")


@pytest.fixture(scope="session")
def slow_workload() -> Path:
    return build_helper("slow_workload")


@pytest.fixture(scope="session")
def cpu_hot() -> Path:
    return build_helper("cpu_hot")


@pytest.fixture(scope="session")
def syscall_mix() -> Path:
    return build_helper("syscall_mix")


@pytest.fixture(scope="session")
def kube_api() -> Iterator[KubeApiServer]:
    """A real etcd + kube-apiserver on loopback (tests/peers/kube.py), one per session:
    built from Go modules on first use (cached outside the repository), ready in seconds."""
    from tests.peers.kube import KubeApiServer, ensure_built

    with KubeApiServer(ensure_built()) as api:
        yield api
    print(f"--- kube control plane output ---\n{api.read_logs()[-20000:]}")


@pytest.fixture(scope="session")
def kube_agent_objects(kube_api: KubeApiServer) -> list[dict[str, object]]:
    """deploy/kubernetes rendered by kustomize and applied for real: the agent's Namespace,
    ServiceAccount, ClusterRole and binding, ConfigMap and DaemonSet (no controller runs
    it here)."""
    import yaml

    rendered = kube_api.kubectl("kustomize", str(ROOT / "deploy" / "kubernetes")).stdout
    kube_api.kubectl("apply", "-f", "-", stdin=rendered)
    return [d for d in yaml.safe_load_all(rendered) if d]
