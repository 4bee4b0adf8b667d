from __future__ import annotations

import subprocess
import sys

import pytest

from otel_ebpf import cli


def test_help_tells_the_commands_and_exit_codes() -> None:
    proc = subprocess.run([sys.executable, "-m", "otel_ebpf", "--help"], capture_output=True,
                          text=True, check=True)
    for word in ("run", "doctor", "probes", "version", "Exit codes"):
        assert word in proc.stdout


def test_run_help_lists_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--config", "--duration", "--otlp-endpoint", "--otlp-protocol",
                 "--export-interval", "--no-summary"):
        assert flag in out


def test_probes_lists_hooks_and_exports(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["probes"]) == 0
    out = capsys.readouterr().out
    assert "syscall_latency" in out
    assert "raw_tracepoint:raw_syscalls/sys_enter" in out
    assert "linux.syscall.duration (s)" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["version"]) == 0
    assert capsys.readouterr().out.startswith("otel-ebpf ")
