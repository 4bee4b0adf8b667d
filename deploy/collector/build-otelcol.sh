#!/usr/bin/env bash
# Build (once) an OpenTelemetry Collector from a builder (ocb) manifest, with Go modules from
# the module proxy; the one recipe behind deploy/collector/build.sh (the gateway) and
# tests/peers/build-otelcol.sh (the test peer that receives OTLP profiles).
#
# Usage: deploy/collector/build-otelcol.sh MANIFEST DIST_NAME CACHE_NAME
#        -> prints the binary path on stdout (last line)
#
# The binary is cached OUTSIDE the repository, at
#     ${OTELCOL_CACHE:-/var/cache/otel-ebpf/CACHE_NAME}/<version>/DIST_NAME
# (falling back to ${XDG_CACHE_HOME:-~/.cache}/otel-ebpf/CACHE_NAME when OTELCOL_CACHE is
# unset and /var/cache/otel-ebpf is not writable). If it exists and was built from the
# current manifest, nothing runs (no Go): a warm call costs milliseconds. Otherwise it
# installs the official builder (ocb) into <cache>/bin and builds the manifest with it;
# only Go (and the Go module proxy) are needed.
#
# Environment: OTELCOL_CACHE (cache root); GOPROXY, GOMODCACHE, GOCACHE and GOTOOLCHAIN are
# honoured as by any go command.
#
# Measured on a 2-vCPU VM with empty Go module and build caches: ~105 s wall clock; the
# cache then holds ~40 MB, Go's module cache +415 MB, its build cache +590 MB. A second
# manifest of the same release then builds in ~40 s.
set -euo pipefail

OTELCOL_VERSION="0.157.0"

if [[ $# -ne 3 ]]; then
    printf 'usage: %s MANIFEST DIST_NAME CACHE_NAME\n' "$0" >&2
    exit 2
fi
manifest="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
DIST_NAME="$2"
name="$3"

log() { printf '%s: %s\n' "${name}" "$*" >&2; }

# shellcheck source=deploy/cache-dir.sh
source "$(dirname "${BASH_SOURCE[0]}")/../cache-dir.sh"
cache="$(cache_dir "${name}" "${OTELCOL_CACHE:-}")"

vdir="${cache}/${OTELCOL_VERSION}"
binary="${vdir}/${DIST_NAME}"
stamp="${vdir}/$(basename "${manifest}")"   # copy of the manifest the binary was built from

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
    log "${manifest} does not pin otlpreceiver v${OTELCOL_VERSION}; update OTELCOL_VERSION"
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
