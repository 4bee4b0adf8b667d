"""The run-queue latency decoder without the kernel: a drained key and value (laid out as
the .bpf.c declares them) become the workload's histogram of waits."""

from __future__ import annotations

import ctypes as ct
import re

import pytest

from otel_ebpf.histogram import HIST_BUCKETS, HIST_MIN_INDEX, duration_bucket_index
from otel_ebpf.kernel.engine import EngineError, bpf_source
from otel_ebpf.model import Workload
from otel_ebpf.probes import runqueue_latency as rq


class Key(ct.Structure):
    _fields_ = [("cgroup_id", ct.c_uint64), ("exe", ct.c_uint64), ("tgid", ct.c_uint32),
                ("type", ct.c_uint32)]


class Value(ct.Structure):
    _fields_ = [("count", ct.c_uint64), ("sum_ns", ct.c_uint64), ("min_ns", ct.c_uint64),
                ("max_ns", ct.c_uint64), ("cgroup_id", ct.c_uint64), ("tgid", ct.c_uint32),
                ("_pad", ct.c_uint32), ("comm", ct.c_char * 16), ("exe", ct.c_char * 32),
                ("buckets", ct.c_uint32 * HIST_BUCKETS)]


def waits(*durations_ns: int) -> Value:
    value = Value(count=len(durations_ns), sum_ns=sum(durations_ns), min_ns=min(durations_ns),
                  max_ns=max(durations_ns), cgroup_id=77, tgid=4321, comm=b"worker",
                  exe=b"server")
    for ns in durations_ns:
        value.buckets[duration_bucket_index(ns) - HIST_MIN_INDEX] += 1
    return value


def test_the_c_layout_and_wait_types_are_the_decoders() -> None:
    source = bpf_source("runqueue_latency")
    for struct_name, mirror in (("wait_key", Key), ("wait_value", Value)):
        body = re.search(rf"struct {struct_name} {{(.*?)}};", source, re.S)
        assert body, struct_name
        fields = re.findall(r"^\s*\w+ (\w+)(?:\[[A-Z_0-9]+\])?;", body.group(1), re.M)
        assert fields == [f[0] for f in mirror._fields_], struct_name
    defines = dict(re.findall(r"#define WAIT_(\w+) (\d+)", source))
    assert [name.lower() for name, _ in sorted(defines.items(), key=lambda d: int(d[1]))] == (
        list(rq.WAIT_TYPES))


@pytest.mark.parametrize(("aggregation", "workload", "extra"), [
    ("workload", Workload(0, "server", 77), {"process.executable.name": "server"}),
    ("process", Workload(4321, "worker", 77), {}),
    ("system", Workload(0, "worker", 0), {}),
])
def test_a_key_becomes_its_workloads_histogram(aggregation: str, workload: Workload,
                                               extra: dict[str, str]) -> None:
    probe = rq.RunqueueLatency(rq.RunqueueLatencyConfig(aggregation=aggregation))
    record = probe.decode(Key(cgroup_id=77, tgid=4321 if aggregation == "process" else 0,
                              type=1), waits(3_000, 100_000_000, 100_000_000))
    assert record.descriptor is rq.RUNQUEUE_DURATION and record.workload == workload
    assert record.attributes == {**extra, "process.context_switch.type": "involuntary"}
    assert (record.count, record.sum, record.min, record.max) == (3, 0.200003, 3e-6, 0.1)
    assert sum(record.bucket_counts) == 3 and record.scale == 2
    # 100 ms sits in bucket floor(4 log2 0.1) = -14: (2^(-14/4), 2^(-13/4)] s
    assert record.offset + len(record.bucket_counts) - 1 == -14
    assert record.bucket_counts[-1] == 2


def test_it_is_opt_in_and_says_which_kernel_it_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not rq.RunqueueLatencyConfig().enabled
    assert rq.kernel_release("6.18.3-cloud-amd64") == (6, 18)
    monkeypatch.setattr(rq.platform, "release", lambda: "5.15.0-91-generic")
    with pytest.raises(EngineError, match=r"needs Linux 5\.18 or later.*5\.15\.0-91"):
        rq.RunqueueLatency(rq.RunqueueLatencyConfig()).cflags()
