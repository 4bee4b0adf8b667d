"""The OTLP profile builder, decoded back with the official proto classes."""

from __future__ import annotations

import pytest
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)
from opentelemetry.proto.profiles.v1development import profiles_pb2 as pb

from otel_ebpf.export.profiles import (
    BUILD_ID_ATTRIBUTE,
    FRAME_TYPE_ATTRIBUTE,
    ProfileWindow,
    build_profiles_request,
    folded_lines,
    folded_stack,
)
from otel_ebpf.model import Identity, StackSample, Workload
from otel_ebpf.probes.cpu_profile import ON_CPU, CpuProfileConfig, samples_map_size
from otel_ebpf.symbolize.symbols import Frame, Mapping

APP = Mapping(0x400000, 0x401000, 0, "/usr/bin/app", "ab" * 20)
LIBC = Mapping(0x7F0000000000, 0x7F0000200000, 0x28000, "/lib/libc.so.6", None)
MAIN = Frame(0x400100, "main", "native", APP, 0)
HOT = Frame(0x400200, "hot", "native", APP, 4)
WRITE = Frame(0x7F0000001000, "write", "native", LIBC, 16)
UNKNOWN = Frame(0x7F0000009999, None, "native", LIBC, 0)
SYSCALL = Frame(0xFFFFFFFF81000000, "do_syscall_64", "kernel", None, 0)

A = Workload(10, "app", 0)
B = Workload(20, "other", 0)


def identity_of(w: Workload) -> Identity:
    return Identity({"service.name": w.comm, "host.name": "h"},
                    {"process.pid": w.pid, "process.executable.name": w.comm})


def build(samples: list[StackSample]) -> ExportProfilesServiceRequest:
    request = build_profiles_request(samples, identity_of, 52_631_578, 1_000, 5_000,
                                     profile_type=ON_CPU)
    # what a collector gets: bytes, decoded by the official classes
    return ExportProfilesServiceRequest.FromString(request.SerializeToString())


def strings(d: pb.ProfilesDictionary, indices: list[int]) -> list[str]:
    return [d.string_table[i] for i in indices]


def stack_names(d: pb.ProfilesDictionary, stack_index: int) -> list[str | None]:
    out: list[str | None] = []
    for li in d.stack_table[stack_index].location_indices:
        loc = d.location_table[li]
        out.append(d.string_table[d.function_table[loc.lines[0].function_index].name_strindex]
                   if loc.lines else None)
    return out


def test_tables_start_with_the_empty_entry_and_deduplicate() -> None:
    samples = [
        StackSample(A, 10, "app", (HOT, MAIN), 30),
        StackSample(A, 11, "worker", (HOT, MAIN), 5),  # same stack, other thread
        StackSample(B, 20, "other", (SYSCALL, WRITE, MAIN), 10),
    ]
    req = build(samples)
    d = req.dictionary
    assert d.string_table[0] == ""
    for table in (d.mapping_table, d.location_table, d.function_table, d.stack_table,
                  d.attribute_table):
        assert table[0] == type(table[0])()  # index 0 is the zero value
    # main appears in three samples but is one function, one location
    names = [d.string_table[f.name_strindex] for f in d.function_table[1:]]
    assert sorted(names) == ["do_syscall_64", "hot", "main", "write"]
    assert len(d.location_table) == 1 + 4
    assert len(d.stack_table) == 1 + 2  # (hot, main) shared by both threads of A
    assert len(set(d.string_table)) == len(d.string_table)


def test_profiles_per_resource_with_types_period_and_samples() -> None:
    req = build([StackSample(A, 10, "app", (HOT, MAIN), 30),
                 StackSample(B, 20, "other", (SYSCALL, WRITE, MAIN), 10)])
    d = req.dictionary
    assert len(req.resource_profiles) == 2  # one Profile per workload resource
    by_service = {}
    for rp in req.resource_profiles:
        service = {kv.key: kv.value.string_value for kv in rp.resource.attributes}["service.name"]
        (profile,) = rp.scope_profiles[0].profiles
        by_service[service] = profile
        assert strings(d, [profile.sample_type.type_strindex,
                           profile.sample_type.unit_strindex]) == ["samples", "count"]
        assert strings(d, [profile.period_type.type_strindex,
                           profile.period_type.unit_strindex]) == ["cpu", "nanoseconds"]
        assert profile.period == 52_631_578
        assert (profile.time_unix_nano, profile.duration_nano) == (1_000, 4_000)
        assert len(profile.profile_id) == 16
    (sample,) = by_service["app"].samples
    assert list(sample.values) == [30]
    assert stack_names(d, sample.stack_index) == ["hot", "main"]  # leaf first
    attrs = {d.string_table[d.attribute_table[i].key_strindex]: d.attribute_table[i].value
             for i in sample.attribute_indices}
    assert attrs["thread.id"].int_value == 10
    assert attrs["thread.name"].string_value == "app"
    assert attrs["process.pid"].int_value == 10


def test_frames_carry_type_mapping_and_build_id_and_unresolved_keep_address() -> None:
    req = build([StackSample(B, 20, "other", (SYSCALL, UNKNOWN, MAIN), 1)])
    d = req.dictionary
    (sample,) = req.resource_profiles[0].scope_profiles[0].profiles[0].samples
    locations = [d.location_table[i] for i in d.stack_table[sample.stack_index]
                 .location_indices]
    kinds = [d.attribute_table[loc.attribute_indices[0]] for loc in locations]
    assert {d.string_table[k.key_strindex] for k in kinds} == {FRAME_TYPE_ATTRIBUTE}
    assert [k.value.string_value for k in kinds] == ["kernel", "native", "native"]
    kernel, unknown, main = locations
    assert kernel.mapping_index == 0 and kernel.lines
    # never a made-up name: address and mapping only
    assert not unknown.lines and unknown.address == UNKNOWN.address
    libc = d.mapping_table[unknown.mapping_index]
    assert d.string_table[libc.filename_strindex] == "/lib/libc.so.6"
    assert (libc.memory_start, libc.memory_limit, libc.file_offset) == (
        LIBC.start, LIBC.end, LIBC.file_offset)
    app = d.mapping_table[main.mapping_index]
    (build_id,) = [d.attribute_table[i] for i in app.attribute_indices]
    assert d.string_table[build_id.key_strindex] == BUILD_ID_ATTRIBUTE
    assert build_id.value.string_value == "ab" * 20


def test_window_merges_and_folded_output_is_root_first() -> None:
    window = ProfileWindow(0, keep_folded=True)
    window.add([StackSample(A, 10, "app", (HOT, MAIN), 3)], 1)
    window.add([StackSample(A, 10, "app", (HOT, MAIN), 2),
                StackSample(B, 20, "other", (SYSCALL, UNKNOWN), 1)], 1)
    samples, start, end = window.take(9)
    assert (start, end) == (0, 9)
    assert sorted(s.count for s in samples) == [1, 5]
    window.fold(samples, lambda w: w.comm)
    assert folded_lines(window.folded) == [
        "app;main;hot 5",
        f"other;libc.so.6+{UNKNOWN.address:#x};do_syscall_64_[k] 1",
    ]
    assert folded_stack(StackSample(A, 1, "t", (HOT,), 1), "a;b") == ("a_b", "hot")


@pytest.mark.parametrize(("hz", "cpus", "interval", "expected"), [
    (19, 2, 1.0, 256),          # small machines get the floor
    (99, 2, 1.0, 512),          # 396 keys at most -> the next power of two
    (99, 64, 1.0, 16384),       # 12,672
    (1, 1, 0.1, 256),           # below one key a drain
    (10_000, 1024, 60.0, 1 << 20),  # the ceiling
])
def test_sample_map_is_sized_from_rate_cpus_and_interval(hz: int, cpus: int, interval: float,
                                                         expected: int) -> None:
    config = CpuProfileConfig(frequency=hz, interval=interval)
    assert samples_map_size(config, cpus) == expected
    assert samples_map_size(CpuProfileConfig(max_samples=1000), cpus) == 1000
