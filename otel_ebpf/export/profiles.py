"""Stack samples -> OTLP profiles (opentelemetry.proto.profiles.v1development, as pinned by
opentelemetry-proto; the collector peer in tests/peers/otelcol.py decodes the same schema).

The request carries one dictionary shared by all its profiles. Every table keeps index 0
as the empty entry, and every entry is interned once, so a frame seen in a thousand
samples costs one Location, one Function and one string.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
    InstrumentationScope,
    KeyValue,
)
from opentelemetry.proto.profiles.v1development import profiles_pb2 as pb
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from otel_ebpf import __version__
from otel_ebpf.export.delivery import Delivery
from otel_ebpf.export.queue import Entry
from otel_ebpf.model import AttributeValue, Identity, ProfileType, StackSample, Workload
from otel_ebpf.symbolize.frames import Frame
from otel_ebpf.symbolize.frames import Mapping as MappingInfo

log = logging.getLogger(__name__)

BUILD_ID_ATTRIBUTE = "process.executable.build_id.gnu"
FRAME_TYPE_ATTRIBUTE = "profile.frame.type"
_rng = random.SystemRandom()
T = TypeVar("T")


def any_value(value: AttributeValue) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    return AnyValue(string_value=str(value))


def key_values(attrs: Mapping[str, AttributeValue]) -> list[KeyValue]:
    return [KeyValue(key=k, value=any_value(v)) for k, v in attrs.items()]


class _Table:
    """An interning table whose entry 0 is the empty value."""

    def __init__(self, empty: Any, key_of_empty: Hashable) -> None:
        self.entries: list[Any] = [empty]
        self._index: dict[Hashable, int] = {key_of_empty: 0}

    def intern(self, key: Hashable, make: Callable[[], Any]) -> int:
        index = self._index.get(key)
        if index is None:
            index = self._index[key] = len(self.entries)
            self.entries.append(make())
        return index


class ProfilesDictionaryBuilder:
    def __init__(self) -> None:
        self.strings = _Table("", "")
        self.functions = _Table(pb.Function(), ("function", 0))
        self.mappings = _Table(pb.Mapping(), ("mapping", None))
        self.locations = _Table(pb.Location(), ("location", None))
        self.stacks = _Table(pb.Stack(), ())
        self.attributes = _Table(pb.KeyValueAndUnit(), ("attribute", None))
        # a frame recurs in many stacks, a stack in many threads: each is resolved once
        self._location_of: dict[Frame, int] = {}
        self._stack_of: dict[tuple[Frame, ...], int] = {}

    def string(self, text: str) -> int:
        return self.strings.intern(text, lambda: text)

    def attribute(self, key: str, value: AttributeValue) -> int:
        return self.attributes.intern(("attribute", key, type(value).__name__, value),
                                      lambda: pb.KeyValueAndUnit(
                                          key_strindex=self.string(key),
                                          value=any_value(value)))

    def function(self, name: str, filename: str | None = None, start_line: int = 0) -> int:
        name_index = self.string(name)
        file_index = self.string(filename) if filename else 0
        return self.functions.intern(("function", name_index, file_index, start_line),
                                     lambda: pb.Function(name_strindex=name_index,
                                                         system_name_strindex=name_index,
                                                         filename_strindex=file_index,
                                                         start_line=start_line))

    def mapping(self, m: MappingInfo | None) -> int:
        if m is None:
            return 0
        attrs = [self.attribute(BUILD_ID_ATTRIBUTE, m.build_id)] if m.build_id else []
        return self.mappings.intern(
            ("mapping", m.start, m.end, m.file_offset, m.path, m.build_id),
            lambda: pb.Mapping(memory_start=m.start, memory_limit=m.end,
                               file_offset=m.file_offset, filename_strindex=self.string(m.path),
                               attribute_indices=attrs))

    def location(self, frame: Frame) -> int:
        index = self._location_of.get(frame)
        if index is None:
            index = self._location_of[frame] = self._intern_location(frame)
        return index

    def _intern_location(self, frame: Frame) -> int:
        mapping_index = self.mapping(frame.mapping)
        key = ("location", mapping_index, frame.address, frame.function, frame.kind,
               frame.file, frame.line)

        def make() -> pb.Location:
            # unresolved: address and mapping only; interpreted code: file and line too
            lines = ([pb.Line(function_index=self.function(frame.function, frame.file,
                                                           frame.start_line),
                              line=frame.line)]
                     if frame.function else [])
            return pb.Location(mapping_index=mapping_index, address=frame.address,
                               lines=lines,
                               attribute_indices=[self.attribute(FRAME_TYPE_ATTRIBUTE,
                                                                 frame.kind)])
        return self.locations.intern(key, make)

    def stack(self, frames: tuple[Frame, ...]) -> int:
        index = self._stack_of.get(frames)
        if index is None:
            indices = tuple(self.location(f) for f in frames)
            index = self._stack_of[frames] = self.stacks.intern(
                indices, lambda: pb.Stack(location_indices=list(indices)))
        return index

    def build(self) -> pb.ProfilesDictionary:
        return pb.ProfilesDictionary(
            mapping_table=self.mappings.entries, location_table=self.locations.entries,
            function_table=self.functions.entries, string_table=self.strings.entries,
            attribute_table=self.attributes.entries, stack_table=self.stacks.entries)


def build_profiles_request(
    samples: Iterable[StackSample],
    identity_of: Callable[[Workload], Identity],
    period_ns: int,
    start_ns: int,
    end_ns: int,
    *,
    profile_type: ProfileType,
) -> ExportProfilesServiceRequest:
    """One Profile per workload resource over [start_ns, end_ns), its sample and period
    types what the probe declared its samples count."""
    d = ProfilesDictionaryBuilder()
    sample_type = pb.ValueType(type_strindex=d.string(profile_type.sample_type),
                               unit_strindex=d.string(profile_type.sample_unit))
    period_type = pb.ValueType(type_strindex=d.string(profile_type.period_type),
                               unit_strindex=d.string(profile_type.period_unit))
    by_resource: dict[frozenset[tuple[str, AttributeValue]], list[pb.Sample]] = {}
    # per (workload, thread): its resource's rows and its attribute indices
    threads: dict[tuple[Workload, int, str], tuple[list[pb.Sample], list[int]]] = {}
    for s in samples:
        thread = threads.get((s.workload, s.thread_id, s.thread_name))
        if thread is None:
            identity = identity_of(s.workload)
            rows = by_resource.setdefault(frozenset(identity.resource.items()), [])
            attrs = {**identity.point, "thread.id": s.thread_id, "thread.name": s.thread_name}
            thread = threads[(s.workload, s.thread_id, s.thread_name)] = (
                rows, [d.attribute(k, v) for k, v in attrs.items()])
        rows, attribute_indices = thread
        rows.append(pb.Sample(stack_index=d.stack(s.frames),
                              attribute_indices=attribute_indices, values=[s.count]))
    scope = InstrumentationScope(name="otel-ebpf", version=__version__)
    resource_profiles = [
        pb.ResourceProfiles(
            resource=Resource(attributes=key_values(dict(resource))),
            scope_profiles=[pb.ScopeProfiles(scope=scope, profiles=[pb.Profile(
                sample_type=sample_type, samples=rows, time_unix_nano=start_ns,
                duration_nano=max(0, end_ns - start_ns), period_type=period_type,
                period=period_ns, profile_id=_rng.getrandbits(128).to_bytes(16, "big"),
            )])],
        )
        for resource, rows in by_resource.items()
    ]
    return ExportProfilesServiceRequest(resource_profiles=resource_profiles,
                                        dictionary=d.build())


class ProfileWindow:
    """Samples since the last export, merged; and, for --profiles-folded, the cumulative
    collapsed stacks since start."""

    def __init__(self, start_ns: int, keep_folded: bool) -> None:
        self.start_ns = start_ns
        self.period_ns = 0
        self.keep_folded = keep_folded
        self.folded: dict[tuple[str, ...], int] = {}
        self._samples: dict[tuple[Workload, int, str, tuple[Frame, ...]], int] = {}

    def __len__(self) -> int:
        return len(self._samples)

    def add(self, samples: Iterable[StackSample], period_ns: int) -> None:
        self.period_ns = period_ns or self.period_ns
        for s in samples:
            key = (s.workload, s.thread_id, s.thread_name, s.frames)
            self._samples[key] = self._samples.get(key, 0) + s.count

    def workloads(self) -> list[Workload]:
        return list({key[0] for key in self._samples})

    def take(self, end_ns: int) -> tuple[list[StackSample], int, int]:
        """The window's samples, its start and end; a new window starts at end_ns."""
        samples = [StackSample(w, tid, name, frames, count)
                   for (w, tid, name, frames), count in self._samples.items()]
        start, self.start_ns, self._samples = self.start_ns, end_ns, {}
        return samples, start, end_ns

    def fold(self, samples: Iterable[StackSample],
             process_name: Callable[[Workload], str], root: str | None = None) -> None:
        for s in samples:
            stack = folded_stack(s, process_name(s.workload))
            if root is not None:
                stack = (root, *stack)
            self.folded[stack] = self.folded.get(stack, 0) + s.count


def folded_lines(totals: Mapping[tuple[str, ...], int]) -> list[str]:
    """Collapsed stacks, root first: `app;main;hot_a 42`, flamegraph.pl's input."""
    return [f"{';'.join(stack)} {count}" for stack, count in sorted(totals.items())]


def folded_stack(sample: StackSample, process: str) -> tuple[str, ...]:
    names = []
    for frame in reversed(sample.frames):  # root first
        if frame.function:
            names.append(frame.function + ("_[k]" if frame.kind == "kernel" else ""))
        elif frame.mapping is not None:
            names.append(f"{frame.mapping.path.rsplit('/', 1)[-1]}+{frame.address:#x}")
        else:
            names.append(f"{frame.address:#x}")
    return (process.replace(";", "_"), *(n.replace(";", "_") for n in names))


class ProfileExport:
    """Collects samples into windows, one per profile type; each flush queues one request
    per type (serialized, one Profile per workload resource) for the profiles Delivery and
    rewrites the folded file. Blocking (`flush`): the daemon runs it in an executor.
    Samples may be added from another thread than the one flushing."""

    def __init__(self, delivery: Delivery[bytes] | None, folded_path: Path | None,
                 start_ns: int,
                 on_window: Callable[[ProfileType, list[StackSample]], None] | None = None
                 ) -> None:
        self.delivery = delivery
        self.folded_path = folded_path
        self.start_ns = start_ns
        self.on_window = on_window  # each window's merged samples (the live page's)
        self.windows: dict[ProfileType, ProfileWindow] = {}
        self._lock = threading.Lock()

    def add(self, samples: list[StackSample], period_ns: int,
            profile_type: ProfileType) -> None:
        with self._lock:
            window = self.windows.get(profile_type)
            if window is None:
                window = self.windows[profile_type] = ProfileWindow(
                    self.start_ns, keep_folded=self.folded_path is not None)
            window.add(samples, period_ns)

    def workloads(self) -> list[Workload]:
        with self._lock:
            return list({w for window in self.windows.values() for w in window.workloads()})

    def flush(self, identity_of: Callable[[Workload], Identity], end_ns: int) -> None:
        with self._lock:
            taken = [(kind, window.period_ns, *window.take(end_ns))
                     for kind, window in self.windows.items()]
        for profile_type, period_ns, samples, start, end in taken:
            if samples:
                if self.on_window is not None:
                    self.on_window(profile_type, samples)
                self._flush(identity_of, profile_type, period_ns, samples, start, end)

    def _flush(self, identity_of: Callable[[Workload], Identity], profile_type: ProfileType,
               period_ns: int, samples: list[StackSample], start: int, end: int) -> None:
        if self.folded_path is not None:
            # on-CPU samples as they are; another type's stacks under a root of its name
            # (off_cpu;app;main;wait 2000000000): its values (nanoseconds) are not counts
            self.windows[profile_type].fold(samples, lambda w: str(
                identity_of(w).point.get("process.executable.name") or w.comm or w.pid),
                None if profile_type.sample_type == "samples" else profile_type.sample_type)
            folded: dict[tuple[str, ...], int] = {}  # cumulative, every type's
            for window in self.windows.values():
                for stack, count in window.folded.items():
                    folded[stack] = folded.get(stack, 0) + count
            write_atomically(self.folded_path, "\n".join(folded_lines(folded)))
        if self.delivery is not None:
            began = time.monotonic()
            request = build_profiles_request(samples, identity_of, period_ns, start, end,
                                             profile_type=profile_type).SerializeToString()
            log.debug("profiles: %s request of %d samples, %d bytes, built in %.1f ms",
                      profile_type.sample_type, len(samples), len(request),
                      (time.monotonic() - began) * 1000)
            self.delivery.offer([Entry.shared(request, len(request),
                                              profiles_by_workload(samples, identity_of))])


def profiles_by_workload(samples: Iterable[StackSample],
                         identity_of: Callable[[Workload], Identity]) -> dict[Workload, int]:
    """The request's profiles (one per resource), each counted for the first workload
    seen in it: whom a drop of the request is counted against."""
    first: dict[frozenset[tuple[str, AttributeValue]], Workload] = {}
    for s in samples:
        first.setdefault(frozenset(identity_of(s.workload).resource.items()), s.workload)
    counts: dict[Workload, int] = {}
    for workload in first.values():
        counts[workload] = counts.get(workload, 0) + 1
    return counts


def write_atomically(path: Path, text: str) -> None:
    """Readers (a human, flamegraph.pl) never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)
