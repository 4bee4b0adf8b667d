"""The agent's heap, kept to what it uses: glibc's malloc otherwise keeps what threads
freed (one arena per thread that ever contended, up to 8 x CPUs of them), and the agent's
threads free in bursts: a drain's decoded keys, a table compile's section bytes, an
export's protobuf. Measured at rest with every default probe: 22 MB of freed memory
retained after 40 s, 12 MB more with an arena per thread."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes as ct
import logging

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # mallopt parameter (malloc.h)
ARENAS = 2
TRIM_EVERY_S = 30.0


def _libc() -> ct.CDLL | None:
    try:
        return ct.CDLL(None)
    except OSError:
        return None


def limit_arenas(arenas: int = ARENAS) -> None:
    """At most `arenas` malloc arenas from now on (call before the threads start)."""
    libc = _libc()
    with contextlib.suppress(AttributeError):  # not glibc
        if libc is not None and not libc.mallopt(M_ARENA_MAX, arenas):
            log.debug("mallopt(M_ARENA_MAX) refused")


def trim() -> None:
    """Give freed heap pages back to the system, in every arena."""
    libc = _libc()
    with contextlib.suppress(AttributeError):
        if libc is not None:
            libc.malloc_trim(0)


async def trim_periodically(every: float = TRIM_EVERY_S) -> None:
    while True:
        await asyncio.sleep(every)
        trim()
