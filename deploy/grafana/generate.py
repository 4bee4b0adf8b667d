#!/usr/bin/env python3
"""Generate the Grafana dashboards for otel-ebpf with grafana-foundation-sdk.

Two dashboards, one per way Grafana gets the agent's metrics through Prometheus:

- otel-ebpf-scrape.json: Prometheus scrapes the agent's /metrics, where the syscall
  latency is a classic histogram (`linux_syscall_duration_seconds_bucket`, `le` at the
  kernel's own bucket boundaries);
- otel-ebpf-otlp.json: the agent sends OTLP to Prometheus 3 (`--web.enable-otlp-receiver`,
  the resource attributes of PROMOTED promoted), where it is a native histogram
  (`linux_syscall_duration_seconds`).

Both: syscall latency heatmap and p99 by workload, calls per second, retransmits by peer
and by workload, and the agent's own health. Usage (from the repository root, with the
test extras installed):

    python deploy/grafana/generate.py           # rewrite the two JSON files
    python deploy/grafana/generate.py --check   # exit 1 if they are not what it generates
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard, heatmap, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

HERE = Path(__file__).parent
SOURCES = ("scrape", "otlp")
# resource attributes Prometheus 3 is told to promote to labels (otlp.promote_resource_
# attributes), the same the agent's /metrics puts on its series
PROMOTED = ("service.name", "service.namespace", "host.name", "container.id",
            "container.name", "k8s.namespace.name", "k8s.pod.name", "k8s.container.name",
            "linux.cgroup.path", "linux.cgroup.id", "process.pid", "process.executable.name")
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
SEL = 'service_name=~"$service"'
WORKLOAD = "service_name, process_executable_name"
RATE = "[$__rate_interval]"


def latency(source: str) -> dict[str, str]:
    """The syscall latency expressions of a source: classic buckets or native."""
    if source == "scrape":
        buckets = f"rate(linux_syscall_duration_seconds_bucket{{{SEL}}}{RATE})"
        return {
            "heatmap": f"sum by (le) ({buckets})",
            "p99": f"histogram_quantile(0.99, sum by (le, {WORKLOAD}) ({buckets}))",
            "calls": f"topk(10, sum by ({WORKLOAD}, linux_syscall_name) "
                     f"(rate(linux_syscall_duration_seconds_count{{{SEL}}}{RATE})))",
        }
    native = f"rate(linux_syscall_duration_seconds{{{SEL}}}{RATE})"
    return {
        "heatmap": f"sum({native})",
        "p99": f"histogram_quantile(0.99, sum by ({WORKLOAD}) ({native}))",
        "calls": f"topk(10, histogram_count(sum by ({WORKLOAD}, linux_syscall_name) "
                 f"({native})))",
    }


def expressions(source: str) -> dict[str, str]:
    """Every PromQL expression of the dashboard for `source`, by panel title."""
    lat = latency(source)
    agent = 'service_name="otel-ebpf"'
    return {
        "Syscall latency": lat["heatmap"],
        "Syscall latency p99 by workload": lat["p99"],
        "Syscalls per second (top 10)": lat["calls"],
        "TCP retransmits by peer (top 10)":
            "topk(10, sum by (network_peer_address) "
            f"(rate(linux_tcp_retransmits_total{RATE})))",
        "TCP retransmits by workload":
            f"sum by ({WORKLOAD}) (rate(linux_tcp_retransmits_total{{{SEL}}}{RATE}))",
        "Agent CPU": f"sum by (cpu_mode) (rate(process_cpu_time_seconds_total{{{agent}}}"
                     f"{RATE}))",
        "Agent memory": f"process_memory_usage_bytes{{{agent}}}",
        "Lost events per second":
            f"sum(rate(otel_ebpf_probe_lost_events_total{RATE})) or vector(0)",
        "Kernel map fill": "max by (probe, map) (otel_ebpf_probe_map_fill_ratio)",
        "Series per metric": "max by (metric) (otel_ebpf_metrics_series)",
    }


def query(expr: str, legend: str = "", fmt: PromQueryFormat | None = None
          ) -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr).legend_format(legend or "__auto")
    return q.format(fmt) if fmt is not None else q


def build(source: str) -> dashboard.Dashboard:
    exprs = expressions(source)
    name = {"scrape": "Prometheus scrape of /metrics", "otlp": "OTLP into Prometheus 3"}[source]

    def series(title: str, unit: str, legend: str = "", width: int = 12) -> timeseries.Panel:
        return (timeseries.Panel().title(title).datasource(DATASOURCE).unit(unit)
                .span(width).height(8).with_target(query(exprs[title], legend)))

    heat = (heatmap.Panel().title("Syscall latency").datasource(DATASOURCE).span(24).height(9)
            .description("Calls per second by latency bucket; the buckets are the "
                         "kernel's own (2^(i/4) s), nothing is interpolated.")
            .with_target(query(exprs["Syscall latency"], "{{le}}",
                               PromQueryFormat.HEATMAP if source == "scrape" else None))
            .calculate(False).y_axis(heatmap.YAxisConfig().unit("s")))
    variable_metric = ("linux_syscall_duration_seconds_count" if source == "scrape"
                       else "linux_syscall_duration_seconds")
    return (
        dashboard.Dashboard(f"otel-ebpf: {name}")
        .uid(f"otel-ebpf-{source}")
        .tags(["otel-ebpf", "ebpf", source])
        .description(f"Syscall latency, TCP retransmits and the agent's health ({name}).")
        .refresh("30s").time("now-1h", "now")
        .with_variable(dashboard.DatasourceVariable("datasource").label("Prometheus")
                       .type("prometheus"))
        .with_variable(dashboard.QueryVariable("service").label("Workload")
                       .datasource(DATASOURCE)
                       .query(f"label_values({variable_metric}, service_name)")
                       .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
                       .include_all(True).all_value(".*").multi(True))
        .with_row(dashboard.Row("Syscalls"))
        .with_panel(heat)
        .with_panel(series("Syscall latency p99 by workload", "s",
                           "{{service_name}} {{process_executable_name}}"))
        .with_panel(series("Syscalls per second (top 10)", "reqps",
                           "{{process_executable_name}} {{linux_syscall_name}}"))
        .with_row(dashboard.Row("TCP"))
        .with_panel(series("TCP retransmits by peer (top 10)", "pps",
                           "{{network_peer_address}}"))
        .with_panel(series("TCP retransmits by workload", "pps",
                           "{{service_name}} {{process_executable_name}}"))
        .with_row(dashboard.Row("Agent"))
        .with_panel(series("Agent CPU", "percentunit", "{{cpu_mode}}", 6))
        .with_panel(series("Agent memory", "bytes", "RSS", 6))
        .with_panel(stat.Panel().title("Lost events per second").datasource(DATASOURCE)
                    .span(4).height(8).unit("short")
                    .with_target(query(exprs["Lost events per second"])))
        .with_panel(series("Kernel map fill", "percentunit", "{{probe}} {{map}}", 4))
        .with_panel(series("Series per metric", "short", "{{metric}}", 4))
    )


def render(source: str) -> str:
    model = json.loads(json.dumps(build(source).build(), cls=JSONEncoder))
    for number, panel in enumerate(model["panels"], start=1):  # Grafana wants them unique
        panel["id"] = number
    return json.dumps(model, indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    check = argv[1:] == ["--check"]
    stale = []
    for source in SOURCES:
        path = HERE / f"otel-ebpf-{source}.json"
        text = render(source)
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
    if stale:
        print(f"{', '.join(stale)} differ from what deploy/grafana/generate.py makes; run it",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
