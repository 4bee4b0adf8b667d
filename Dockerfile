# otel-ebpf node agent image. BCC comes from Debian (python3-bpfcc) for the system Python;
# the agent is installed into a venv that sees the system site-packages.
#
# Run it NOT privileged but as uid 0 holding only CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE,
# CAP_SYSLOG and CAP_DAC_READ_SEARCH, in the host's PID namespace, with these host paths
# mounted (deploy/kubernetes/daemonset.yaml does all of it, and says why each is needed):
#   /sys/kernel/tracing   read-only   tracefs (tracepoint ids, formats)
#   /sys/fs/cgroup        read-only   the host's cgroup tree (workload identity)
#   /sys/kernel/btf       read-only   kernel BTF
#   /lib/modules, /usr/src read-only  kernel headers for BCC's compile
#   /var/cache/otel-ebpf  read-write  compiled programs, merged header trees (fast restarts)
# /proc comes with the host PID namespace (hostPID: true / docker run --pid=host).
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

RUN python3 -m venv --system-site-packages /opt/otel-ebpf/venv \
 && /opt/otel-ebpf/venv/bin/pip install --no-cache-dir . \
 && rm -rf /root/.cache

ENV PATH=/opt/otel-ebpf/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    OTEL_EBPF_CACHE_DIR=/var/cache/otel-ebpf
ENTRYPOINT ["otel-ebpf"]
CMD ["run", "--config", "/etc/otel-ebpf/otel-ebpf.yaml"]
