"""Command line: `otel-ebpf run | doctor | health | probes | version`.

Exit codes: 0 ok, 2 bad usage or configuration, 1 runtime failure.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from otel_ebpf import __version__, health
from otel_ebpf import config as cfg
from otel_ebpf import probes as registry

log = logging.getLogger("otel_ebpf")
EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2


def _duration_arg(text: str) -> float:
    try:
        value = float(cfg.parse_duration(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if value <= 0:
        raise argparse.ArgumentTypeError("must be greater than zero")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otel-ebpf",
        description="eBPF node agent: measures in the kernel, ships OpenTelemetry over OTLP.",
        epilog="Exit codes: 0 ok, 1 runtime failure, 2 bad usage or configuration.",
    )
    parser.add_argument("--version", action="version", version=f"otel-ebpf {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", type=Path, metavar="FILE",
                       help="YAML config file (default: config/otel-ebpf.yaml, then "
                            "/etc/otel-ebpf/otel-ebpf.yaml, else the embedded defaults)")

    run = sub.add_parser("run", help="run the agent (needs root or CAP_BPF+CAP_PERFMON)",
                         description="Load the enabled probes and export until SIGTERM/SIGINT "
                                     "or --duration; SIGHUP re-reads the config file and "
                                     "reloads the probes whose settings changed. Flags "
                                     "override OTEL_* variables, which override the config "
                                     "file.")
    add_config(run)
    run.add_argument("--duration", type=_duration_arg, metavar="DURATION",
                     help="stop cleanly after this long, e.g. 30s or 5m (default: run until "
                          "signalled)")
    run.add_argument("--otlp-endpoint", metavar="URL",
                     help="OTLP endpoint (default http://localhost:4318 for http/protobuf, "
                          ":4317 for grpc)")
    run.add_argument("--otlp-protocol", choices=("grpc", "http/protobuf"),
                     help="OTLP transport (default http/protobuf)")
    run.add_argument("--export-interval", type=_duration_arg, metavar="DURATION",
                     help="how often metrics and profiles are exported (default 10s); "
                          "spans go out as soon as a batch fills, or every 0.5s")
    run.add_argument("--no-export", action="store_true",
                     help="do not export OTLP at all (summary only)")
    run.add_argument("--summary-interval", type=_duration_arg, metavar="DURATION",
                     help="how often the human-readable summary is printed (default 30s)")
    run.add_argument("--no-summary", action="store_true", help="do not print the summary")
    run.add_argument("--profiles-folded", type=Path, metavar="FILE",
                     help="also write the CPU profile as collapsed stacks (a;b;c N, "
                          "cumulative, rewritten every export) for flamegraph tools")
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"))

    doctor = sub.add_parser("doctor", help="check that this machine can run the probes",
                            description="One line per check: ok, warn or FAIL with a fix. "
                                        "Exit 0 when every enabled probe can load, else 1.")
    add_config(doctor)
    doctor.add_argument("--no-load", action="store_true",
                        help="skip compiling and verifying each probe (faster)")

    check = sub.add_parser(
        "health", help="is the agent running here working (for health checks)",
        description=f"Reads the report a running agent rewrites every {health.HEARTBEAT_S:g}s "
                    f"into ${health.ENV} (the image sets it). Exit 0 when the agent has "
                    "its probes attached and drains them, else 1.")
    check.add_argument("--file", type=Path, metavar="FILE",
                       help=f"the report (default: ${health.ENV})")
    sub.add_parser("probes", help="list the probes, what each hooks and exports")
    sub.add_parser("version", help="print the version")
    return parser


def _overrides(args: argparse.Namespace) -> dict[tuple[str, ...], Any]:
    pairs: list[tuple[tuple[str, ...], Any]] = [
        (("exporter", "endpoint"), args.otlp_endpoint),
        (("exporter", "protocol"), args.otlp_protocol),
        (("exporter", "interval"), args.export_interval),
        (("summary", "interval"), args.summary_interval),
        (("log_level",), args.log_level),
        (("exporter", "enabled"), False if args.no_export else None),
        (("summary", "enabled"), False if args.no_summary else None),
        # every probe that produces profiles writes them there
        *((("probes", probe.name, "folded_path"), args.profiles_folded)
          for probe in registry.types_producing(registry.Signal.PROFILES)),
    ]
    return {path: value for path, value in pairs if value is not None}


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def _load_config(args: argparse.Namespace, overrides: dict[tuple[str, ...], Any]
                 ) -> cfg.Config | None:
    try:
        config, source = cfg.load(args.config, overrides=overrides)
    except cfg.ConfigError as exc:
        print(f"otel-ebpf: {exc}", file=sys.stderr)
        return None
    _setup_logging(config.log_level)
    log.info("configuration: %s", source or "embedded defaults")
    return config


def _kernel_context(cache_reads: bool = True) -> tuple[Any, Any]:
    from otel_ebpf.kernel import cache, headers, syscalls
    from otel_ebpf.kernel.engine import Engine

    source = headers.discover()
    if source is not None:
        log.info("kernel headers: %s", source.describe())
    roots = [p for p in (source and (source.bcc_kernel_source or source.path),) if p]
    directory = cache.directory()
    images = None if directory is None else cache.ImageCache(
        directory, Path(str(roots[0])) if roots else None, read=cache_reads)
    return Engine(source, cache=images), syscalls.load([Path(str(r)) for r in roots])


def cmd_run(args: argparse.Namespace) -> int:
    from otel_ebpf.daemon import build_agent
    from otel_ebpf.export.spool import SpoolError
    from otel_ebpf.kernel.threads import name_new_threads
    from otel_ebpf.memory import configure_malloc

    configure_malloc()
    name_new_threads()

    overrides = _overrides(args)
    config = _load_config(args, overrides)
    if config is None:
        return EXIT_USAGE
    engine, syscall_table = _kernel_context()
    log.info("syscall names: %s", syscall_table.source)
    try:
        agent = build_agent(config, engine, syscall_table,
                            lambda: cfg.load(args.config, overrides=overrides)[0],
                            health_file=health.path_from_env())
    except SpoolError as exc:
        print(f"otel-ebpf: exporter.queue.spool_directory: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return asyncio.run(agent.run(args.duration))


def cmd_doctor(args: argparse.Namespace) -> int:
    from otel_ebpf.kernel import preflight as pf

    config = _load_config(args, {})
    if config is None:
        return EXIT_USAGE
    logging.getLogger("otel_ebpf").setLevel(logging.WARNING)
    # doctor compiles for real (that is the check) and leaves the agent a warm cache
    engine, syscall_table = _kernel_context(cache_reads=False)
    common = [pf.check_privileges(), pf.check_bpf_syscall(), pf.check_tracefs(),
              pf.check_btf(), pf.check_headers(engine.headers), pf.check_cgroup(), pf.check_bcc(),
              pf.check_lockdown(), pf.check_perf_paranoid(), pf.check_kprobes()]
    checks = list(common)
    for probe in registry.build(config, registry.ProbeContext(syscall_table)):
        required = [h.event for h in probe.hooks if h.event and h.required]
        optional = [h.event for h in probe.hooks if h.event and not h.required]
        if required or optional:
            checks.append(pf.check_events(probe.name, required, optional))
        if any(h.kind == "perf_event" for h in probe.hooks):
            checks.append(pf.check_cpu_clock(probe.name))
        if not args.no_load and not any(c.status == pf.FAIL for c in checks):
            checks.append(pf.timed_load_check(probe.name, lambda p=probe: p.verify(engine)))
    for check in checks:
        print(check.line())
    failed = [c for c in checks if c.status == pf.FAIL]
    enabled = registry.enabled_names(config)
    if failed:
        print(f"\n{len(failed)} check(s) failed: the enabled probes ({', '.join(enabled)}) "
              "cannot all load here.")
        return EXIT_RUNTIME
    print(f"\nall enabled probes can load: {', '.join(enabled) or 'none enabled'}")
    return EXIT_OK


def cmd_health(args: argparse.Namespace) -> int:
    path = args.file or health.path_from_env()
    if path is None:
        print(f"otel-ebpf: health: no report to read: set {health.ENV} to the same file for "
              "the agent and for this check (the image sets /tmp/otel-ebpf.health), or pass "
              "--file", file=sys.stderr)
        return EXIT_USAGE
    ok, why = health.check(path)
    print(f"{'healthy' if ok else 'unhealthy'}: {why}")
    return EXIT_OK if ok else EXIT_RUNTIME


def cmd_probes(_: argparse.Namespace) -> int:
    for name, probe in registry.PROBE_TYPES.items():
        print(f"{name}: {probe.summary}")
        print(f"  hooks:   {', '.join(str(h) for h in probe.hooks)}")
        print(f"  signals: {', '.join(sorted(s.value for s in probe.signals))}")
        for d in probe.exports:
            print(f"  exports: {d.name} ({d.unit}) - {d.description}")
    return EXIT_OK


def cmd_version(_: argparse.Namespace) -> int:
    print(f"otel-ebpf {__version__}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    commands = {"run": cmd_run, "doctor": cmd_doctor, "health": cmd_health,
                "probes": cmd_probes, "version": cmd_version}
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(commands[args.command](args))
    except KeyboardInterrupt:
        return EXIT_OK
