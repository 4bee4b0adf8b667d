"""`otel-ebpf doctor` on this machine: every check reported, and the probe really compiled
and verified."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.kernel


def test_doctor_passes_and_names_every_check() -> None:
    proc = subprocess.run([sys.executable, "-m", "otel_ebpf", "doctor"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for check in ("privileges", "bpf() syscall", "tracefs", "BTF", "kernel headers", "BCC",
                  "kernel lockdown", "perf_event_paranoid", "syscall_latency: tracepoints",
                  "syscall_latency: load", "cpu_profile: perf events", "cpu_profile: load"):
        assert any(line[5:].startswith(check) for line in lines), (check, proc.stdout)
    assert not any(line.startswith("FAIL") for line in lines)
    assert "compiled and verified" in proc.stdout
    assert "all enabled probes can load: syscall_latency, cpu_profile" in proc.stdout


def test_doctor_fails_with_exit_1_when_a_probe_cannot_load(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # headers that are not there: the probe cannot compile, so its load check must FAIL
    config = tmp_path / "c.yaml"
    config.write_text("probes:\n  syscall_latency:\n    max_entries: 64\n")
    env_bad = {"BCC_KERNEL_SOURCE": str(tmp_path / "no-headers-here"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "otel_ebpf", "doctor", "--config", str(config)],
                          capture_output=True, text=True, timeout=120, env=env_bad)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL syscall_latency: load" in proc.stdout
