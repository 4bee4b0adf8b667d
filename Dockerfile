# otel-ebpf node agent image. BCC comes from Debian (python3-bpfcc) for the system Python;
# the agent is installed into a venv that sees the system site-packages.
#
# Build: deploy/image/build.sh (podman, offline: it makes debian:12-slim with debootstrap
# when no registry is reachable), or `podman build --format docker -t otel-ebpf .`
# (the docker format keeps the HEALTHCHECK; the OCI format drops it).
#
# Run it NOT privileged but as uid 0 holding only CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE,
# CAP_SYSLOG, CAP_DAC_READ_SEARCH and CAP_CHECKPOINT_RESTORE (the agent's list:
# otel_ebpf/kernel/capabilities.py), in the host's PID namespace, with these host paths
# mounted (deploy/kubernetes/daemonset.yaml does all of it, and says why each is needed;
# `otel-ebpf doctor` in the container names any that is missing):
#   /sys/kernel/tracing   read-only   tracefs (tracepoint ids, formats)
#   /sys/fs/cgroup        read-only   the host's cgroup tree (workload identity)
#   /sys/kernel/btf       read-only   kernel BTF (struct offsets)
#   /lib/modules, /usr/src read-only  kernel headers for BCC's compile (the build link in
#                                     /lib/modules/<release> points into /usr/src)
#   /var/cache/otel-ebpf  read-write  compiled programs, merged header trees (fast restarts)
# /proc comes with the host PID namespace (hostPID: true / --pid=host). The seccomp profile
# must allow bpf() and perf_event_open() to CAP_BPF / CAP_PERFMON holders: Kubernetes'
# RuntimeDefault of current containerd and CRI-O does; podman < 4.4's default does not
# (deploy/image/build.sh writes one that does). The README's "Deploy" section has the
# exact `podman run` command.
# uid 0, not a USER: capabilities a runtime adds reach uid 0 only (no ambient capabilities
# in Kubernetes), and tracefs is 0700 root.
FROM debian:12-slim

LABEL org.opencontainers.image.title="otel-ebpf" \
      org.opencontainers.image.description="eBPF node agent: syscall latency, CPU profiles and TCP retransmits as OpenTelemetry signals" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/debian:12-slim"

# DL3008 (pin apt versions): not pinned on purpose. BCC, Python and the kernel headers must
# be the ones of the base image's Debian point release; pins would break the build at every
# point release while adding no reproducibility the base image digest does not give.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv python3-bpfcc ca-certificates linux-libc-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/otel-ebpf
COPY pyproject.toml README.md ./
COPY otel_ebpf ./otel_ebpf
COPY probes ./probes
COPY config/otel-ebpf.yaml /etc/otel-ebpf/otel-ebpf.yaml

# PIP_CERT: a CA bundle for pip behind a TLS-inspecting proxy, mounted into the build by
# deploy/image/build.sh (podman build -v ...); unset otherwise. Not stored in the image.
ARG PIP_CERT
RUN python3 -m venv --system-site-packages /opt/otel-ebpf/venv \
 && /opt/otel-ebpf/venv/bin/pip install --no-cache-dir . \
 && rm -rf /root/.cache

# OTEL_EBPF_HEALTH_FILE: the running agent rewrites it every 5 s once its probes are
# attached; `otel-ebpf health` (the HEALTHCHECK, and the DaemonSet's probes) reads it. /tmp
# stays writable with a read-only root filesystem (the DaemonSet mounts an emptyDir there).
ENV PATH=/opt/otel-ebpf/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    OTEL_EBPF_CACHE_DIR=/var/cache/otel-ebpf \
    OTEL_EBPF_HEALTH_FILE=/tmp/otel-ebpf.health
# unhealthy: no probes attached after the start period (they compile for ~20 s at start),
# the agent's loop stuck for 30 s, or a probe not drained for 3 of its intervals
HEALTHCHECK --interval=30s --timeout=10s --start-period=2m --retries=3 \
    CMD ["otel-ebpf", "health"]
ENTRYPOINT ["otel-ebpf"]
CMD ["run", "--config", "/etc/otel-ebpf/otel-ebpf.yaml"]
# org.opencontainers.image.revision, the commit, is set by deploy/image/build.sh
# (podman build --label ...: a build argument would not reach podman 4.3's layer cache key)
