#!/usr/bin/env bash
# Build (once) the Helm CLI the deploy tests render the chart with (tests/deploy/).
#
# Usage: tests/peers/build-helm.sh     -> prints the binary path on stdout (last line)
#
# Helm is not packaged in Debian 12 and no release download site is reachable here, so it
# is built from the Go module proxy (`go install helm.sh/helm/v3/cmd/helm@v3.22.0`) into
#     ${HELM_CACHE:-/var/cache/otel-ebpf/helm}/<version>/helm
# outside the repository (falling back to ${XDG_CACHE_HOME:-~/.cache}/otel-ebpf/helm when
# /var/cache/otel-ebpf is not writable). If the binary exists it prints the path at once.
# GOMODCACHE, GOCACHE, GOPROXY and GOTOOLCHAIN are honoured as usual (defaults: Go's own,
# i.e. ~/go/pkg/mod and ~/.cache/go-build), shared with build-otelcol.sh.
# Measured on a 2-vCPU VM (Go caches warm with the collector builds only): 3 min 38 s wall
# clock; ~110 MB binary, Go's module cache +400 MB, its build cache +700 MB. Later runs: the
# fast path (no Go), a few milliseconds.
# Concurrent runs are serialised with flock(1). Progress on stderr; stdout is the path only.
set -euo pipefail

HELM_VERSION="v3.22.0"

log() { printf 'build-helm: %s\n' "$*" >&2; }

# shellcheck source=deploy/cache-dir.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../deploy/cache-dir.sh"
cache="$(cache_dir "helm" "${HELM_CACHE:-}")"
vdir="${cache}/${HELM_VERSION}"
binary="${vdir}/helm"

if [[ -x "${binary}" ]]; then
    echo "${binary}"
    exit 0
fi
mkdir -p "${vdir}"
exec 9>"${vdir}/.build.lock"
flock 9
if [[ -x "${binary}" ]]; then
    echo "${binary}"
    exit 0
fi
command -v go >/dev/null 2>&1 || { log "Go is not installed (needed to build Helm)"; exit 1; }
start=$(date +%s)
log "go install helm.sh/helm/v3/cmd/helm@${HELM_VERSION} (minutes on a cold Go cache)"
tmp="$(mktemp -d "${vdir}/bin.XXXXXX")"
trap 'rm -rf "${tmp}"' EXIT
GOFLAGS=-mod=mod GOBIN="${tmp}" go install "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}"
mv -f "${tmp}/helm" "${binary}"
log "built in $(( $(date +%s) - start ))s"
echo "${binary}"
