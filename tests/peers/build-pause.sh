#!/usr/bin/env bash
# Build (once) the Kubernetes pause image from the Kubernetes source, as a Docker image
# archive that `ctr images import` loads: the sandbox image every pod of the node tier
# starts first (containerd's `sandbox_image`). No registry is reachable here, so
# registry.k8s.io/pause cannot be pulled; it is a single static C program
# (build/pause/linux/pause.c of k8s.io/kubernetes) in an otherwise empty image, built as
# its Makefile does (`gcc -Os -Wall -Werror -static`, user 65535, entrypoint /pause).
#
# Usage: tests/peers/build-pause.sh   -> prints the archive's path on stdout (last line)
#
# The source comes from the module cache of tests/peers/build-kube.sh (same KUBE_CACHE, same
# Kubernetes version: `go mod download` fetches it when that cache is cold). The archive is
# cached as ${KUBE_CACHE}/<version>/pause/pause.tar and is byte-for-byte reproducible (fixed
# mtimes and owners; the image name is NAME below). Cold: ~1 s of gcc once the source is
# there; warm: no compiler runs. Needs gcc and libc6-dev's static libc (host-setup.sh --test).
set -euo pipefail

KUBE_VERSION="v1.34.4"
PAUSE_VERSION="3.10.1"       # build/pause/Makefile's TAG at that version
NAME="localhost/kubernetes/pause:${PAUSE_VERSION}"

log() { printf 'build-pause: %s\n' "$*" >&2; }

# shellcheck source=deploy/cache-dir.sh
source "$(dirname "${BASH_SOURCE[0]}")/../../deploy/cache-dir.sh"
cache="$(cache_dir "kube" "${KUBE_CACHE:-}")"
dir="${cache}/${KUBE_VERSION}/pause"
archive="${dir}/pause.tar"
if [[ -s "${archive}" ]]; then
    echo "${archive}"
    exit 0
fi
mkdir -p "${dir}"
exec 9>"${dir}/.build.lock"
flock 9
if [[ -s "${archive}" ]]; then
    echo "${archive}"
    exit 0
fi

src="${cache}/go-mod/k8s.io/kubernetes@${KUBE_VERSION}/build/pause/linux/pause.c"
if [[ ! -f "${src}" ]]; then
    command -v go >/dev/null 2>&1 || { log "Go is not installed (needed to fetch ${src})"; exit 1; }
    log "fetching k8s.io/kubernetes@${KUBE_VERSION} into the module cache"
    GOMODCACHE="${cache}/go-mod" GOFLAGS=-mod=mod GOTOOLCHAIN="${GOTOOLCHAIN:-local}" \
        go mod download "k8s.io/kubernetes@${KUBE_VERSION}" >&2
fi
[[ -f "${src}" ]] || { log "no ${src} in the module of k8s.io/kubernetes@${KUBE_VERSION}"; exit 1; }
grep -q "^TAG ?= ${PAUSE_VERSION}\$" "$(dirname "${src}")/../Makefile" \
    || { log "build/pause/Makefile of ${KUBE_VERSION} is not at pause ${PAUSE_VERSION}"; exit 1; }
command -v gcc >/dev/null 2>&1 || { log "gcc is not installed; run deploy/host-setup.sh --test"; exit 1; }

work="$(mktemp -d "${dir}/work.XXXXXX")"
trap 'rm -rf "${work}"' EXIT
mkdir -p "${work}/rootfs" "${work}/image"
gcc -Os -Wall -Werror -static -DVERSION="v${PAUSE_VERSION}-otel-ebpf" \
    -o "${work}/rootfs/pause" "${src}" >&2
strip "${work}/rootfs/pause"
tar_fixed() { tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 --format=gnu "$@"; }
tar_fixed -C "${work}/rootfs" -cf "${work}/layer.tar" pause
layer="$(sha256sum "${work}/layer.tar" | cut -d' ' -f1)"
mkdir "${work}/image/${layer}"
mv "${work}/layer.tar" "${work}/image/${layer}/layer.tar"
case "$(uname -m)" in x86_64) arch=amd64 ;; aarch64) arch=arm64 ;; *) arch="$(uname -m)" ;; esac
printf '{"architecture":"%s","os":"linux","config":{"User":"65535:65535","Entrypoint":["/pause"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
    "${arch}" "${layer}" >"${work}/config.json"
config="$(sha256sum "${work}/config.json" | cut -d' ' -f1)"
mv "${work}/config.json" "${work}/image/${config}.json"
printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":["%s/layer.tar"]}]' \
    "${config}" "${NAME}" "${layer}" >"${work}/image/manifest.json"
tar_fixed -C "${work}/image" -cf "${archive}.new" .
mv -f "${archive}.new" "${archive}"
log "built ${NAME} from ${src} into ${archive}"
echo "${archive}"
