"""Run a real rotel collector (``rotel-agent``) as a subprocess between a client and a sink.

Why: the agent's OTLP output must survive a real collector hop, not just our own sink, so
end-to-end tests put rotel (a small Rust OTLP collector shipped as a Python wheel) in the
middle: client -> rotel (gRPC or HTTP receiver) -> ``OtlpSink`` (gRPC exporter).

Observed behaviour of rotel-agent 0.0.1-alpha10 (``pip install --pre rotel``); all but the
last point are pinned by ``tests/e2e/test_peers.py``:

* Exponential histograms are forwarded intact: scale, zero_count, positive/negative offset
  and bucket counts, count, sum, min, max, attributes and temporality all arrive unchanged
  at the sink (checked at scale 2, as used for ``linux.syscall.duration``).
* Profiles are not supported: a gRPC ``ProfilesService/Export`` to rotel's OTLP receiver
  fails with ``StatusCode.UNIMPLEMENTED`` (empty details), and an HTTP POST to
  ``/v1development/profiles`` gets 404; nothing is forwarded. Tests of profile export must
  therefore talk to ``OtlpSink`` directly, not through rotel.
* Traces and logs are forwarded like metrics (gRPC and HTTP/protobuf receivers).
* If the sink is down, rotel retries with backoff and delivers once it is back; SIGTERM
  with exports still pending takes about 3 s (rotel cancels them), otherwise it is instant.

Start command used (ports are free loopback ports chosen at start time)::

    rotel-agent start --otlp-grpc-endpoint 127.0.0.1:P1 --otlp-http-endpoint 127.0.0.1:P2
        --exporter otlp --otlp-exporter-endpoint http://127.0.0.1:SINKPORT
        --otlp-exporter-protocol grpc --batch-timeout 50ms
        --otlp-exporter-retry-initial-backoff 100ms --otlp-exporter-retry-max-backoff 1s
        --pid-file <tmp>/rotel-agent.pid --log-file <tmp>/rotel-agent.log

``--batch-timeout 50ms`` (default 200ms) makes a single small export reach the sink fast,
and the short retry backoffs (defaults 5s/30s) let it recover quickly from a sink restart;
``--pid-file``/``--log-file`` only matter with ``--daemon`` but are pointed at a private
temporary directory so concurrent runs never share ``/tmp/rotel-agent.*``. Inherited
``ROTEL_*`` environment variables are dropped so the command line is the whole config, and
``NO_COLOR=1`` keeps ANSI escapes out of the captured log.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from tests.peers.process import LOOPBACK, PeerProcess, free_port

__all__ = ["LOOPBACK", "RotelCollector", "free_port", "rotel_binary"]

def rotel_binary() -> Path:
    """Path of the ``rotel-agent`` executable bundled in the ``rotel`` wheel."""
    try:
        import rotel
    except ImportError as exc:
        raise RuntimeError(
            "the 'rotel' package is not installed; run `make test`, which installs it "
            "(pip install --pre rotel)"
        ) from exc
    binary = Path(rotel.__file__).parent / "rotel-agent"
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise RuntimeError(
            f"rotel-agent binary not found or not executable at {binary}; run `make test`, "
            "which installs it (pip install --pre rotel)"
        )
    return binary


class RotelCollector:
    """A rotel-agent subprocess receiving OTLP on loopback and forwarding to a sink.

    ``exporter_endpoint`` is the sink's ``http://127.0.0.1:PORT`` (OTLP/gRPC). Use as a
    context manager or call ``start()``/``stop()``; stdout and stderr go to ``log_path``
    whose content ``read_log()`` returns for assertion messages.
    """

    def __init__(
        self,
        exporter_endpoint: str,
        *,
        batch_timeout: str = "50ms",
        log_path: Path | None = None,
        extra_args: list[str] | None = None,
        startup_timeout: float = 10.0,
    ) -> None:
        if not exporter_endpoint.startswith(f"http://{LOOPBACK}:"):
            raise ValueError(f"exporter endpoint must be http://{LOOPBACK}:PORT")
        self.exporter_endpoint = exporter_endpoint
        self.batch_timeout = batch_timeout
        self.extra_args = list(extra_args or [])
        self.startup_timeout = startup_timeout
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        self._requested_log_path = log_path
        self._log_path: Path | None = None
        self._peer = PeerProcess(startup_timeout)
        self._final_log: str | None = None
        self.grpc_port = 0
        self.http_port = 0

    @property
    def grpc_endpoint(self) -> str:
        """OTLP/gRPC receiver, e.g. for ``OTLPMetricExporter(endpoint=..., insecure=True)``."""
        return f"http://{LOOPBACK}:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        """OTLP/HTTP receiver base URL; append ``/v1/metrics``, ``/v1/traces``, ``/v1/logs``."""
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def log_path(self) -> Path:
        """File receiving rotel's stdout and stderr."""
        if self._log_path is None:
            raise RuntimeError("RotelCollector not started")
        return self._log_path

    @property
    def pid(self) -> int | None:
        """The subprocess id while running."""
        return self._peer.proc.pid if self._peer.proc is not None else None

    def read_log(self) -> str:
        """Rotel's output so far; after ``stop()`` too, even if the log file was temporary."""
        if self._final_log is not None:
            return self._final_log
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def command(self) -> list[str]:
        """The exact argv used to start rotel with the current ports."""
        assert self._tmpdir is not None
        tmp = Path(self._tmpdir.name)
        return [
            str(rotel_binary()), "start",
            "--otlp-grpc-endpoint", f"{LOOPBACK}:{self.grpc_port}",
            "--otlp-http-endpoint", f"{LOOPBACK}:{self.http_port}",
            "--exporter", "otlp",
            "--otlp-exporter-endpoint", self.exporter_endpoint,
            "--otlp-exporter-protocol", "grpc",
            "--batch-timeout", self.batch_timeout,
            "--otlp-exporter-retry-initial-backoff", "100ms",
            "--otlp-exporter-retry-max-backoff", "1s",
            "--pid-file", str(tmp / "rotel-agent.pid"),
            "--log-file", str(tmp / "rotel-agent.log"),
            *self.extra_args,
        ]  # fmt: skip

    def start(self, attempts: int = 3) -> RotelCollector:
        """Start rotel and wait until both receivers accept connections.

        Ports are picked just before launch, so another process can grab one in between;
        in that case rotel exits at once and we retry with fresh ports.
        """
        if self._peer.proc is not None:
            raise RuntimeError("RotelCollector already started")
        rotel_binary()  # fail early with the helpful message
        self._final_log = None
        self._tmpdir = tempfile.TemporaryDirectory(prefix="rotel-")
        self._log_path = self._requested_log_path or Path(self._tmpdir.name) / "rotel-output.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ROTEL_")}
        env["NO_COLOR"] = "1"

        def command(grpc_port: int, http_port: int) -> list[str]:
            self.grpc_port, self.http_port = grpc_port, http_port
            return self.command()

        if self._peer.launch(command, self._log_path, attempts, env=env) is not None:
            return self
        output = self.read_log()
        self.stop()
        raise RuntimeError(f"rotel-agent failed to start; output:\n{output}")

    def _terminate(self, timeout: float = 5.0) -> None:
        self._peer.terminate(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM rotel (letting it flush), SIGKILL it after ``timeout``; idempotent.

        With exports still pending to an unreachable sink rotel needs about 3 s to give up.
        """
        self._terminate(timeout)
        if self._tmpdir is not None:
            self._final_log = self.read_log()
            self._tmpdir.cleanup()
            self._tmpdir = None

    def __enter__(self) -> RotelCollector:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
