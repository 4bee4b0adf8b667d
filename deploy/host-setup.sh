#!/usr/bin/env bash
# Prepares a Debian host to run otel-ebpf: packages, kernel headers for BCC, tracefs.
# Idempotent and fast when everything is in place (no apt-get call then). Run as root.
#   deploy/host-setup.sh          what the agent needs
#   deploy/host-setup.sh --test   plus what the test suite needs (compiler, nftables, ...,
#                                 Debian's containerd + runc for the Kubernetes node tier,
#                                 prometheus for the /metrics scrape test, chromium for the
#                                 live page's, nodejs for JIT frames): the tests run private instances; the
#                                 packages' system services are never started nor enabled by
#                                 this script (policy-rc.d), or if they were, stopped again
#   deploy/host-setup.sh --bench  plus what `make bench` needs: --test's packages, Debian's
#                                 redis (server and redis-benchmark) for the real-application
#                                 suite, linux-perf for its optional breakdown. The bench runs
#                                 its own private redis-server; the package's system service is
#                                 never started (policy-rc.d) or, if it was, stopped again.
set -euo pipefail

want_test=0
want_bench=0
case "${1:-}" in
  "") ;;
  --test) want_test=1 ;;
  --bench) want_test=1; want_bench=1 ;;
  *) printf 'host-setup: unknown argument %s (expected --test or --bench)\n' "$1" >&2; exit 2 ;;
esac

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
  # libcap2-bin: capsh, which runs the agent with exactly its capabilities; nodejs: the
  # JIT-map profile test (node --perf-basic-prof)
  packages+=(gcc libc6-dev make nftables iputils-ping procps containerd runc libcap2-bin
            prometheus chromium nodejs)
fi
if (( want_bench )); then
  packages+=(redis-server redis-tools linux-perf)
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

# The service a Debian package (redis-server, prometheus) may have started despite
# policy-rc.d (a host whose own policy allows it): stop it, and on systemd keep it from
# starting at boot. Only called right after this script installed the package, so it never
# stops a service that an admin runs on purpose. The tests and the bench run their own.
#   stop_packaged_service SERVICE PROCESS-NAME PIDFILE
stop_packaged_service() {
  local service=$1 comm=$2 pidfile=$3 pid
  if [[ -d /run/systemd/system ]]; then
    systemctl disable --now "$service.service" >/dev/null 2>&1 || true
  elif [[ -x /etc/init.d/$service ]]; then
    timeout 30 "/etc/init.d/$service" stop >/dev/null 2>&1 || true
  fi
  if [[ -f $pidfile ]]; then
    pid=$(cat "$pidfile")
    if [[ $pid =~ ^[0-9]+$ ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]]; then
      kill "$pid"
      for _ in $(seq 50); do [[ -d /proc/$pid ]] || break; sleep 0.1; done
    fi
  fi
  if [[ -f $pidfile ]] && [[ -d /proc/$(cat "$pidfile") ]]; then
    say "the $service service the package started (pid $(cat "$pidfile")) is still running"
    exit 1
  fi
  say "installed $service; its system service is not running (tests and bench start their own)"
}

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
  # Debian's redis-server, containerd and prometheus start a system-wide service on install;
  # the bench and the tests want none (they run private instances). policy-rc.d (exit 101:
  # "action forbidden") is how Debian lets the admin veto service starts from maintainer
  # scripts; only made here if the host has none, and removed after.
  made_policy=0
  if [[ " ${real[*]} " =~ \ (redis-server|containerd|prometheus)\  && ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\n# host-setup.sh: no service starts while it installs packages\nexit 101\n' \
      > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get install -y -qq --no-install-recommends "${real[@]}" >/dev/null
  if (( made_policy )); then
    rm -f /usr/sbin/policy-rc.d
    trap - EXIT
  fi
  if [[ " ${real[*]} " == *" redis-server "* ]]; then
    stop_packaged_service redis-server redis-server /run/redis/redis-server.pid
  fi
  if [[ " ${real[*]} " == *" prometheus "* ]]; then
    stop_packaged_service prometheus prometheus /run/prometheus/prometheus.pid
  fi
  if [[ " ${real[*]} " == *" containerd "* && -d /run/systemd/system ]]; then
    systemctl disable --now containerd.service >/dev/null 2>&1 || true
  fi
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
