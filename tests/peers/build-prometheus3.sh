#!/usr/bin/env bash
# Build (once) Prometheus 3 from its Go module, for the OTLP-into-Prometheus end-to-end
# test (its OTLP receiver and native histograms; Debian 12 packages Prometheus 2.42).
#
# Usage: tests/peers/build-prometheus3.sh -> prints the binary path on stdout (last line)
#
# Everything lives OUTSIDE the repository, under
# ${PROMETHEUS3_CACHE:-/var/cache/otel-ebpf/prometheus3} (falling back to
# ${XDG_CACHE_HOME:-~/.cache}/otel-ebpf/prometheus3 when /var/cache/otel-ebpf is not
# writable): <version>/prometheus, and Go's module and build caches at the fixed paths
# go-mod/ and go-build/ beside it. A binary that exists is not rebuilt: a warm call runs no
# Go and costs milliseconds. Concurrent runs are serialised with flock(1). The web UI's
# assets are not built in (the `builtinassets` tag needs npm): the HTTP API, which the
# tests use, is complete without them. Progress on stderr.
#
# Measured on the 2-vCPU test VM shared with other builds (load 7-9), empty caches:
# 1780 s wall clock; go-mod/ 1.9 GB, go-build/ 2.1 GB, the binary 141 MB. Warm: ~10 ms.
set -euo pipefail

# Prometheus v3.x is published as Go module versions v0.3xx.y (v3.16.0 -> v0.316.0)
PROMETHEUS_MODULE_VERSION="v0.316.0"

log() { printf 'build-prometheus3: %s\n' "$*" >&2; }

# shellcheck source=deploy/cache-dir.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../deploy/cache-dir.sh"
cache="$(cache_dir prometheus3 "${PROMETHEUS3_CACHE:-}")"
vdir="${cache}/${PROMETHEUS_MODULE_VERSION}"
binary="${vdir}/prometheus"

# Fast path: no Go, no lock.
if [[ -x "${binary}" ]]; then
    echo "${binary}"
    exit 0
fi
mkdir -p "${vdir}"
exec 9>"${vdir}/.build.lock"
flock 9
if [[ -x "${binary}" ]]; then   # another process built it while we waited
    echo "${binary}"
    exit 0
fi

command -v go >/dev/null 2>&1 || { log "Go is not installed (needed to build Prometheus 3)"; exit 1; }
export GOMODCACHE="${cache}/go-mod" GOCACHE="${cache}/go-build" GOFLAGS=-mod=mod
work="$(mktemp -d "${vdir}/build.XXXXXX")"
trap 'rm -rf "${work}"' EXIT
start=$(date +%s)
log "building github.com/prometheus/prometheus/cmd/prometheus@${PROMETHEUS_MODULE_VERSION} (minutes on cold caches)"
GOBIN="${work}" go install "github.com/prometheus/prometheus/cmd/prometheus@${PROMETHEUS_MODULE_VERSION}"
[[ -x "${work}/prometheus" ]] || { log "go install produced no binary"; exit 1; }
mv -f "${work}/prometheus" "${binary}.tmp" && mv -f "${binary}.tmp" "${binary}"
log "built in $(( $(date +%s) - start ))s"
echo "${binary}"
