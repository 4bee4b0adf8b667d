#!/usr/bin/env bash
# Build the otel-ebpf container image from the repository's Dockerfile with podman, offline.
#
# Usage (as root, from anywhere):  deploy/image/build.sh [TAG]      (default otel-ebpf:0.1.0)
# Progress and the `podman run` command on stderr; on stdout, for scripts, key=value lines:
#   image=TAG  id=IMAGE_ID  containers_conf=PATH_OR_EMPTY  seccomp=PATH_OR_EMPTY
# Idempotent: each step is skipped when done, and podman's layer cache makes an unchanged
# rebuild take seconds.
#
# 1. Packages: podman, runc, debootstrap from Debian, when missing. Builds and runs use the
#    host network (the agent needs it anyway), so no bridge networking (iptables) is needed.
# 2. A private containers.conf, only with the settings this host needs, used through
#    CONTAINERS_CONF (the host's own /etc/containers config is never edited):
#      runtime = "runc"        cgroups are v1 or hybrid (crun refuses them)
#      cgroup_manager, events_logger = cgroupfs, file   systemd is not PID 1
#      default_ulimits         no CAP_SYS_RESOURCE: podman's defaults (nofile 1048576, ...)
#                              cannot be set, so the current hard limits are (nproc at
#                              most kernel.pid_max, where podman caps its own)
#    It is written to ${OTEL_EBPF_IMAGE_CACHE}/containers.conf, and the script prints the
#    `export CONTAINERS_CONF=...` line for running the image with the same settings.
#    A seccomp profile, only when the runtime's default one refuses bpf() and
#    perf_event_open() without CAP_SYS_ADMIN (podman < 4.4): that default, with the two
#    allowed to CAP_BPF and CAP_PERFMON holders as newer defaults do, in
#    ${OTEL_EBPF_IMAGE_CACHE}/seccomp.json.
# 3. The base image debian:12-slim: when podman has none, made with
#    `debootstrap --variant=minbase bookworm` from the host's Debian mirror (no image
#    registry is needed), slimmed as the official image is (no docs, man pages, locales),
#    tarred once into ${OTEL_EBPF_IMAGE_CACHE} and `podman import`ed.
# 4. `podman build --format docker` (the OCI format drops HEALTHCHECK) with --pull=never,
#    the host's CA bundle mounted for pip (a TLS-inspecting proxy's CA reaches the build
#    without going into the image).
# Environment: OTEL_EBPF_IMAGE_CACHE (default /var/cache/otel-ebpf/image),
#              DEBIAN_MIRROR (default: the host's first deb.debian.org-style bookworm URI).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "${here}/../.." && pwd)"
tag="${1:-otel-ebpf:0.1.0}"
base="debian:12-slim"
cache="${OTEL_EBPF_IMAGE_CACHE:-/var/cache/otel-ebpf/image}"
host_ca=/etc/ssl/certs/ca-certificates.crt

say() { printf 'build-image: %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
  say "must run as root (packages, debootstrap, rootful podman); try: sudo $0 $*"
  exit 1
fi
mkdir -p "${cache}"
exec 9>"${cache}/.build.lock"
flock 9

# 1. packages
packages=(podman runc debootstrap ca-certificates)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if (( ${#missing[@]} )); then
  say "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# 2. containers.conf, only what this host needs
conf="${cache}/containers.conf"
engine=() containers=()
if [[ $(stat -fc %T /sys/fs/cgroup) != cgroup2fs ]]; then
  engine+=('runtime = "runc"')
fi
if [[ ! -d /run/systemd/system ]]; then
  engine+=('cgroup_manager = "cgroupfs"' 'events_logger = "file"')
fi
cap_eff=$(awk '/^CapEff:/ {print $2}' /proc/self/status)
if (( (0x${cap_eff} >> 24 & 1) == 0 )); then  # CAP_SYS_RESOURCE is bit 24
  # podman caps its own process limit at kernel.pid_max, and cannot raise a child's past it
  nproc=$(ulimit -Hu)
  pid_max=$(cat /proc/sys/kernel/pid_max)
  if [[ ${nproc} == unlimited ]] || (( nproc > pid_max )); then nproc=${pid_max}; fi
  nofile=$(ulimit -Hn)
  containers+=("default_ulimits = [\"nofile=${nofile}:${nofile}\", \"nproc=${nproc}:${nproc}\"]")
fi
if (( ${#engine[@]} + ${#containers[@]} )); then
  {
    echo "# written by deploy/image/build.sh for this host; use with CONTAINERS_CONF=${conf}"
    echo "[containers]"
    printf '%s\n' "${containers[@]}"
    echo "[engine]"
    printf '%s\n' "${engine[@]}"
  } > "${conf}.new"
  mv -f "${conf}.new" "${conf}"
  export CONTAINERS_CONF="${conf}"
  say "podman settings for this host in ${conf}"
else
  rm -f "${conf}"
  conf=""
fi

seccomp="${cache}/seccomp.json"
default_profile=/usr/share/containers/seccomp.json
if ! python3 - "${default_profile}" "${seccomp}" <<'PY'
import json, sys
src, dst = sys.argv[1:]
try:
    profile = json.load(open(src))
except OSError:
    sys.exit(1)  # no profile file to extend: the runtime's built-in default is used
GATED = {"bpf": "CAP_BPF", "perf_event_open": "CAP_PERFMON"}
def allows(rule, name, cap):
    return (name in rule["names"] and rule.get("action") == "SCMP_ACT_ALLOW"
            and rule.get("includes", {}).get("caps") == [cap])
if all(any(allows(r, n, c) for r in profile["syscalls"]) for n, c in GATED.items()):
    sys.exit(1)  # already allowed: the default profile is enough
rules = []
for rule in profile["syscalls"]:
    if rule.get("action") == "SCMP_ACT_ERRNO" and set(GATED) & set(rule["names"]):
        rule = {**rule, "names": [n for n in rule["names"] if n not in GATED]}
    if rule["names"]:
        rules.append(rule)
for name, cap in GATED.items():
    rules.append({"names": [name], "action": "SCMP_ACT_ALLOW", "includes": {"caps": [cap]}})
    rules.append({"names": [name], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
                  "excludes": {"caps": ["CAP_SYS_ADMIN", cap]}})
with open(dst + ".new", "w") as out:
    json.dump({**profile, "syscalls": rules}, out, indent=1)
PY
then
  rm -f "${seccomp}"
  seccomp=""
else
  mv -f "${seccomp}.new" "${seccomp}"
  say "seccomp profile allowing bpf()/perf_event_open() to CAP_BPF/CAP_PERFMON: ${seccomp}"
fi

# 3. the base image
if ! podman image exists "${base}"; then
  tarball="${cache}/debian-12-minbase-slim.tar"
  if [[ ! -s ${tarball} ]]; then
    mirror="${DEBIAN_MIRROR:-$(apt-get indextargets --format '$(REPO_URI)' 'Release: bookworm' 2>/dev/null \
              | grep -m1 '/debian/$' || true)}"
    mirror="${mirror:-http://deb.debian.org/debian/}"
    rootfs="$(mktemp -d "${cache}/rootfs.XXXXXX")"
    trap 'rm -rf "${rootfs}"' EXIT
    say "debootstrap --variant=minbase bookworm from ${mirror} (a few minutes, once)"
    debootstrap --variant=minbase bookworm "${rootfs}" "${mirror}" >&2
    # as the official slim image: no docs (but licenses), man pages or locales, now or
    # from packages installed later; no apt lists or caches
    cat > "${rootfs}/etc/dpkg/dpkg.cfg.d/docker-slim" <<'DPKG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
DPKG
    find "${rootfs}/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    find "${rootfs}/usr/share/doc" -mindepth 1 -type d -empty -delete
    rm -rf "${rootfs}"/usr/share/{man,groff,info,lintian}/*
    find "${rootfs}/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias \
      -exec rm -rf {} +
    rm -rf "${rootfs}"/var/lib/apt/lists/* "${rootfs}"/var/cache/apt/*.bin
    tar -C "${rootfs}" --numeric-owner -cf "${tarball}.new" .
    mv -f "${tarball}.new" "${tarball}"
    rm -rf "${rootfs}"
    trap - EXIT
  fi
  say "importing ${tarball} as ${base}"
  podman import --change 'CMD ["bash"]' "${tarball}" "${base}" >/dev/null
fi

# 4. the image
mounts=()
revision=$(git -C "${root}" describe --always --dirty 2>/dev/null || echo unknown)
args=(--label "org.opencontainers.image.revision=${revision}")
if [[ -s ${host_ca} ]]; then
  mounts+=(-v "${host_ca}:/run/host-ca.crt:ro")
  args+=(--build-arg PIP_CERT=/run/host-ca.crt)
fi
say "podman build -t ${tag} ${root}"
podman build --format docker --pull=never --layers --network=host -t "${tag}" "${mounts[@]}" "${args[@]}" \
  -f "${root}/Dockerfile" "${root}" >&2
id=$(podman image inspect --format '{{.Id}}' "${tag}")
# earlier builds of this Dockerfile that no image uses any more (the layers of the one just
# built, the cache of the next build, stay)
podman image prune -f --filter "label=org.opencontainers.image.title=otel-ebpf" >/dev/null
say "built ${tag} (${id:0:12}); run it (README, Deploy):"
say "  ${conf:+CONTAINERS_CONF=${conf} }podman run -d --name otel-ebpf --pid=host --network=host" \
    "--user 0 --cap-drop=all --cap-add=BPF,PERFMON,SYS_PTRACE,SYSLOG,DAC_READ_SEARCH,CHECKPOINT_RESTORE" \
    "${seccomp:+--security-opt seccomp=${seccomp} }-v /sys/kernel/tracing:/sys/kernel/tracing:ro" \
    "-v /sys/fs/cgroup:/sys/fs/cgroup:ro -v /sys/kernel/btf:/sys/kernel/btf:ro" \
    "-v /lib/modules:/lib/modules:ro -v /usr/src:/usr/src:ro" \
    "-v /var/cache/otel-ebpf:/var/cache/otel-ebpf" \
    "-e OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4317 ${tag}"
printf 'image=%s\nid=%s\ncontainers_conf=%s\nseccomp=%s\n' "${tag}" "${id}" "${conf}" "${seccomp}"
