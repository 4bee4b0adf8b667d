"""The agent's heap, kept to what it uses: glibc's malloc otherwise keeps what threads
freed (one arena per thread that ever contended, up to 8 x CPUs of them), and the agent's
threads free in bursts: a drain's decoded keys, a table compile's section bytes, an
export's protobuf. Measured at rest with every default probe: 22 MB of freed memory
retained after 40 s, 12 MB more with an arena per thread; and, with glibc's sliding
thresholds (below), anonymous memory 40 s after a restart anywhere from 51 to 70 MB over 8
runs, with a thread arena holding up to 20 MB of /proc text long parsed; 53-54 MB over 4
runs with them fixed and a trim every 10 s."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes as ct
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # mallopt parameters
ARENAS = 2
# Fixed, which also turns off glibc's sliding thresholds: after a large block is freed,
# glibc raises the mmap threshold to its size (up to 32 MB) and the trim threshold to
# twice that, so one large buffer freed made every later one stay in the heap, and the
# heap keep up to 64 MB of free top. With them fixed, a block of 128 KiB or more (a
# drain's keys, a /proc file read whole) is its own mapping, gone when freed.
MMAP_THRESHOLD = 128 << 10
TRIM_THRESHOLD = 256 << 10
TRIM_EVERY_S = 10.0


def _libc() -> ct.CDLL | None:
    try:
        return ct.CDLL(None)
    except OSError:
        return None


def configure_malloc(arenas: int = ARENAS) -> None:
    """At most `arenas` malloc arenas from now on, and fixed mmap and trim thresholds
    (call before the threads start)."""
    libc = _libc()
    with contextlib.suppress(AttributeError):  # not glibc
        for param, value in ((M_ARENA_MAX, arenas), (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                             (M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
            if libc is not None and not libc.mallopt(param, value):
                log.debug("mallopt(%d, %d) refused", param, value)


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
