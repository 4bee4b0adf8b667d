"""What every peer does the same way: start on free loopback ports, wait until its ports
accept connections (retrying with fresh ports if another process took one), keep its
files in a private temporary directory, stop with SIGTERM then SIGKILL, and never outlive
the test session."""

from __future__ import annotations

import atexit
import signal
import socket
import subprocess
import tempfile
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


class WorkDir:
    """A peer's private temporary directory: made at start, removed at stop."""

    def __init__(self, peer_name: str) -> None:
        self.peer_name = peer_name
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def exists(self) -> bool:
        return self._tmp is not None

    @property
    def path(self) -> Path:
        if self._tmp is None:
            raise RuntimeError(f"{self.peer_name} not started")
        return Path(self._tmp.name)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def make(self) -> Path:
        """A fresh directory, named after the peer."""
        self.remove()
        self._tmp = tempfile.TemporaryDirectory(prefix=f"{self.peer_name}-")
        return self.path

    def remove(self) -> None:
        """Remove it and everything in it; idempotent."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


class PeerProcess:
    """One peer process at a time; `proc` is None when it is not running."""

    def __init__(self, startup_timeout: float) -> None:
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def launch(self, command: Callable[..., Sequence[str]], log_path: Path,
               attempts: int = 3, ports: tuple[int, ...] | None = None, count: int = 2,
               **popen: object) -> tuple[int, ...] | None:
        """Start `command(*ports)` (`count` of them: a collector's grpc and http port)
        until every port accepts; the ports, or None when every attempt failed (the log
        says why). Fresh free ports each attempt unless `ports` are given (a restart on
        the same ports)."""
        for _ in range(attempts):
            chosen = ports or tuple(free_port() for _ in range(count))
            with open(log_path, "ab") as log:
                self.proc = subprocess.Popen(  # type: ignore[call-overload]
                    list(command(*chosen)), stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, **popen)
            assert self.proc is not None
            _LIVE.add(self.proc)
            if self._wait_ready(chosen):
                return chosen
            self.terminate()
        return None

    def _wait_ready(self, ports: tuple[int, ...]) -> bool:
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


class CollectorPeer:
    """A collector subprocess with OTLP receivers on two loopback ports and its output in a
    log that stays readable after stop(). Subclasses build the command (`_launch`) and
    may keep more of their private directory at stop (`_keep`)."""

    name = "collector"
    stop_timeout = 5.0

    def __init__(self, log_path: Path | None, startup_timeout: float) -> None:
        self.startup_timeout = startup_timeout
        self.workdir = WorkDir(self.name)  # config, pid and output files of this run
        self._requested_log_path = log_path
        self._log_path: Path | None = None
        self._peer = PeerProcess(startup_timeout)
        self._relaunch: Callable[[tuple[int, int]], object] | None = None
        self._final_log: str | None = None
        self.grpc_port = 0
        self.http_port = 0

    @property
    def grpc_target(self) -> str:
        """``127.0.0.1:PORT`` for ``grpc.insecure_channel``."""
        return f"{LOOPBACK}:{self.grpc_port}"

    @property
    def grpc_endpoint(self) -> str:
        """OTLP/gRPC receiver as ``http://127.0.0.1:PORT`` (for the SDK OTLP exporters)."""
        return f"http://{self.grpc_target}"

    @property
    def grpc_env(self) -> dict[str, str]:
        """An agent's environment for exporting here over OTLP/gRPC (its default is
        http/protobuf)."""
        return {"OTEL_EXPORTER_OTLP_ENDPOINT": self.grpc_endpoint,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}

    @property
    def http_endpoint(self) -> str:
        """OTLP/HTTP base URL; append ``/v1/metrics``, ``/v1/traces``, ..."""
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def log_path(self) -> Path:
        """File receiving the collector's stdout and stderr."""
        if self._log_path is None:
            raise RuntimeError(f"{type(self).__name__} not started")
        return self._log_path

    @property
    def pid(self) -> int | None:
        """The subprocess id while running."""
        return self._peer.proc.pid if self._peer.proc is not None else None

    def read_log(self) -> str:
        """The collector's output so far; after ``stop()`` too, even from a temporary log."""
        if self._final_log is not None:
            return self._final_log
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _launch(self, command: Callable[[], Sequence[str]], attempts: int,
                **popen: object) -> None:
        """Start `command()` (built once `grpc_port`/`http_port` are chosen) in a fresh
        private directory, its working directory, until both receivers accept
        connections.

        Ports are picked just before launch, so another process can grab one in between;
        the collector then exits at once and is retried with fresh ports."""
        if self._peer.proc is not None:
            raise RuntimeError(f"{type(self).__name__} already started")
        self._final_log = None
        workdir = self.workdir.make()
        self._log_path = self._requested_log_path or workdir / f"{self.name}-output.log"

        def with_ports(grpc_port: int, http_port: int) -> Sequence[str]:
            self.grpc_port, self.http_port = grpc_port, http_port
            return command()

        def relaunch(ports: tuple[int, int]) -> object:
            return self._peer.launch(with_ports, self.log_path, attempts, ports=ports,
                                     cwd=workdir, **popen)

        self._relaunch = relaunch
        if self._peer.launch(with_ports, self._log_path, attempts, cwd=workdir,
                             **popen) is None:
            output = self.read_log()
            self.stop()
            raise RuntimeError(f"{self.name} failed to start; output:\n{output}")

    def pause(self, timeout: float | None = None) -> None:
        """The collector goes away (SIGTERM, then SIGKILL after `timeout`): its ports
        refuse connections; its directory and log stay for `resume`."""
        self._peer.terminate(self.stop_timeout if timeout is None else timeout)

    def resume(self) -> None:
        """The collector comes back on the same ports; returns once both accept."""
        if self._relaunch is None or not self.workdir.exists:
            raise RuntimeError(f"{type(self).__name__} not started")
        if self._relaunch((self.grpc_port, self.http_port)) is None:
            raise RuntimeError(f"{self.name} did not restart on ports {self.grpc_port}, "
                               f"{self.http_port}; output:\n{self.read_log()}")

    def _keep(self) -> None:
        """Called at stop() while the private directory still exists."""

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM the collector (letting it flush), SIGKILL it after ``timeout``;
        idempotent. The log stays readable."""
        self._peer.terminate(self.stop_timeout if timeout is None else timeout)
        if self.workdir.exists:
            self._final_log = self.read_log()
            self._keep()
            self.workdir.remove()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
