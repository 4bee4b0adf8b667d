"""Unwind tables compiled in a child process, so that their heap never enters the agent.

Compiling a file's call-frame information builds and frees millions of small Python
objects (python3.11's 10k FDEs and their rows); a long-lived process keeps the freed
arenas, so an agent's first start held ~18 MB more heap 40 s later than a restart that
read the same tables from the disk cache (bench/run.py --suite footprint).

One child serves a run of compiles (a first start compiles dozens of files in a few
seconds) and exits once idle for IDLE_S: the unwind loader calls `rest()` between its
requests. The child (child.py) gets each file as a descriptor (SCM_RIGHTS), so it opens
nothing, and answers with the table in the disk cache's encoding (entry.py). Should the
child fail to start or die, the file is compiled in the agent, as before, and that is
logged once.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import threading
import time
from typing import BinaryIO

from otel_ebpf.kernel.lifetime import boot
from otel_ebpf.symbolize.unwind import cfi, child, entry

log = logging.getLogger(__name__)

IDLE_S = 2.0  # the child exits after this long without a compile
COMPILE_TIMEOUT_S = 120.0  # libLLVM's 5 MB of CFI take 3 s; past this the child is stuck
_BOOT = boot("otel_ebpf.symbolize.unwind.child", "run")


class WorkerFailed(Exception):
    """The child could not be started, or did not answer."""


class CompileWorker:
    """cfi.compile_file, run in the child. Thread-safe (one compile at a time)."""

    def __init__(self, idle_s: float = IDLE_S) -> None:
        self.idle_s = idle_s
        self.started = 0  # children started (for tests and the debug log)
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._used_at = 0.0
        self._warned = False

    @property
    def running(self) -> bool:
        return self._proc is not None

    def compile(self, file: BinaryIO, max_rows: int) -> cfi.UnwindTable | None:
        """What cfi.compile_file(file, max_rows) returns or raises."""
        with self._lock:
            try:
                return self._ask(file, max_rows)
            except WorkerFailed as exc:
                self._stop()
                if not self._warned:
                    log.warning("unwind: the table compiler process failed (%s); compiling "
                                "in the agent instead, which keeps the compile's heap", exc)
                    self._warned = True
        file.seek(0)
        return cfi.compile_file(file, max_rows)

    def rest(self) -> None:
        """Stop the child if it has been idle for idle_s."""
        with self._lock:
            if self._proc is not None and time.monotonic() - self._used_at >= self.idle_s:
                self._stop()

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _ask(self, file: BinaryIO, max_rows: int) -> cfi.UnwindTable | None:
        sock = self._sock if self._sock is not None else self._start()
        try:
            socket.send_fds(sock, [child.REQUEST.pack(max_rows)], [file.fileno()])
            status, size = child.REPLY.unpack(child.read_exactly(sock, child.REPLY.size))
            payload = child.read_exactly(sock, size)
        except child.Closed:
            raise WorkerFailed("it exited") from None
        except OSError as exc:  # a timeout too
            raise WorkerFailed(str(exc) or type(exc).__name__) from exc
        self._used_at = time.monotonic()
        if status == child.TOO_LARGE:
            raise cfi.TooLarge(child.ROWS.unpack_from(payload)[0],
                               payload[child.ROWS.size:].decode(errors="replace"))
        if status == child.CFI_ERROR:
            raise cfi.CfiError(payload.decode(errors="replace"))
        try:
            return entry.decode(payload).table
        except ValueError as exc:
            raise WorkerFailed(f"its answer was damaged: {exc}") from exc

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._proc = subprocess.Popen(
                [sys.executable or "/usr/bin/python3", "-I", "-S", "-c", _BOOT,
                 str(theirs.fileno())], stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(),))
        except OSError as exc:
            ours.close()
            raise WorkerFailed(f"cannot start it: {exc}") from exc
        finally:
            theirs.close()
        ours.settimeout(COMPILE_TIMEOUT_S)
        self._sock = ours
        self.started += 1
        log.debug("unwind: table compiler process %d started", self._proc.pid)
        return ours

    def _stop(self) -> None:
        """Close the child's socket (it exits at once when idle), then reap it."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # stuck in a compile
                self._proc.kill()
                self._proc.wait()
            self._proc = None
