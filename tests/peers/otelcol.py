"""Run a real OpenTelemetry Collector that accepts OTLP *profiles*, as an e2e test peer.

Why: rotel does not implement OTLP profiles (see ``tests/peers/rotel.py``), so the product's
profiles exporter needs a real, independent decoder on the other end of the wire. This is
the upstream Go collector (pdata decodes every field), built from Go modules with the
official builder (ocb) by ``tests/peers/build-otelcol.sh`` from
``tests/peers/otelcol-builder.yaml``: otlp receiver, debug exporter, file exporter. The
binary is cached outside the repository (``${OTELCOL_CACHE:-/var/cache/otel-ebpf/otelcol}
/0.157.0/otelcol-otel-ebpf-test``); ``ensure_built()`` builds it on first use.

Schema pin (profiles are "v1development", and the wire format changed between proto
releases, so the collector must decode *exactly* what our Python classes encode):

* The installed Python ``opentelemetry-proto`` 1.45.2 says (package README) it is generated
  from opentelemetry-proto **v1.10.0**. Checked against the descriptors: profiles.proto has
  ``ProfilesDictionary`` {mapping_table=1, location_table=2, function_table=3, link_table=4,
  string_table=5, attribute_table=6 (``KeyValueAndUnit``), stack_table=7 (``Stack``)};
  ``ExportProfilesServiceRequest`` {resource_profiles=1, dictionary=2}; ``Profile`` with a
  single ``sample_type=1`` and ``period_type=5``/``period=6``; ``Sample`` {stack_index=1,
  attribute_indices=2, link_index=3, values=4, timestamps_unix_nano=5} (no
  ``locations_start_index``); and common.proto has ``KeyValue.key_strindex=3`` and
  ``AnyValue.string_value_strindex=8``.
* Dumping the same descriptors (message, field name, number, label, type) from the Go
  modules ``go.opentelemetry.io/proto/slim/otlp{,/profiles/v1development,/collector/
  profiles/v1development}`` for every release gives: identical to v1.10.0, v1.11.0 and
  v1.11.1 (v1.10 -> v1.11 changed only comments); **different** from v1.9.0, whose Sample is
  {stack_index=1, values=2, attribute_indices=3, link_index=4} and which lacks the two
  ``*_strindex`` common fields (so a v1.9 decoder would read our attribute indices as
  sample values), and from v1.8.0.
* Collector pdata (``go mod download go.opentelemetry.io/collector/pdata@vX``): its go.mod
  requires the slim proto modules it is generated from, and its hand-written decoder
  ``internal/generated_proto_sample.go`` shows the Sample field numbers. pdata v1.46.0-v1.53.0
  (collector v0.140-v0.147) use proto v1.9.0 and decode ``values`` from field 2 -> wrong;
  pdata v1.54.0-v1.63.0 (collector v0.148.0-v0.157.0) use proto v1.10.0 and decode
  ``values`` from field 4 plus ``StringValueStrindex`` -> right; v1.64+ (v0.158+) use v1.11.x,
  wire-identical. We pin **collector v0.157.0** (pdata v1.63.0, pprofile v0.157.0): the
  newest release generated from exactly opentelemetry-proto v1.10.0. Contrib fileexporter
  v0.157.0 requires the same pdata v1.63.0; the built go.mod is kept next to the binary as
  ``go.mod.txt`` for provenance. ``test_otelcol_peer.py`` proves the pin end to end.
* Profiles pipelines need the alpha feature gate ``service.profilesSupport`` (registered in
  ``service/internal/metadata/generated_feature_gates.go`` of service v0.157.0); without it
  the service rejects a ``profiles`` pipeline.

Build cost (``build-otelcol.sh`` on a 2-vCPU VM with empty Go module and build caches):
~105 s wall clock; the cache holds ~40 MB (builder 12 MB + collector 28 MB); Go's own
module cache grows by ~415 MB and its build cache by ~590 MB. A cached run takes ~10 ms.

Observed behaviour of the v0.157.0 binary (pinned by ``tests/e2e/test_otelcol_peer.py``):

* gRPC ``ProfilesService/Export`` and HTTP ``POST /v1development/profiles`` are accepted;
  the gRPC response has an empty ``partial_success``.
* The debug exporter at ``verbosity: detailed`` logs one multi-line entry per export: first
  the dictionary (``Mapping #i``, ``Location #i`` with ``Line #j``/``Function index``,
  ``Function #i`` with ``Name: <strindex>``, ``Attribute table:`` (buggy: only the last
  entry is shown), ``Link table:``, ``String table:`` with one 4-space-indented string per
  line), then ``ResourceProfiles``/``ScopeProfiles``/``Profile #k`` with ``Sample #j`` /
  ``Values: [30]`` / ``Attributes:`` / ``-> key: value``. It does NOT print a sample's
  stack_index, the stack table, sample_type or period, so the debug log alone cannot tie a
  value to a function; ``parse_debug_profiles()`` extracts what it does show. For
  per-sample stacks use the file exporter's OTLP/JSON (``read_exported("profiles")`` +
  ``resolve_profile_samples()``).
* The file exporter's JSON moves resource/scope attributes into the dictionary: e.g.
  ``{"keyStrindex": 10, "value": {"stringValueStrindex": 11}}`` with the strings appended to
  ``stringTable``; int64 fields (``values``, ``timeUnixNano``...) are JSON strings; zero
  fields are omitted; ``profileId`` is hex.
* The internal logger samples repeated messages by default (10 then every 100th per 10 s),
  which would drop debug output; the generated config disables that.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.peers.process import LOOPBACK, CollectorPeer

OTELCOL_VERSION = "0.157.0"
DIST_NAME = "otelcol-otel-ebpf-test"
PROFILES_FEATURE_GATE = "service.profilesSupport"
BUILD_SCRIPT = Path(__file__).with_name("build-otelcol.sh")
SIGNALS = ("traces", "metrics", "logs", "profiles")
#: A cold build takes ~2 min on 2 vCPUs; allow for slow CI machines and module downloads.
BUILD_TIMEOUT = 25 * 60.0

@functools.cache
def ensure_built(script: Path = BUILD_SCRIPT) -> Path:
    """Path of the collector binary, building it (cached outside the repo) if needed.

    Runs ``script`` (``build-otelcol.sh``, or the gateway's ``deploy/collector/build.sh``),
    which returns in milliseconds once the binary is cached and otherwise needs Go and the
    Go module proxy for about two minutes.
    """
    try:
        result = subprocess.run(
            ["bash", str(script)], capture_output=True, text=True,
            timeout=BUILD_TIMEOUT, stdin=subprocess.DEVNULL, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{script.name} timed out after {BUILD_TIMEOUT:.0f}s") from exc
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise RuntimeError(
            f"{script.name} failed (exit {result.returncode}); it needs Go and the Go "
            f"module proxy on a cold cache. Output:\n{result.stdout}\n{result.stderr}"
        )
    binary = Path(lines[-1])
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise RuntimeError(f"{script.name} printed {binary}, which is not executable")
    return binary


class OtelCollector(CollectorPeer):
    """An OpenTelemetry Collector subprocess receiving OTLP on loopback.

    Every signal (traces, metrics, logs, profiles) goes to the debug exporter (its output
    lands in ``log_path``, see ``read_log()``/``wait_for_log()``) and to a file exporter
    writing OTLP/JSON lines (see ``read_exported()``/``wait_for_export()``). Use as a
    context manager or call ``start()``/``stop()``; the log and exported documents stay
    readable after ``stop()``.
    """

    name = "otelcol"
    stop_timeout = 10.0

    def __init__(
        self,
        *,
        verbosity: str = "detailed",
        log_path: Path | None = None,
        extra_args: list[str] | None = None,
        startup_timeout: float = 20.0,
        binary: Path | None = None,
    ) -> None:
        super().__init__(log_path, startup_timeout)
        self.verbosity = verbosity
        self.extra_args = list(extra_args or [])
        self._binary = binary
        self._final_exports: dict[str, str] = {}

    @property
    def binary(self) -> Path:
        """The collector executable (built on first access unless given)."""
        if self._binary is None:
            self._binary = ensure_built()
        return self._binary

    @property
    def config_path(self) -> Path:
        return self.workdir / "config.yaml"

    def export_path(self, signal_name: str) -> Path:
        """The file exporter's OTLP/JSON-lines output for ``signal_name``."""
        if signal_name not in SIGNALS:
            raise ValueError(f"unknown signal {signal_name!r}; expected one of {SIGNALS}")
        return self.workdir / f"{signal_name}.jsonl"

    def config(self) -> dict[str, Any]:
        """The collector configuration for the current ports."""
        exporters: dict[str, Any] = {
            "debug": {
                "verbosity": self.verbosity,
                "sampling_initial": 1_000_000,
                "sampling_thereafter": 1,
            },
        }
        pipelines: dict[str, Any] = {}
        for sig in SIGNALS:
            exporters[f"file/{sig}"] = {
                "path": str(self.export_path(sig)),
                "format": "json",
                "flush_interval": "50ms",
            }
            pipelines[sig] = {"receivers": ["otlp"], "exporters": ["debug", f"file/{sig}"]}
        return {
            "receivers": {
                "otlp": {
                    "protocols": {
                        "grpc": {"endpoint": self.grpc_target},
                        "http": {"endpoint": f"{LOOPBACK}:{self.http_port}"},
                    }
                }
            },
            "exporters": exporters,
            "service": {
                "telemetry": {
                    "logs": {"level": "info", "encoding": "console",
                             "sampling": {"enabled": False}},
                    # No internal metrics server (it would bind :8888 and clash in parallel).
                    "metrics": {"level": "none"},
                },
                "pipelines": pipelines,
            },
        }  # fmt: skip

    def command(self) -> list[str]:
        """The exact argv used to start the collector."""
        return [
            str(self.binary),
            f"--config={self.config_path}",
            f"--feature-gates={PROFILES_FEATURE_GATE}",
            *self.extra_args,
        ]

    def wait_for_log(self, predicate: str | Callable[[str], bool], timeout: float = 10.0) -> str:
        """Poll the log until it contains ``predicate`` (or ``predicate(log)`` is true)."""
        check = (lambda text: predicate in text) if isinstance(predicate, str) else predicate
        deadline = time.monotonic() + timeout
        while True:
            text = self.read_log()
            if check(text):
                return text
            if time.monotonic() >= deadline:
                raise AssertionError(f"collector log never matched {predicate!r}:\n{text}")
            time.sleep(0.05)

    def read_exported(self, signal_name: str) -> list[dict[str, Any]]:
        """OTLP/JSON documents written by the file exporter for ``signal_name`` so far."""
        if signal_name in self._final_exports:
            text = self._final_exports[signal_name]
        else:
            try:
                text = self.export_path(signal_name).read_text()
            except FileNotFoundError:
                return []
        docs = []
        for line in text.splitlines():
            try:
                docs.append(json.loads(line))
            except json.JSONDecodeError:  # a line still being flushed
                break
        return docs

    def wait_for_export(
        self, signal_name: str, count: int = 1, timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        """Poll until the file exporter wrote at least ``count`` documents; return them."""
        deadline = time.monotonic() + timeout
        while True:
            docs = self.read_exported(signal_name)
            if len(docs) >= count:
                return docs
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{len(docs)} {signal_name} export(s) after {timeout}s, wanted {count};"
                    f" collector log:\n{self.read_log()}"
                )
            time.sleep(0.05)

    def start(self, attempts: int = 3) -> OtelCollector:
        """Start the collector and wait until both OTLP receivers accept connections."""
        _ = self.binary  # build (or fail) before creating anything
        self._final_exports = {}

        def command() -> list[str]:
            self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
            return self.command()

        self._launch(command, attempts)
        return self

    def _keep(self) -> None:
        for sig in SIGNALS:
            path = self.export_path(sig)
            if path.exists():
                self._final_exports[sig] = path.read_text()

    def __enter__(self) -> OtelCollector:
        return self.start()


# --- reading what the collector decoded ------------------------------------------------


@dataclass
class DebugSample:
    values: list[int]
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass
class DebugProfiles:
    """What the debug exporter (verbosity detailed) printed for one profiles export."""

    string_table: list[str] = field(default_factory=list)
    #: Function table entries' ``Name`` string indices.
    function_name_indices: list[int] = field(default_factory=list)
    #: Samples of every profile in the export, in order (one list per ``Profile #k``).
    profiles: list[list[DebugSample]] = field(default_factory=list)

    @property
    def function_names(self) -> list[str]:
        """Function table names resolved through the string table (index-aligned)."""
        table = self.string_table
        return [table[i] if 0 <= i < len(table) else f"<bad strindex {i}>"
                for i in self.function_name_indices]  # fmt: skip

    @property
    def samples(self) -> list[DebugSample]:
        return [s for p in self.profiles for s in p]


_DEBUG_HEADER = re.compile(r"^\S+\tinfo\tProfiles\t\{.*\}$")
_ENTRY_START = re.compile(r"^\d{4}-\d\d-\d\dT\S+\t(?:debug|info|warn|error)\t")


def parse_debug_profiles(log: str) -> list[DebugProfiles]:
    """Parse every detailed debug-exporter profiles dump in a collector log, in order."""
    lines = log.splitlines()
    dumps: list[DebugProfiles] = []
    i = 0
    while i < len(lines):
        if not _DEBUG_HEADER.match(lines[i]):
            i += 1
            continue
        i += 1
        if i >= len(lines):
            break
        body = [_ENTRY_START.sub("", lines[i])]
        i += 1
        # The multi-line message ends with the entry's fields on a line starting with a tab.
        while (
            i < len(lines) and not lines[i].startswith("\t{") and not _ENTRY_START.match(lines[i])
        ):
            body.append(lines[i])
            i += 1
        dumps.append(_parse_debug_body(body))
    return dumps


def _parse_debug_body(body: list[str]) -> DebugProfiles:
    dump = DebugProfiles()
    section = ""
    for line in body:
        if section == "strings":
            if line.startswith("    "):
                dump.string_table.append(line[4:])
                continue
            section = ""
        if line == "String table:":
            section = "strings"
        elif line.startswith("Function #"):
            section = "function"
        elif line.startswith(("Mapping #", "Location #", "Attribute table:", "Link table:")):
            section = "other"
        elif line.startswith("Profile #"):
            section = "profile"
            dump.profiles.append([])
        elif section == "function" and line.startswith("    Name: "):
            dump.function_name_indices.append(int(line.split(":", 1)[1]))
        elif section == "profile" and line.startswith("        Values: "):
            raw = line.split(":", 1)[1].strip().strip("[]")
            dump.profiles[-1].append(DebugSample([int(v) for v in raw.split()]))
        elif section == "profile" and line.startswith("             -> ") and dump.profiles[-1]:
            key, _, value = line.strip()[3:].partition(": ")
            dump.profiles[-1][-1].attributes[key] = value
    return dump


def resolve_profile_samples(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Flatten one file-exporter OTLP/JSON profiles document into resolved samples.

    Each result: ``{"sample_type": (type, unit), "stack": [function names, leaf first],
    "values": [int...], "attributes": {key: value}}``. Missing JSON fields are proto3
    zero values (index 0 = the dictionaries' empty entry).
    """
    d = doc.get("dictionary", {})
    strings: list[str] = d.get("stringTable", [])
    functions = d.get("functionTable", [])
    locations = d.get("locationTable", [])
    stacks = d.get("stackTable", [])
    attrs = d.get("attributeTable", [])

    def s(idx: int) -> str:
        return strings[idx] if 0 <= idx < len(strings) else f"<bad strindex {idx}>"

    def value(v: dict[str, Any]) -> Any:
        if "stringValueStrindex" in v:
            return s(v["stringValueStrindex"])
        for key in ("stringValue", "boolValue", "doubleValue"):
            if key in v:
                return v[key]
        if "intValue" in v:
            return int(v["intValue"])
        return v or None

    def frame_names(loc_idx: int) -> list[str]:
        lines = locations[loc_idx].get("lines", []) if loc_idx < len(locations) else []
        return [s(functions[ln.get("functionIndex", 0)].get("nameStrindex", 0)) for ln in lines]

    out = []
    for rp in doc.get("resourceProfiles", []):
        for sp in rp.get("scopeProfiles", []):
            for prof in sp.get("profiles", []):
                st = prof.get("sampleType", {})
                sample_type = (s(st.get("typeStrindex", 0)), s(st.get("unitStrindex", 0)))
                for sample in prof.get("samples", []):
                    stack = stacks[sample.get("stackIndex", 0)].get("locationIndices", [])
                    names = [n for loc in stack for n in frame_names(loc)]
                    attributes = {
                        s(attrs[a].get("keyStrindex", 0)): value(attrs[a].get("value", {}))
                        for a in sample.get("attributeIndices", [])
                    }
                    out.append({
                        "sample_type": sample_type,
                        "stack": names,
                        "values": [int(v) for v in sample.get("values", [])],
                        "attributes": attributes,
                    })  # fmt: skip
    return out
