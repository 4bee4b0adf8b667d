"""The real CPython interpreters the Python-unwinder tests run: Debian's python3 (the
host set-up installs it) and every other 3.8+ build found on the machine (pyenv's
versions under $PYENV_ROOT or /root/.pyenv, and the paths listed in $OTEL_EBPF_PYTHONS)."""

from __future__ import annotations

import os
import re
import subprocess
from functools import cache
from pathlib import Path

DEBIAN_PYTHON = Path("/usr/bin/python3")


@cache
def version_of(exe: Path) -> tuple[int, int] | None:
    try:
        out = subprocess.run([str(exe), "-c", "import sys; print(*sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    major, minor = out.split()
    return int(major), int(minor)


@cache
def interpreters() -> dict[str, Path]:
    """id ("debian-3.11", "pyenv-3.8.18") -> executable, 3.8 or newer."""
    found: dict[str, Path] = {}
    version = version_of(DEBIAN_PYTHON)
    if version is not None:
        found[f"debian-{version[0]}.{version[1]}"] = DEBIAN_PYTHON
    root = Path(os.environ.get("PYENV_ROOT", "/root/.pyenv")) / "versions"
    if root.is_dir():
        for d in sorted(root.iterdir()):
            m = re.fullmatch(r"(3)\.(\d+)\.\d+", d.name)
            exe = d / "bin" / f"python3.{m.group(2)}" if m else None
            if m and int(m.group(2)) >= 8 and exe is not None and exe.is_file():
                found[f"pyenv-{d.name}"] = exe
    for extra in filter(None, os.environ.get("OTEL_EBPF_PYTHONS", "").split(":")):
        exe = Path(extra)
        v = version_of(exe)
        if v is not None:
            found[f"{exe.name}-{v[0]}.{v[1]}"] = exe
    return found
