"""Where the engine finds the .bpf.c sources and rate_limit.h, short of a real install
(tests/e2e/test_installed.py builds and installs a wheel)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from otel_ebpf.kernel.engine import BPF_PACKAGE, bpf_source, bpf_source_dir

PROBES = Path(__file__).resolve().parents[2] / "probes"
PRINT_DIR = "from otel_ebpf.kernel.engine import bpf_source_dir; print(bpf_source_dir())"


def test_the_checkout_resolves_through_the_import_system() -> None:
    # a regular package (a namespace one has no origin): the way a wheel resolves it
    spec = importlib.util.find_spec(BPF_PACKAGE)
    assert spec is not None and spec.origin == str(PROBES / "__init__.py")
    assert bpf_source_dir() == PROBES
    assert (bpf_source_dir() / "rate_limit.h").is_file()
    assert '#include "rate_limit.h"' in bpf_source("syscall_latency")


def test_a_source_tree_that_nothing_installed_uses_its_probes_dir() -> None:
    # -S: no site-packages, so neither the editable install nor any other is seen
    proc = subprocess.run([sys.executable, "-S", "-c", PRINT_DIR], cwd=PROBES.parent,
                          capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == str(PROBES)
