#!/usr/bin/env bash
# Build (once) the OpenTelemetry Collector used as an end-to-end test peer for OTLP profiles,
# from tests/peers/otelcol-builder.yaml, with the project's one collector recipe
# (deploy/collector/build-otelcol.sh: cached outside the repository, no Go when warm).
# Usage: tests/peers/build-otelcol.sh -> prints the binary path on stdout (last line).
# Environment: OTELCOL_CACHE (cache root, default /var/cache/otel-ebpf/otelcol).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${here}/../../deploy/collector/build-otelcol.sh" "${here}/otelcol-builder.yaml" \
    otelcol-otel-ebpf-test otelcol
