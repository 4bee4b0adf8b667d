"""The package as users get it: a wheel built from this checkout, installed by pip into a
fresh venv of the system Python (with its site-packages, for Debian's python3-bpfcc), run
from a directory where the checkout is not importable.

The other tests run the checkout (an editable install), where a file the wheel lacks, or a
path that only exists in the source tree, still works. Here every default probe must
compile from what the wheel ships, as it must in the container image, which pip-installs
the same files.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from otel_ebpf import probes as registry
from otel_ebpf.config import Config
from tests.e2e.test_agent import N_GETPPID, AgentProcess, getppid_points, run_workload
from tests.peers.otlp_sink import OtlpSink
from tests.peers.rotel import RotelCollector

pytestmark = [pytest.mark.e2e, pytest.mark.kernel]

CHECKOUT = Path(__file__).resolve().parents[2]
# what the Dockerfile copies before `pip install .`
SHIPPED = ("pyproject.toml", "README.md", "otel_ebpf", "probes")
SYSTEM_PY = "/usr/bin/python3"  # the interpreter python3-bpfcc is built for (as the Makefile)
PIP = (sys.executable, "-m", "pip", "--disable-pip-version-check", "-q")


def _run(command: list[str], cwd: Path | None = None, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd,
                          env=env)
    assert proc.returncode == 0, f"{' '.join(command)}:\n{proc.stdout}{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed. The wheel is built from a copy of the shipped
    files: an in-tree build would leave build/ in the checkout, whose stale files a later
    wheel can pick up."""
    root = tmp_path_factory.mktemp("installed")
    src = root / "src"
    src.mkdir()
    for name in SHIPPED:
        if (CHECKOUT / name).is_dir():
            shutil.copytree(CHECKOUT / name, src / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(CHECKOUT / name, src / name)
    _run([*PIP, "wheel", "--no-deps", "-w", str(root / "dist"), str(src)])
    (wheel,) = (root / "dist").glob("*.whl")
    venv = root / "venv"
    # without its own pip (seconds saved): this pip installs into it
    _run([SYSTEM_PY, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)])
    _run([*PIP[:3], "--python", str(venv / "bin" / "python"), *PIP[3:], "install", str(wheel)])
    return venv


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """A working directory without the checkout (nor its config/otel-ebpf.yaml)."""
    path = tmp_path / "elsewhere"
    path.mkdir()
    return path


def test_installed_doctor_compiles_every_default_probe(venv: Path, elsewhere: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    imported = _run([str(venv / "bin" / "python"), "-c",
                     "import otel_ebpf; print(otel_ebpf.__file__)"], cwd=elsewhere, env=env)
    assert Path(imported.stdout.strip()).is_relative_to(venv), "not the installed copy"

    proc = subprocess.run([str(venv / "bin" / "otel-ebpf"), "doctor"], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "configuration: embedded defaults" in proc.stderr
    for name in registry.enabled_names(Config()):
        assert re.search(rf"^ok +{name}: load +compiled and verified", proc.stdout,
                         re.MULTILINE), (name, proc.stdout + proc.stderr)


def test_installed_agent_exports_through_rotel(
    venv: Path, elsewhere: Path, tmp_path: Path, rotel: RotelCollector, otlp_sink: OtlpSink,
    syscall_workload: Path,
) -> None:
    agent = AgentProcess(tmp_path, "--duration", "3s", "--export-interval", "1s",
                         "--otlp-endpoint", rotel.grpc_endpoint, "--otlp-protocol", "grpc",
                         program=[str(venv / "bin" / "otel-ebpf")], cwd=elsewhere)
    try:
        agent.wait_for_log("probe syscall_latency attached", timeout=120)
        pid = run_workload(syscall_workload)
        assert agent.proc.wait(timeout=30) == 0, "".join(agent.stderr)
    finally:
        agent.kill()
    assert otlp_sink.wait_for(
        lambda: any(p.count == N_GETPPID for _, p in getppid_points(otlp_sink, pid)),
        timeout=10), f"no getppid count {N_GETPPID} for pid {pid}:\n{''.join(agent.stderr)}"
