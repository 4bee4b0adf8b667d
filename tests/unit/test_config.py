"""Config: file < OTEL_* environment < flags, and errors that name the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from otel_ebpf import cli
from otel_ebpf import config as cfg


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no config/otel-ebpf.yaml here
    config, source = cfg.load(env={})
    assert source is None
    # OTLP/HTTP, the OpenTelemetry specification's default transport
    assert config.exporter.protocol == "http/protobuf"
    assert config.exporter.resolved_endpoint() == "http://localhost:4318"
    assert config.probes.syscall_latency.enabled
    assert config.probes.syscall_latency.aggregation == "workload"
    assert config.probes.syscall_latency.sample_period == 64


def test_export_bounds_defaults_and_overrides(tmp_path: Path) -> None:
    exporter = cfg.Config().exporter
    # under the 4 MiB an OTLP gRPC receiver accepts by default, as the SDKs' 2000 series
    assert (exporter.max_request_bytes, exporter.max_request_points) == (4_000_000, 8192)
    assert exporter.max_request_bytes < 4 * 1024 * 1024
    assert (exporter.cardinality_limit, exporter.cardinality_limits) == (2000, {})
    path = write(tmp_path, "exporter:\n  max_request_bytes: 1048576\n"
                           "  cardinality_limits: {linux.syscall.duration: 5000}\n")
    exporter = cfg.load(path, env={})[0].exporter
    assert exporter.max_request_bytes == 1 << 20
    assert exporter.cardinality_limits == {"linux.syscall.duration": 5000}


def test_durations_and_precedence(tmp_path: Path) -> None:
    path = write(tmp_path, "exporter:\n  interval: 2m\n  endpoint: http://file:4317\n"
                           "probes:\n  syscall_latency:\n    interval: 250ms\n")
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://env:4317", "OTEL_METRIC_EXPORT_INTERVAL": "1500"}
    config, source = cfg.load(path, env=env)
    assert source == path
    assert config.exporter.endpoint == "http://env:4317"  # env beats the file
    assert config.exporter.interval == 1.5  # OTEL_METRIC_EXPORT_INTERVAL is milliseconds
    assert config.probes.syscall_latency.interval == 0.25
    config, _ = cfg.load(path, env=env, overrides={("exporter", "endpoint"): "http://flag:1"})
    assert config.exporter.endpoint == "http://flag:1"  # the flag beats both


def test_grpc_protocol_default_endpoint() -> None:
    config, _ = cfg.load(env={"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    assert config.exporter.resolved_endpoint() == "http://localhost:4317"


def test_resource_attributes_and_headers_from_env(tmp_path: Path) -> None:
    path = write(tmp_path, "resource_attributes:\n  team: core\n")
    config, _ = cfg.load(path, env={
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,k8s.cluster.name=a%20b",
        "OTEL_EXPORTER_OTLP_HEADERS": "api-key=s3cret",
        "OTEL_SERVICE_NAME": "agent-x",
    })
    assert config.resource_attributes == {"team": "core", "deployment.environment": "prod",
                                          "k8s.cluster.name": "a b"}
    assert config.exporter.headers == {"api-key": "s3cret"}
    assert config.service_name == "agent-x"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("probes:\n  syscall_latncy: {}\n",
         ["probes.syscall_latncy: unknown key", "did you mean 'syscall_latency'?"]),
        ("exporter:\n  protocol: grpcx\n", ["exporter.protocol", "'grpc' or 'http/protobuf'"]),
        ("exporter:\n  interval: soon\n", ["exporter.interval", "expected a duration"]),
        ("exporter:\n  interval: 0\n", ["exporter.interval", "greater than 0"]),
        ("probes:\n  syscall_latency:\n    max_entries: 10\n",
         ["probes.syscall_latency.max_entries", "greater than or equal to 64"]),
        ("probes:\n  syscall_latency:\n    filter:\n      comms: [a_name_longer_than_15]\n",
         ["probes.syscall_latency.filter.comms.0", "at most 15"]),
        ("exporter:\n  max_request_bytes: 1000\n",
         ["exporter.max_request_bytes", "greater than or equal to 16384"]),
        ("exporter:\n  cardinality_limit: 0\n",
         ["exporter.cardinality_limit", "greater than or equal to 1"]),
        ("exporter:\n  cardinality_limits: {linux.syscall.duration: -5}\n",
         ["exporter.cardinality_limits.linux.syscall.duration", "greater than or equal to 1"]),
        ("exporter:\n  queue:\n    spool_directory: spool\n",
         ["exporter.queue.spool_directory", "expected an absolute directory path"]),
        ("exporter:\n  queue:\n    spans:\n      max_spool_bytes: 1KiB\n",
         ["exporter.queue.spans.max_spool_bytes", "greater than or equal to 65536"]),
    ],
)
def test_errors_name_the_key_and_the_fix(tmp_path: Path, text: str, expected: list[str]) -> None:
    with pytest.raises(cfg.ConfigError) as err:
        cfg.load(write(tmp_path, text), env={})
    message = str(err.value)
    for fragment in expected:
        assert fragment in message
    assert str(tmp_path / "c.yaml") in message


def test_env_errors_name_the_variable() -> None:
    with pytest.raises(cfg.ConfigError, match="environment variable OTEL_EXPORTER_OTLP_PROTOCOL"):
        cfg.load(env={"OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"})
    with pytest.raises(cfg.ConfigError, match="OTEL_RESOURCE_ATTRIBUTES"):
        cfg.load(env={"OTEL_RESOURCE_ATTRIBUTES": "novalue"})


def test_not_a_mapping_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(cfg.ConfigError, match="top level must be a mapping"):
        cfg.load(write(tmp_path, "- a\n- b\n"), env={})
    with pytest.raises(cfg.ConfigError, match="is not valid YAML"):
        cfg.load(write(tmp_path, "a: [\n"), env={})


def test_cli_exits_2_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    path = write(tmp_path, "exporter:\n  protocl: grpc\n")
    assert cli.main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "exporter.protocl: unknown key" in err and "did you mean 'protocol'" in err
    assert "Traceback" not in err
    assert cli.main(["run", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_an_unusable_spool_directory_exits_2_naming_the_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("")
    path = write(tmp_path, f"exporter:\n  queue:\n    spool_directory: {tmp_path}/file/spool\n"
                           "probes:\n  cpu_profile:\n    enabled: false\n"
                           "  tcp_retransmit:\n    enabled: false\n")
    assert cli.main(["run", "--config", str(path), "--duration", "1s"]) == 2
    err = capsys.readouterr().err
    assert "exporter.queue.spool_directory: cannot use" in err and "Traceback" not in err


def test_cli_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "--duration", "forever"])
    assert exit_.value.code == 2
    assert "expected a duration" in capsys.readouterr().err
    assert cli.main([]) == 2


def test_example_config_is_the_defaults() -> None:
    example = Path(__file__).parents[2] / "config" / "otel-ebpf.yaml"
    config, _ = cfg.load(example, env={})
    assert config == cfg.Config()
