#!/usr/bin/env bash
# Prepares a Debian host to run otel-ebpf: packages, kernel headers for BCC, tracefs.
# Idempotent and fast when everything is in place (no apt-get call then). Run as root.
#   deploy/host-setup.sh          what the agent needs
#   deploy/host-setup.sh --test   plus what the test suite needs (compiler, nftables, ...)
set -euo pipefail

want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

say() { printf 'host-setup: %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
  say "must run as root (it installs packages and mounts tracefs); try: sudo $0 $*"
  exit 1
fi

release=$(uname -r)
case "$(uname -m)" in
  x86_64) flavour=amd64 ;;
  aarch64) flavour=arm64 ;;
  *) flavour=$(dpkg --print-architecture) ;;
esac

packages=(python3-bpfcc bpfcc-tools python3-venv python3-pip bpftool iproute2 ca-certificates
          linux-libc-dev)
if (( want_test )); then
  packages+=(gcc libc6-dev make nftables iputils-ping procps)
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

# Kernel headers: the running kernel's own package if the archive has it, else the
# distribution's current headers (valid for tracepoint-only programs).
headers_ok() {
  [[ -d /lib/modules/$release/build ]] || [[ -f /sys/kernel/kheaders.tar.xz ]]
}
exact_headers="linux-headers-$release"
if ! headers_ok; then
  if dpkg-query -W -f='${Status}' "$exact_headers" 2>/dev/null | grep -q "install ok installed"; then
    :
  elif ls /usr/src/linux-headers-*-"$flavour" >/dev/null 2>&1; then
    :
  else
    missing+=("__headers__")
  fi
fi

if (( ${#missing[@]} )); then
  export DEBIAN_FRONTEND=noninteractive
  say "installing: ${missing[*]}"
  apt-get update -qq
  real=()
  for p in "${missing[@]}"; do
    if [[ $p == "__headers__" ]]; then
      if apt-cache show "$exact_headers" >/dev/null 2>&1; then
        real+=("$exact_headers")
      else
        say "no $exact_headers in the archive; using linux-headers-$flavour instead"
        real+=("linux-headers-$flavour")
      fi
    else
      real+=("$p")
    fi
  done
  apt-get install -y -qq --no-install-recommends "${real[@]}" >/dev/null
fi

# Link distribution headers where the running kernel has none, as BCC looks for them.
if ! headers_ok; then
  build=$(ls -d /usr/src/linux-headers-*-"$flavour" 2>/dev/null | sort -V | tail -n 1)
  source_dir=${build%-"$flavour"}-common
  if [[ -z $build || ! -d $source_dir ]]; then
    say "no kernel headers found under /usr/src; install linux-headers-$flavour"
    exit 1
  fi
  mkdir -p "/lib/modules/$release"
  ln -sfn "$build" "/lib/modules/$release/build"
  ln -sfn "$source_dir" "/lib/modules/$release/source"
  say "linked /lib/modules/$release/{build,source} -> $build (headers of another kernel" \
      "version: fine for tracepoint-only programs)"
fi

if [[ ! -d /sys/kernel/tracing/events ]]; then
  mkdir -p /sys/kernel/tracing
  mount -t tracefs nodev /sys/kernel/tracing
  say "mounted tracefs at /sys/kernel/tracing"
fi
