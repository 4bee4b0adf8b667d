#!/usr/bin/env bash
# Build (once) the gateway OpenTelemetry Collector of deploy/collector/ (OTLP in, OTLP out)
# from builder.yaml, with the project's one collector recipe (build-otelcol.sh beside this
# file: cached outside the repository, no Go when warm).
# Usage: deploy/collector/build.sh -> prints the binary path on stdout (last line).
# Environment: OTELCOL_GATEWAY_CACHE (cache root, default /var/cache/otel-ebpf/otelcol-gateway).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OTELCOL_CACHE="${OTELCOL_GATEWAY_CACHE:-}" exec "${here}/build-otelcol.sh" \
    "${here}/builder.yaml" otelcol-otel-ebpf-gateway otelcol-gateway
