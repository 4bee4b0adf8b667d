"""What a helper process does first: die with the agent (the compiler processes)."""

from __future__ import annotations

import contextlib
import ctypes as ct
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """A compiler process outliving the agent (killed mid-start) would only waste a CPU."""
    with contextlib.suppress(OSError, AttributeError):
        ct.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the agent was gone before we asked
        os._exit(1)
