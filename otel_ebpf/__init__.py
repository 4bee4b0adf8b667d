"""otel-ebpf: an eBPF node agent that ships kernel-aggregated telemetry as OpenTelemetry."""

__version__ = "0.1.0"
