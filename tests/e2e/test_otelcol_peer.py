"""Prove the OpenTelemetry Collector peer decodes our profiles schema (the schema pin).

A profiles request is built by hand with the installed Python proto classes
(opentelemetry-proto v1.10.0 layout: ProfilesDictionary with stack_table, Sample.stack_index,
Sample.values = field 4) and sent with the generated ``ProfilesServiceStub`` to the
collector built by ``tests/peers/build-otelcol.sh``. The collector's debug output and its
file exporter's OTLP/JSON must show exactly the functions, stacks and values we encoded; a
collector on another proto release would fail here (e.g. v1.9 decodes Sample field 2, our
attribute indices, as the values).

The first run builds the collector (~2 min with Go; cached outside the repository).
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import requests
from opentelemetry.proto.collector.profiles.v1development import (
    profiles_service_pb2,
    profiles_service_pb2_grpc,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.profiles.v1development import profiles_pb2 as pb
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from tests.peers.otelcol import (
    OtelCollector,
    parse_debug_profiles,
    resolve_profile_samples,
)

pytestmark = pytest.mark.e2e

WAIT = 10.0
PROFILE_ID = bytes(range(1, 17))
T0 = 1_700_000_000_000_000_000


def profiles_request() -> profiles_service_pb2.ExportProfilesServiceRequest:
    """Two CPU samples: main -> hot_a (value 30, thread.name=worker) and main -> hot_b (10).

    Every dictionary table starts with its zero-value entry at index 0, as the spec
    requires; 0 in any *_index / *_strindex field therefore means "unset".
    """
    strings = ["", "samples", "count", "cpu", "nanoseconds",
               "hot_a", "hot_b", "main", "/usr/bin/demo", "thread.name"]  # fmt: skip
    idx = {s: i for i, s in enumerate(strings)}
    dictionary = pb.ProfilesDictionary(
        string_table=strings,
        mapping_table=[
            pb.Mapping(),
            pb.Mapping(
                memory_start=0x400000, memory_limit=0x500000, filename_strindex=idx["/usr/bin/demo"]
            ),
        ],
        function_table=[
            pb.Function(),
            pb.Function(name_strindex=idx["hot_a"]),
            pb.Function(name_strindex=idx["hot_b"]),
            pb.Function(name_strindex=idx["main"]),
        ],
        location_table=[
            pb.Location(),
            pb.Location(mapping_index=1, address=0x401000, lines=[pb.Line(function_index=1)]),
            pb.Location(mapping_index=1, address=0x402000, lines=[pb.Line(function_index=2)]),
            pb.Location(mapping_index=1, address=0x403000, lines=[pb.Line(function_index=3)]),
        ],
        # Stacks are leaf first.
        stack_table=[
            pb.Stack(),
            pb.Stack(location_indices=[1, 3]),
            pb.Stack(location_indices=[2, 3]),
        ],
        link_table=[pb.Link()],
        attribute_table=[
            pb.KeyValueAndUnit(),
            pb.KeyValueAndUnit(
                key_strindex=idx["thread.name"], value=AnyValue(string_value="worker")
            ),
        ],
    )
    profile = pb.Profile(
        sample_type=pb.ValueType(type_strindex=idx["samples"], unit_strindex=idx["count"]),
        period_type=pb.ValueType(type_strindex=idx["cpu"], unit_strindex=idx["nanoseconds"]),
        period=10_000_000,
        time_unix_nano=T0,
        duration_nano=1_000_000_000,
        profile_id=PROFILE_ID,
        samples=[
            pb.Sample(stack_index=1, values=[30], attribute_indices=[1]),
            pb.Sample(stack_index=2, values=[10]),
        ],
    )
    resource = Resource(attributes=[
        KeyValue(key="service.name", value=AnyValue(string_value="otel-ebpf-test")),
    ])  # fmt: skip
    return profiles_service_pb2.ExportProfilesServiceRequest(
        dictionary=dictionary,
        resource_profiles=[pb.ResourceProfiles(
            resource=resource,
            scope_profiles=[pb.ScopeProfiles(
                scope=InstrumentationScope(name="otel_ebpf.tests", version="0.1.0"),
                profiles=[profile],
            )],
        )],
    )  # fmt: skip


def test_grpc_profiles_are_decoded_with_our_schema(otelcol: OtelCollector) -> None:
    with grpc.insecure_channel(otelcol.grpc_target) as channel:
        response = profiles_service_pb2_grpc.ProfilesServiceStub(channel).Export(
            profiles_request(), timeout=WAIT
        )
    assert response.partial_success.rejected_profiles == 0
    assert response.partial_success.error_message == ""

    # Debug exporter (verbosity detailed): names via the string table, values per sample.
    log = otelcol.wait_for_log(lambda text: len(parse_debug_profiles(text)) >= 1, WAIT)
    assert 'sample records": 2' in log
    (dump,) = parse_debug_profiles(log)
    assert dump.function_names == ["", "hot_a", "hot_b", "main"]
    assert "hot_a" in dump.string_table and "hot_b" in dump.string_table
    assert [s.values for s in dump.samples] == [[30], [10]]
    assert dump.samples[0].attributes == {"thread.name": "worker"}
    assert dump.samples[1].attributes == {}
    assert "Profile ID     : " + PROFILE_ID.hex() in log

    # File exporter (OTLP/JSON): the full structure, so stacks can be tied to values.
    (doc,) = otelcol.wait_for_export("profiles", 1, WAIT)
    samples = resolve_profile_samples(doc)
    assert samples == [
        {"sample_type": ("samples", "count"), "stack": ["hot_a", "main"], "values": [30],
         "attributes": {"thread.name": "worker"}},
        {"sample_type": ("samples", "count"), "stack": ["hot_b", "main"], "values": [10],
         "attributes": {}},
    ]  # fmt: skip
    (profile,) = doc["resourceProfiles"][0]["scopeProfiles"][0]["profiles"]
    strings = doc["dictionary"]["stringTable"]
    assert strings[profile["periodType"]["typeStrindex"]] == "cpu"
    assert profile["period"] == "10000000"
    assert profile["timeUnixNano"] == str(T0)
    assert profile["profileId"] == PROFILE_ID.hex()


def test_http_profiles_endpoint_accepts_protobuf(otelcol: OtelCollector) -> None:
    response = requests.post(
        f"{otelcol.http_endpoint}/v1development/profiles",
        data=profiles_request().SerializeToString(),
        headers={"Content-Type": "application/x-protobuf"},
        timeout=WAIT,
    )
    assert response.status_code == 200, response.text
    (doc,) = otelcol.wait_for_export("profiles", 1, WAIT)
    assert [(s["stack"], s["values"]) for s in resolve_profile_samples(doc)] == [
        (["hot_a", "main"], [30]),
        (["hot_b", "main"], [10]),
    ]


def test_binary_was_built_against_the_pinned_pdata(otelcol_binary: Path) -> None:
    """The schema pin itself: pdata v1.63.0 is generated from opentelemetry-proto v1.10.0."""
    go_mod = (otelcol_binary.parent / "go.mod.txt").read_text()
    assert "go.opentelemetry.io/collector/pdata v1.63.0" in go_mod
    assert "go.opentelemetry.io/collector/pdata/pprofile v0.157.0" in go_mod
