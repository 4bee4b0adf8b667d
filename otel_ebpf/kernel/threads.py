"""The agent's threads carry their Python names in the kernel too (`collect-cpu_profile`,
`metrics_0`, `unwind-loader`, truncated to the kernel's 15 bytes), so that `top -H`,
`ps -L` and /proc/PID/task/*/comm tell which of them uses the CPU. CPython before 3.14
leaves every thread with the process's name."""

from __future__ import annotations

import contextlib
import ctypes as ct
import sys
import threading
from types import FrameType
from typing import Any

_PR_SET_NAME = 15
_COMM_LEN = 15  # TASK_COMM_LEN less its NUL


def name_this_thread(name: str) -> None:
    """The calling thread's name in the kernel."""
    with contextlib.suppress(OSError, AttributeError):  # no prctl: not Linux's libc
        ct.CDLL(None).prctl(_PR_SET_NAME, ct.c_char_p(name.encode()[:_COMM_LEN]), 0, 0, 0)


def _first_event(frame: FrameType, event: str, arg: Any) -> None:
    # threading installs this in each new thread before its run(); it runs once and
    # leaves, so the thread pays nothing after its first call
    sys.setprofile(None)
    name_this_thread(threading.current_thread().name)


def name_new_threads() -> None:
    """Every thread started from now on (pools' workers too) names itself in the kernel
    at its first call."""
    threading.setprofile(_first_event)
