"""The agent's one periodic runner: a piece of blocking work (an export, a profile window,
the summary, the workload filter) run every interval on a thread of its own.

Written once for every periodic job, so they all behave alike: a run is never cancelled
half-way (cancelling the loop at shutdown leaves it to finish, and `last` sees it still
busy), a tick that finds the previous run still going is skipped (cumulative data waits
for the next), and a run that fails is logged and the job carries on at the next tick.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class Periodic(Generic[T]):
    """Runs `work` every `interval` seconds on its own thread. `after`, when given, is
    awaited with each run's result (None when the run failed or was skipped)."""

    def __init__(self, name: str, interval: float, work: Callable[[], T],
                 after: Callable[[T | None], Awaitable[None]] | None = None) -> None:
        self.name = name
        self.interval = interval
        self._work = work
        self._after = after
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._future: asyncio.Future[T] | None = None

    @property
    def pool(self) -> ThreadPoolExecutor:
        """Its thread: blocking work that must never overlap a run goes there too."""
        return self._pool

    @property
    def busy(self) -> bool:
        """Whether a run is under way."""
        return self._future is not None and not self._future.done()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            result = await self.once()
            if self._after is not None:
                await self._after(result)

    async def once(self) -> T | None:
        """One run now and its result; None when one was already under way, or failed."""
        if self.busy:
            return None
        loop = asyncio.get_running_loop()
        self._future = future = loop.run_in_executor(self._pool, self._work)
        try:
            # shield: cancelling the caller must not forget a run half-way
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s failed; retrying at the next interval", self.name)
            return None

    async def last(self, deadline: float) -> bool:
        """At shutdown: one more run, waited for until `deadline` (monotonic). False when
        a run was still under way (none is started) or this one did not finish in time."""
        if self.busy:
            return False
        try:
            await asyncio.wait_for(self.once(), max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
