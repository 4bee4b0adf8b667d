# otel-ebpf node agent image. BCC comes from Debian (python3-bpfcc) for the system Python;
# the agent is installed into a venv that sees the system site-packages.
# Run privileged (or with CAP_BPF, CAP_PERFMON) with the host's /sys/kernel/tracing,
# /sys/fs/cgroup, /lib/modules and /usr/src mounted read-only for headers.
FROM debian:12-slim

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

ENV PATH=/opt/otel-ebpf/venv/bin:$PATH
ENTRYPOINT ["otel-ebpf"]
CMD ["run", "--config", "/etc/otel-ebpf/otel-ebpf.yaml"]
