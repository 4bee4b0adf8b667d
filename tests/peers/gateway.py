"""The gateway collector of deploy/collector/ as a test peer: the binary that
``deploy/collector/build.sh`` builds from the repository's builder manifest, run on the
repository's ``config.yaml`` as a deployment runs it.

Only what a deployment sets differs, each the way the config allows it:

* the backend: ``OTEL_BACKEND_ENDPOINT`` (here a sink on loopback) and
  ``OTEL_BACKEND_INSECURE=true`` (the sink speaks plaintext gRPC), the environment the
  config's header documents;
* the receivers' addresses, ``--set`` to free loopback ports instead of the config's
  ``0.0.0.0:4317``/``:4318`` (the machine is shared, nothing may listen beyond loopback);
* no internal telemetry server (``--set service::telemetry::metrics::level=none``): its
  default ``:8888`` would clash between collectors run side by side.

The profiles pipeline needs ``--feature-gates=service.profilesSupport``, as in production.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.peers.otelcol import PROFILES_FEATURE_GATE, ensure_built
from tests.peers.process import LOOPBACK, CollectorPeer

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "deploy" / "collector" / "build.sh"
CONFIG = ROOT / "deploy" / "collector" / "config.yaml"


def gateway_binary() -> Path:
    """The gateway collector, built once (cached outside the repository)."""
    return ensure_built(BUILD_SCRIPT)


class GatewayCollector(CollectorPeer):
    """The gateway forwarding every signal to `backend` (``host:port``, plaintext gRPC)."""

    name = "gateway"
    stop_timeout = 10.0

    def __init__(self, backend: str, *, log_path: Path | None = None,
                 startup_timeout: float = 20.0, binary: Path | None = None) -> None:
        super().__init__(log_path, startup_timeout)
        self.backend = backend
        self._binary = binary

    @property
    def binary(self) -> Path:
        if self._binary is None:
            self._binary = gateway_binary()
        return self._binary

    def command(self) -> list[str]:
        """The exact argv: the repository's config, and the overrides above."""
        return [
            str(self.binary), f"--config={CONFIG}", f"--feature-gates={PROFILES_FEATURE_GATE}",
            "--set", f"receivers::otlp::protocols::grpc::endpoint={self.grpc_target}",
            "--set", f"receivers::otlp::protocols::http::endpoint={LOOPBACK}:{self.http_port}",
            "--set", "service::telemetry::metrics::level=none",
        ]

    def start(self, attempts: int = 3) -> GatewayCollector:
        _ = self.binary  # build (or fail) before anything starts
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env.update(OTEL_BACKEND_ENDPOINT=self.backend, OTEL_BACKEND_INSECURE="true")
        self._launch(self.command, attempts, env=env)
        return self

    def __enter__(self) -> GatewayCollector:
        return self.start()
