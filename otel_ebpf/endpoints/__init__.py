"""Local HTTP endpoints: /metrics for Prometheus, /healthz and /readyz for orchestrators,
and a live page (/) that needs no backend.

One aiohttp server, loopback by default (127.0.0.1:9464). Everything it serves is read
from what the agent already keeps for OTLP (the cumulative store, the probes, the last
export), never aggregated a second time; only the flame graph keeps its own bounded
window of recent CPU samples. aiohttp is imported only when the server starts, so an
agent with `endpoints.enabled: false` never loads it.
"""
