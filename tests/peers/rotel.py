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
from pathlib import Path

from tests.peers.process import LOOPBACK, CollectorPeer, free_port

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


class RotelCollector(CollectorPeer):
    """A rotel-agent subprocess receiving OTLP on loopback and forwarding to a sink.

    ``exporter_endpoint`` is the sink's ``http://127.0.0.1:PORT`` (OTLP/gRPC). Use as a
    context manager or call ``start()``/``stop()``; stdout and stderr go to ``log_path``
    whose content ``read_log()`` returns for assertion messages. With exports still pending
    to an unreachable sink rotel needs about 3 s to stop.
    """

    name = "rotel-agent"

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
        super().__init__(log_path, startup_timeout)
        self.exporter_endpoint = exporter_endpoint
        self.batch_timeout = batch_timeout
        self.extra_args = list(extra_args or [])

    def command(self) -> list[str]:
        """The exact argv used to start rotel with the current ports."""
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
            "--pid-file", str(self.workdir / "rotel-agent.pid"),
            "--log-file", str(self.workdir / "rotel-agent.log"),
            *self.extra_args,
        ]  # fmt: skip

    def start(self, attempts: int = 3) -> RotelCollector:
        """Start rotel and wait until both receivers accept connections."""
        rotel_binary()  # fail early with the helpful message
        env = {k: v for k, v in os.environ.items() if not k.startswith("ROTEL_")}
        env["NO_COLOR"] = "1"
        self._launch(self.command, attempts, env=env)
        return self

    def __enter__(self) -> RotelCollector:
        return self.start()
