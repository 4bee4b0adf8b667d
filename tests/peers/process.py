"""What every collector peer does the same way: start on free loopback ports, wait until
its OTLP ports accept connections (retrying with fresh ports if another process took
one), stop with SIGTERM then SIGKILL, and never outlive the test session."""

from __future__ import annotations

import atexit
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

LOOPBACK = "127.0.0.1"

# Safety net: peers still running when the interpreter exits (a test run aborted before
# teardown) are killed, so a crashed session never leaves a collector behind.
_LIVE: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        proc.kill()
        proc.wait()


def free_port() -> int:
    """A currently-free loopback TCP port (may be raced; `launch` retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def accepts(port: int) -> bool:
    try:
        socket.create_connection((LOOPBACK, port), timeout=0.2).close()
    except OSError:
        return False
    return True


class PeerProcess:
    """One peer process at a time; `proc` is None when it is not running."""

    def __init__(self, startup_timeout: float) -> None:
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def launch(self, command: Callable[[int, int], Sequence[str]], log_path: Path,
               attempts: int = 3, **popen: object) -> tuple[int, int] | None:
        """Start `command(grpc_port, http_port)` until both ports accept; the ports, or
        None when every attempt failed (the log says why)."""
        for _ in range(attempts):
            ports = free_port(), free_port()
            with open(log_path, "ab") as log:
                self.proc = subprocess.Popen(  # type: ignore[call-overload]
                    list(command(*ports)), stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, **popen)
            assert self.proc is not None
            _LIVE.add(self.proc)
            if self._wait_ready(ports):
                return ports
            self.terminate()
        return None

    def _wait_ready(self, ports: tuple[int, int]) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if all(accepts(p) for p in ports):
                return True
            time.sleep(0.02)
        return False

    def terminate(self, timeout: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _LIVE.discard(proc)
