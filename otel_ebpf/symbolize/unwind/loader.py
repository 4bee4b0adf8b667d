"""Loads processes into the in-kernel unwinder on a thread of its own.

Compiling a file's table takes up to a few hundred milliseconds (python3.11: 0.3 s), and
a machine's first minute can hold seconds of them: the new-process announcements (whose
maps the symbolizer must read while the process lives) and the drains must never wait
for that. Requests are deduplicated and bounded; past the bound they are dropped and
counted (the process is asked for again at its next drain).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

from otel_ebpf.symbolize.unwind import worker
from otel_ebpf.symbolize.unwind.tables import KernelUnwindTables

log = logging.getLogger(__name__)

MAX_PENDING = 4096
# Compiling tables may take this share of one core on average, after a start-up burst of
# COMPILE_BURST_S: a node that starts many new binaries waits longer for their tables
# (frames in those files take frame pointers meanwhile) rather than the agent taking a
# core. Processes whose files are all compiled are loaded at once all the same.
COMPILE_SHARE = 0.05
COMPILE_BURST_S = 5.0


class UnwindLoader:
    def __init__(self, tables: KernelUnwindTables, max_pending: int = MAX_PENDING) -> None:
        self.tables = tables
        self.dropped = 0  # requests refused: too many pending
        self._max_pending = max_pending
        self._pending: OrderedDict[int, None] = OrderedDict()  # announced processes
        self._sampled: set[int] = set()  # processes of the last drains
        self._wake = threading.Condition()
        self._stopping = False
        self._busy = False
        self._budget = COMPILE_BURST_S  # compile seconds available now
        self._budget_at = time.monotonic()
        tables.may_compile = self._may_compile
        self._thread = threading.Thread(target=self._run, name="unwind-loader", daemon=True)
        self._thread.start()

    def add(self, pid: int) -> None:
        """Load this process's mappings soon (a process just announced)."""
        with self._wake:
            if pid not in self._pending and len(self._pending) >= self._max_pending:
                self.dropped += 1
                return
            self._pending[pid] = None
            self._wake.notify()

    def sampled(self, pids: set[int]) -> None:
        """The processes a drain saw (KernelUnwindTables.sampled, soon)."""
        with self._wake:
            if len(self._sampled) < self._max_pending:
                self._sampled |= pids
            self._wake.notify()

    def idle(self) -> bool:
        """Nothing pending or being loaded (for tests and benchmarks)."""
        with self._wake:
            return not (self._pending or self._sampled or self._busy)

    def _may_compile(self) -> bool:
        """Whether compiling is within its CPU share (the loader thread asks)."""
        now = time.monotonic()
        self._budget = min(COMPILE_BURST_S,
                           self._budget + (now - self._budget_at) * COMPILE_SHARE)
        self._budget_at = now
        return self._budget > 0

    def _run(self) -> None:
        while True:
            self.tables.rest()
            with self._wake:
                if not (self._pending or self._sampled or self._stopping):
                    self._wake.wait(worker.IDLE_S)  # then rest() again
                if self._stopping:
                    return
                if not (self._pending or self._sampled):
                    continue
                pid = self._pending.popitem(last=False)[0] if self._pending else None
                sampled: set[int] = set()
                if pid is None:
                    sampled, self._sampled = self._sampled, set()
                self._busy = True
            compiled = self.tables.stats.compile_seconds
            try:
                if pid is not None:
                    self.tables.add_process(pid)
                else:
                    self.tables.sampled(sampled)
            except (OSError, ValueError) as exc:  # a map write refused: logged, not fatal
                log.warning("unwind: loading process mappings failed: %s", exc)
            finally:
                with self._wake:
                    self._busy = False
                    self._budget -= self.tables.stats.compile_seconds - compiled

    def close(self) -> None:
        """Stop the thread (a compile under way finishes first), then the tables."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()
        self.tables.close()
