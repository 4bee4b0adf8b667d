#!/usr/bin/env bash
# Build (once) a real Kubernetes control plane from the Go module proxy: etcd and
# kube-apiserver by default, any other component of k8s.io/kubernetes/cmd on request.
#
# Usage: tests/peers/build-kube.sh [BINARY...]   (default: etcd kube-apiserver)
#        e.g. build-kube.sh etcd kube-apiserver kubelet
#        -> prints the directory holding the binaries on stdout (last line)
#
# Kubernetes is not packaged in Debian 12 and no release download is reachable here, so a
# small wrapper module requiring k8s.io/kubernetes is built. Used as a dependency, that
# module's `replace ./staging/src/k8s.io/...` lines do not apply: the wrapper replaces each
# staging module with its published twin (k8s.io/api v0.34.x for v1.34.x, ...), read from
# the very go.mod of k8s.io/kubernetes. etcd is the server k8s.io/kubernetes itself pins
# (go.etcd.io/etcd/server/v3), from the same module graph. The version ldflags are set as
# the Kubernetes release does, or kubectl takes the server for v0.0.0 and refuses it.
#
# Everything lives OUTSIDE the repository, under ${KUBE_CACHE:-/var/cache/otel-ebpf/kube}
# (falling back to ${XDG_CACHE_HOME:-~/.cache}/otel-ebpf/kube when /var/cache/otel-ebpf
# is not writable):  <version>/bin/<binary>, and Go's module and build caches at the fixed
# paths go-mod/ and go-build/ beside it (not shared with the other peers: this build alone
# is 2 GB, and a cold run here is a true cold run). A binary that exists is not rebuilt: a
# warm call runs no Go and costs milliseconds. Concurrent runs are serialised with flock(1).
#
# Measured on a 2-vCPU VM shared with other builds (load 5-10), empty caches: etcd +
# kube-apiserver in 11 min 45 s wall clock, 560 CPU-seconds (so ~5 min on an idle machine);
# go-mod/ 510 MB, go-build/ 2.2 GB, the two binaries 26 + 102 MB. kubelet afterwards, on
# the warm caches: 125 CPU-seconds more (4 min 37 s wall on the loaded machine), +50 MB of
# modules, +0.5 GB of build cache, 84 MB; it is not built unless asked for. Then
# kube-controller-manager + kube-scheduler (the node tier): 79 CPU-seconds (2 min 28 s wall
# at load 8), 89 + 70 MB. Warm: ~10 ms.
# Progress on stderr.
set -euo pipefail

KUBE_VERSION="v1.34.4"

log() { printf 'build-kube: %s\n' "$*" >&2; }

wanted=("$@")
[[ ${#wanted[@]} -gt 0 ]] || wanted=(etcd kube-apiserver)
for name in "${wanted[@]}"; do
    [[ "${name}" =~ ^[a-z][a-z0-9-]*$ ]] || { log "not a binary name: ${name}"; exit 2; }
done

# shellcheck source=deploy/cache-dir.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../deploy/cache-dir.sh"
cache="$(cache_dir "kube" "${KUBE_CACHE:-}")"
vdir="${cache}/${KUBE_VERSION}"
bindir="${vdir}/bin"

missing() {
    local name out=()
    for name in "${wanted[@]}"; do
        [[ -x "${bindir}/${name}" ]] || out+=("${name}")
    done
    echo "${out[*]:-}"
}

# Fast path: no Go, no lock.
if [[ -z "$(missing)" ]]; then
    echo "${bindir}"
    exit 0
fi
mkdir -p "${bindir}"
exec 9>"${vdir}/.build.lock"
flock 9
todo="$(missing)"
if [[ -z "${todo}" ]]; then   # another process built them while we waited
    echo "${bindir}"
    exit 0
fi
command -v go >/dev/null 2>&1 || { log "Go is not installed (needed to build Kubernetes)"; exit 1; }

export GOMODCACHE="${cache}/go-mod" GOCACHE="${cache}/go-build"
export GOFLAGS=-mod=mod CGO_ENABLED=0 GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
start=$(date +%s)
src="${vdir}/src"
mkdir -p "${src}"
cd "${src}"

if [[ ! -f go.mod ]]; then
    log "resolving k8s.io/kubernetes@${KUBE_VERSION} (~500 MB of modules when cold)"
    gomod="$(go mod download -json "k8s.io/kubernetes@${KUBE_VERSION}" \
        | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')"
    [[ -f "${gomod}" ]] || { log "no go.mod for k8s.io/kubernetes@${KUBE_VERSION}"; exit 1; }
    staging="v0.${KUBE_VERSION#v1.}"   # v1.34.4 -> v0.34.4
    etcd="$(awk '$1 == "go.etcd.io/etcd/server/v3" {print $2}' "${gomod}")"
    [[ -n "${etcd}" ]] || { log "k8s.io/kubernetes@${KUBE_VERSION} pins no etcd server"; exit 1; }
    {
        printf 'module otel-ebpf.test/kube\n\ngo 1.24.0\n\n'
        printf 'require (\n\tk8s.io/kubernetes %s\n\tgo.etcd.io/etcd/server/v3 %s\n)\n\n' \
            "${KUBE_VERSION}" "${etcd}"
        printf 'replace (\n'
        sed -n "s|^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*|\t\1 => \1 ${staging}|p" \
            "${gomod}"
        printf ')\n'
    } >go.mod.tmp
    mv go.mod.tmp go.mod
fi

# the etcd server module is a main package at its root (server/main.go)
pkgs=()
for name in ${todo}; do
    if [[ "${name}" == etcd ]]; then
        pkgs+=(go.etcd.io/etcd/server/v3)
    else
        pkgs+=("k8s.io/kubernetes/cmd/${name}")
    fi
done

# what hack/lib/version.sh stamps into a release build
IFS=. read -r major minor _ <<<"${KUBE_VERSION#v}"
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X ${pkg}.gitVersion=${KUBE_VERSION} -X ${pkg}.gitMajor=${major}"
    ldflags+=" -X ${pkg}.gitMinor=${minor} -X ${pkg}.gitTreeState=clean"
    ldflags+=" -X ${pkg}.buildDate=1970-01-01T00:00:00Z"
done

log "building ${todo} ${KUBE_VERSION} (minutes on a cold cache; nice 10)"
out="$(mktemp -d "${vdir}/out.XXXXXX")"
trap 'rm -rf "${out}"' EXIT
nice -n 10 go build -trimpath -ldflags "${ldflags}" -o "${out}/" "${pkgs[@]}" >&2
[[ ! -e "${out}/server" ]] || mv "${out}/server" "${out}/etcd"  # go names it after .../server
for name in ${todo}; do
    [[ -x "${out}/${name}" ]] || { log "go build produced no ${name}"; exit 1; }
    mv -f "${out}/${name}" "${bindir}/${name}"
done
log "built ${todo} in $(( $(date +%s) - start ))s"
echo "${bindir}"
