"""Configuration: one YAML file, overridden by the standard OTEL_* variables, overridden by
command-line flags. Validated once at start; every error names the key, where the value came
from, and what would be accepted.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import unquote

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    ValidationError,
    create_model,
    model_validator,
)

from otel_ebpf.config_base import (
    Duration,
    OnOffAuto,
    ProbeConfig,
    Size,
    Strict,
    parse_duration,
    parse_size,
    switch_word,
)
from otel_ebpf.probes import PROBE_TYPES

__all__ = ["Config", "ConfigError", "Duration", "ExporterConfig", "ProbeConfig",
           "ProbesConfig", "Size", "load", "parse_duration", "parse_size", "read_file",
           "switch_word"]

DEFAULT_CONFIG_PATHS = (Path("config/otel-ebpf.yaml"), Path("/etc/otel-ebpf/otel-ebpf.yaml"))
_Strict = Strict


class ProbeSections(_Strict):
    """`probes:`, one section per probe of the registry (otel_ebpf.probes), each of its
    probe's config class."""

    def section(self, name: str) -> ProbeConfig:
        value = getattr(self, name)
        assert isinstance(value, ProbeConfig)
        return value

    if TYPE_CHECKING:  # the fields are made from the registry
        def __getattr__(self, name: str) -> Any: ...


ProbesConfig = create_model(  # type: ignore[call-overload]
    "ProbesConfig", __base__=ProbeSections,
    **{name: (probe.config_class, Field(default_factory=probe.config_class))
       for name, probe in PROBE_TYPES.items()})

class RetryConfig(_Strict):
    """The agent's own retry (the exporters attempt once): the wait after a failed attempt
    doubles from initial_backoff to max_backoff, the most a returning collector waits."""

    initial_backoff: Duration = 0.25
    max_backoff: Duration = 2.0


class QueueBound(_Strict):
    """Spans waiting for the collector (~1.2 KB each as queued): past either bound the
    oldest are dropped (queue_full), or with a spool directory written there."""

    max_items: int = Field(default=8192, ge=1, le=1 << 24)
    max_bytes: Size = 16 << 20
    # the spool's files (serialized OTLP); past it the oldest files are dropped (spool_full)
    max_spool_bytes: Size = 256 << 20


class ProfileQueueBound(QueueBound):
    # items: profiles (one per workload and window); bytes: the serialized requests
    max_items: int = Field(default=4096, ge=1, le=1 << 24)


def absolute_path(value: Any) -> Any:
    if isinstance(value, str) and not Path(value).is_absolute():
        raise ValueError(f"expected an absolute directory path such as "
                         f"/var/lib/otel-ebpf/spool, got {value!r}")
    return value


class QueueConfig(_Strict):
    spans: QueueBound = Field(default_factory=QueueBound)
    profiles: ProfileQueueBound = Field(default_factory=ProfileQueueBound)
    # distinct workloads on the drop counters; the rest share an overflow series
    max_workloads: int = Field(default=100, ge=1, le=10_000)
    # None: no spool. A directory: spans and profiles past the memory bounds wait on disk
    # there (<dir>/spans, <dir>/profiles), and what is queued at shutdown too, for the
    # next run to deliver
    spool_directory: Annotated[str, BeforeValidator(absolute_path),
                               Field(min_length=1)] | None = None


class ExporterConfig(_Strict):
    enabled: bool = True
    # None: the OTLP default for the protocol (localhost:4318 HTTP, localhost:4317 gRPC)
    endpoint: str | None = None
    # the OpenTelemetry specification's default transport; gRPC also holds gRPC's ~10 MB
    # library and its threads in the agent
    protocol: Literal["grpc", "http/protobuf"] = "http/protobuf"
    headers: dict[str, str] = Field(default_factory=dict)
    insecure: bool | None = None
    compression: Literal["none", "gzip", "deflate"] | None = None
    timeout: Duration = 10.0
    interval: Duration = 10.0
    # Serialized size of one metrics request. A collector's OTLP gRPC receiver refuses more
    # than 4 MiB by default (max_recv_msg_size_mib): bigger exports go in several requests.
    max_request_bytes: int = Field(default=4_000_000, ge=16_384, le=1 << 28)
    # Data points in one metrics request (rotel drops a request of more than twice its
    # batch size, 2 x 8192, though it answers success).
    max_request_points: int = Field(default=8192, ge=1, le=1_000_000)
    # Series per metric, as the OpenTelemetry SDKs' cardinality limit: past it, a metric's
    # new series fold into its one series with otel.metric.overflow=true.
    cardinality_limit: int = Field(default=2000, ge=1, le=1_000_000)
    cardinality_limits: dict[Annotated[str, Field(min_length=1)],
                             Annotated[int, Field(ge=1, le=1_000_000)]] = Field(
        default_factory=dict)  # per metric name, overriding cardinality_limit
    retry: RetryConfig = Field(default_factory=RetryConfig)
    queue: QueueConfig = Field(default_factory=QueueConfig)

    def resolved_endpoint(self) -> str:
        if self.endpoint:
            return self.endpoint
        return "http://localhost:4318" if self.protocol == "http/protobuf" else (
            "http://localhost:4317"
        )


class SummaryConfig(_Strict):
    enabled: bool = True
    interval: Duration = 30.0
    top: int = Field(default=10, ge=1, le=1000)


class ProcessIdentityConfig(_Strict):
    # command lines hold secrets (passwords in flags): only with consent
    command_args: bool = False


class DockerConfig(_Strict):
    """Container names and images from a Docker-compatible Engine API (docker, podman)."""

    enabled: bool = True
    sockets: list[str] = Field(default_factory=lambda: [
        "/var/run/docker.sock", "/run/podman/podman.sock"])
    timeout: Duration = 2.0


class KubernetesConfig(_Strict):
    # auto: on when running in a pod (service account token present)
    mode: OnOffAuto = "auto"
    # default: https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT
    api_url: str | None = None
    token_path: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    ca_path: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")
    # default: $NODE_NAME (set it from spec.nodeName with the downward API), else host name
    node_name: str | None = None
    # pod labels copied as k8s.pod.label.<key>
    labels: list[str] = Field(default_factory=list)
    resync: Duration = 300.0
    timeout: Duration = 10.0


class CloudConfig(_Strict):
    """Opt-in: the agent touches no link-local address unless a detector is listed."""

    detectors: list[Literal["ec2", "gcp", "azure"]] = Field(default_factory=list)
    timeout: Duration = 2.0
    ec2_url: str = "http://169.254.169.254"
    gcp_url: str = "http://metadata.google.internal"
    azure_url: str = "http://169.254.169.254"


class WorkloadFilter(_Strict):
    """Only these workloads are observed (empty: all). Container ids and names, pod
    namespaces and labels; resolved to cgroup ids for the kernel where possible."""

    container_ids: list[str] = Field(default_factory=list)
    container_names: list[str] = Field(default_factory=list)
    pod_namespaces: list[str] = Field(default_factory=list)
    pod_labels: dict[str, str] = Field(default_factory=dict)


class IdentityConfig(_Strict):
    process: ProcessIdentityConfig = Field(default_factory=ProcessIdentityConfig)
    docker: DockerConfig = Field(default_factory=DockerConfig)
    kubernetes: KubernetesConfig = Field(default_factory=KubernetesConfig)
    cloud: CloudConfig = Field(default_factory=CloudConfig)
    filter: WorkloadFilter = Field(default_factory=WorkloadFilter)


def is_loopback(address: str) -> bool:
    """A literal loopback address, or `localhost` (no name is resolved here)."""
    if address == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return (mapped or ip).is_loopback


class EndpointsConfig(_Strict):
    """The local HTTP server (/metrics, /healthz, /readyz, /): loopback unless allowed."""

    enabled: bool = True
    address: str = "127.0.0.1"
    port: int = Field(default=9464, ge=0, le=65535)  # 0: any free port (logged)
    # serve on a non-loopback address: /metrics then tells anyone who can reach it what
    # runs on this host
    allow_remote: bool = False

    @model_validator(mode="after")
    def _loopback_unless_allowed(self) -> EndpointsConfig:
        if self.enabled and not self.allow_remote and not is_loopback(self.address):
            raise ValueError(
                f"address {self.address!r} is not a loopback address: /metrics would tell "
                "any host that reaches it which workloads run here. Use 127.0.0.1, ::1 or "
                "localhost, or set endpoints.allow_remote: true to serve other hosts "
                "(a Prometheus on another machine, a pod's probes)")
        return self


class Config(_Strict):
    service_name: str = "otel-ebpf"
    resource_attributes: dict[str, str] = Field(default_factory=dict)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    exporter: ExporterConfig = Field(default_factory=ExporterConfig)
    summary: SummaryConfig = Field(default_factory=SummaryConfig)
    if TYPE_CHECKING:
        probes: ProbeSections
    else:
        probes: ProbesConfig = Field(default_factory=ProbesConfig)
    identity: IdentityConfig = Field(default_factory=IdentityConfig)
    endpoints: EndpointsConfig = Field(default_factory=EndpointsConfig)


class ConfigError(Exception):
    """Invalid configuration; str() is the full, user-facing explanation."""


def _parse_kv_list(text: str) -> dict[str, str]:
    """OTEL_RESOURCE_ATTRIBUTES / OTEL_EXPORTER_OTLP_HEADERS: k=v,k2=v2, percent-encoded."""
    out: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"'{item}' is not key=value")
        out[unquote(key.strip())] = unquote(value.strip())
    return out


def _ms(text: str) -> float:
    return float(text) / 1000.0


# variable -> (config path, converter); applied in this order, later wins
_ENV: tuple[tuple[str, tuple[str, ...], Any], ...] = (
    ("OTEL_SERVICE_NAME", ("service_name",), str),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", ("exporter", "endpoint"), str),
    ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", ("exporter", "endpoint"), str),
    ("OTEL_EXPORTER_OTLP_PROTOCOL", ("exporter", "protocol"), str),
    ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", ("exporter", "protocol"), str),
    ("OTEL_EXPORTER_OTLP_HEADERS", ("exporter", "headers"), _parse_kv_list),
    ("OTEL_EXPORTER_OTLP_INSECURE", ("exporter", "insecure"), str),
    ("OTEL_EXPORTER_OTLP_COMPRESSION", ("exporter", "compression"), str),
    ("OTEL_EXPORTER_OTLP_TIMEOUT", ("exporter", "timeout"), _ms),
    ("OTEL_METRIC_EXPORT_INTERVAL", ("exporter", "interval"), _ms),
    ("OTEL_RESOURCE_ATTRIBUTES", ("resource_attributes",), _parse_kv_list),
)


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    if isinstance(value, dict) and isinstance(node.get(path[-1]), dict):
        node[path[-1]] = {**node[path[-1]], **value}  # env adds to file attributes
    else:
        node[path[-1]] = value


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _explain(
    exc: ValidationError, origins: Mapping[tuple[str, ...], str], default_origin: str
) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        dotted = ".".join(loc)
        origin = next(
            (origins[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in origins),
            default_origin,
        )
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(Config, loc)
            near = difflib.get_close_matches(loc[-1], allowed, n=1)
            hint = f"did you mean '{near[0]}'?" if near else "remove it"
            lines.append(
                f"  {dotted}: unknown key (in {origin}); {hint} "
                f"Known keys here: {', '.join(allowed)}"
            )
            continue
        got = err.get("input")
        shown = f" (got {got!r})" if not isinstance(got, dict | list) else ""
        msg = str(err["msg"]).removeprefix("Value error, ")
        lines.append(f"  {dotted}: {msg}{shown} (from {origin})")
    return "invalid configuration:\n" + "\n".join(lines)


_FIX = ("Fix: point --config at a readable YAML file of keys (config/otel-ebpf.yaml is "
        "a complete example), or leave --config out to run on the embedded defaults.")


def _bad_file(path: Path, problem: str) -> ConfigError:
    return ConfigError(f"config file {path} {problem}. {_FIX}")


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A parser error in one line: what and where (PyYAML's own text spans several)."""
    mark = getattr(exc, "problem_mark", None)
    what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"is not valid YAML ({what}{where})"


def read_file(path: Path) -> dict[str, Any]:
    """The file's top-level mapping. Every way a file can be unusable - missing, a
    directory, a dangling link, unreadable, not UTF-8, not YAML, not a mapping - is a
    ConfigError naming the file and the fix, never another exception."""
    try:
        if not path.exists():
            problem = ("is a symbolic link to a missing file" if path.is_symlink()
                       else "does not exist")
            raise _bad_file(path, problem)
        if not path.is_file():  # a FIFO would block the read; a directory cannot be read
            kind = "a directory" if path.is_dir() else "not a regular file"
            raise _bad_file(path, f"is {kind}")
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise _bad_file(path, f"cannot be read ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise _bad_file(path, f"is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at "
                              f"offset {exc.start}); save it as UTF-8") from exc
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _bad_file(path, _yaml_problem(exc)) from exc
    except (ValueError, TypeError, RecursionError) as exc:
        # PyYAML's constructors: a date that is no date (2024-02-30), nesting too deep
        raise _bad_file(path, f"has a value YAML cannot build ({exc})") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise _bad_file(path, f"holds a {type(loaded).__name__}, but its top level must "
                              "be a mapping of keys such as `probes:`")
    return loaded


def load(
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[tuple[str, ...], Any] | None = None,
) -> tuple[Config, Path | None]:
    """Build the effective config. Returns it with the file it was read from (None: the
    embedded defaults). Raises ConfigError with a message fit for the user."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    source: Path | None = None
    if path is None:
        # present, even broken: a bad file where the agent looks is an error, not defaults
        path = next((p for p in DEFAULT_CONFIG_PATHS if p.is_symlink() or p.exists()), None)
    if path is not None:
        raw, source = read_file(path), path

    origins: dict[tuple[str, ...], str] = {}
    for var, target, convert in _ENV:
        if (text := env.get(var)) is None or text == "":
            continue
        try:
            value = convert(text)
        except ValueError as exc:
            raise ConfigError(f"environment variable {var}={text!r}: {exc}") from exc
        _set(raw, target, value)
        origins[target] = f"environment variable {var}"
    for target, value in (overrides or {}).items():
        _set(raw, target, value)
        origins[target] = "--" + target[-1].replace("_", "-")
    try:
        return Config.model_validate(raw), source
    except ValidationError as exc:
        message = _explain(exc, origins, f"config file {source}" if source else "defaults")
        where = f" in {source}" if source else ""
        raise ConfigError(message + f"\nFix the keys above{where}; `otel-ebpf run --help` and "
                          "README.md list every key.") from exc
