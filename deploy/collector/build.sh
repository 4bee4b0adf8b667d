#!/usr/bin/env bash
# Build (once) the gateway OpenTelemetry Collector of deploy/collector/ (OTLP in, OTLP out).
#
# Usage: deploy/collector/build.sh            -> prints the binary path on stdout (last line)
#
# The binary is cached OUTSIDE the repository, at
#     ${OTELCOL_GATEWAY_CACHE:-/var/cache/otel-ebpf/otelcol-gateway}/<version>/otelcol-otel-ebpf-gateway
# (falling back to ${XDG_CACHE_HOME:-~/.cache}/otel-ebpf/otelcol-gateway when OTELCOL_GATEWAY_CACHE is unset
# and /var/cache/otel-ebpf is not writable). If it exists and was built from the current
# otelcol-builder.yaml, the script prints its path and exits at once. Otherwise it installs
# the official builder (ocb) into <cache>/bin and builds the manifest with it; only Go (and
# network access to the Go module proxy) is needed. Concurrent runs are serialised with
# flock(1) when available. Progress goes to stderr; stdout carries only the path.
#
# Environment: OTELCOL_GATEWAY_CACHE (cache root); GOPROXY, GOMODCACHE, GOCACHE and GOTOOLCHAIN are
# honoured as usual; GOFLAGS is set to -mod=mod for the build.
#
# Measured on a 2-vCPU VM whose Go caches already held the test peer's build
# (tests/peers/build-otelcol.sh, same release): 37 s wall clock, ~40 MB in the cache; from
# empty Go caches expect about the peer's ~105 s (+415 MB modules, +590 MB build cache).
# Later runs: the fast path (no Go), a few milliseconds.
set -euo pipefail

OTELCOL_VERSION="0.157.0"
DIST_NAME="otelcol-otel-ebpf-gateway"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
manifest="${here}/builder.yaml"

log() { printf 'build-gateway: %s\n' "$*" >&2; }

if [[ -n "${OTELCOL_GATEWAY_CACHE:-}" ]]; then
    cache="${OTELCOL_GATEWAY_CACHE}"
else
    cache="/var/cache/otel-ebpf/otelcol-gateway"
    if ! mkdir -p "${cache}" 2>/dev/null || [[ ! -w "${cache}" ]]; then
        cache="${XDG_CACHE_HOME:-${HOME}/.cache}/otel-ebpf/otelcol-gateway"
    fi
fi
mkdir -p "${cache}"
cache="$(cd "${cache}" && pwd)"

vdir="${cache}/${OTELCOL_VERSION}"
binary="${vdir}/${DIST_NAME}"
stamp="${vdir}/builder.yaml"   # copy of the manifest the binary was built from

is_fresh() {
    [[ -x "${binary}" && -f "${stamp}" ]] && cmp -s "${manifest}" "${stamp}"
}

# Fast path: no Go, no lock.
if is_fresh; then
    echo "${binary}"
    exit 0
fi

mkdir -p "${vdir}"
if command -v flock >/dev/null 2>&1; then
    exec 9>"${vdir}/.build.lock"
    flock 9
    if is_fresh; then   # another process built it while we waited
        echo "${binary}"
        exit 0
    fi
fi

command -v go >/dev/null 2>&1 || { log "Go is not installed (needed to build the collector)"; exit 1; }
if ! grep -q "go.opentelemetry.io/collector/receiver/otlpreceiver v${OTELCOL_VERSION}\$" "${manifest}"; then
    log "builder.yaml does not pin otlpreceiver v${OTELCOL_VERSION}; update OTELCOL_VERSION"
    exit 1
fi

start=$(date +%s)
export GOFLAGS=-mod=mod
builder="${cache}/bin/builder"
if [[ ! -x "${builder}" ]] || ! "${builder}" version 2>/dev/null | grep -q "${OTELCOL_VERSION}"; then
    log "installing go.opentelemetry.io/collector/cmd/builder@v${OTELCOL_VERSION} into ${cache}/bin"
    GOBIN="${cache}/bin" go install "go.opentelemetry.io/collector/cmd/builder@v${OTELCOL_VERSION}"
fi

work="$(mktemp -d "${vdir}/build.XXXXXX")"
trap 'rm -rf "${work}"' EXIT
sed -e "s|^\(  output_path:\).*|\1 ${work}/src|" "${manifest}" >"${work}/manifest.yaml"
log "building ${DIST_NAME} v${OTELCOL_VERSION} (takes minutes on a cold Go cache)"
"${builder}" --config "${work}/manifest.yaml" >&2

built="${work}/src/${DIST_NAME}"
[[ -x "${built}" ]] || { log "builder did not produce ${built}"; exit 1; }
# Keep the generated go.mod for provenance (exact resolved pdata version), then publish the
# binary and the manifest stamp atomically.
cp "${work}/src/go.mod" "${vdir}/go.mod.txt"
mv -f "${built}" "${binary}.tmp" && mv -f "${binary}.tmp" "${binary}"
cp "${manifest}" "${stamp}.tmp" && mv -f "${stamp}.tmp" "${stamp}"
log "built in $(( $(date +%s) - start ))s"
echo "${binary}"
