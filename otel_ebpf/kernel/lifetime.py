"""The agent's helper processes (the BCC compiler, the unwind tables' compiler): how they
are started, and the first thing they do, die with the agent."""

from __future__ import annotations

import contextlib
import ctypes as ct
import os
import signal
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_ROOT = str(Path(__file__).resolve().parents[2])  # where `import otel_ebpf` finds this tree


def boot(module: str, function: str) -> str:
    """The `python -c` line that runs `module.function()` of this tree in a helper."""
    return (f"import sys; sys.path.insert(0, {_ROOT!r}); "
            f"from {module} import {function}; {function}()")


def die_with_parent() -> None:
    """A compiler process outliving the agent (killed mid-start) would only waste a CPU."""
    with contextlib.suppress(OSError, AttributeError):
        ct.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the agent was gone before we asked
        os._exit(1)
