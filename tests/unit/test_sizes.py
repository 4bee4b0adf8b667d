"""The size bound that spares encoding an export to know it fits: never under the size
the official encoder produces, and close to it for what this agent exports."""

from __future__ import annotations

import random
from typing import Any

import pytest
from opentelemetry.sdk.metrics._internal.exemplar import Exemplar
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Buckets,
    ExponentialHistogram,
    ExponentialHistogramDataPoint,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from otel_ebpf.export.sizes import size_bound
from otel_ebpf.export.split import request_size

CUMULATIVE = AggregationTemporality.CUMULATIVE


def value(rng: random.Random) -> Any:
    return rng.choice([
        True, False, 0, 1, -1, 2**63 - 1, -(2**63), rng.randint(0, 10**6), 0.0, -2.5,
        rng.random(), "", "x", "é" * rng.randint(0, 40), "日本" * rng.randint(0, 100),
        "a" * rng.choice([0, 1, 127, 128, 16_383, 16_384, 20_000]), "\ud800"])


def attributes(rng: random.Random, n: int) -> dict[str, Any]:
    return {rng.choice(["k", "process.pid", "é", "", "x" * 200]) + str(i): value(rng)
            for i in range(n)}


def exemplars(rng: random.Random) -> list[Exemplar]:
    return [Exemplar(attributes(rng, rng.randint(0, 2)), rng.choice([0, 7, -3, 0.5]),
                     rng.randint(0, 2**64 - 1),
                     *rng.choice([(None, None), (rng.randint(0, 2**64 - 1),
                                                 rng.randint(0, 2**128 - 1))]))
            for _ in range(rng.randint(0, 4))]


def number(rng: random.Random) -> NumberDataPoint:
    return NumberDataPoint(attributes(rng, rng.randint(0, 6)), rng.randint(0, 2**64 - 1),
                           rng.randint(0, 2**64 - 1),
                           rng.choice([0, 1, -1, 2**63 - 1, 0.25, -1e300]),
                           exemplars(rng))


def exponential(rng: random.Random) -> ExponentialHistogramDataPoint:
    def buckets() -> Buckets:
        return Buckets(rng.randint(-2**31, 2**31 - 1),
                       [rng.choice([0, 1, 127, 128, 2**40, 2**64 - 1])
                        for _ in range(rng.choice([0, 1, 5, 160]))])

    return ExponentialHistogramDataPoint(
        attributes(rng, rng.randint(0, 6)), rng.randint(0, 2**64 - 1),
        rng.randint(0, 2**64 - 1), rng.randint(0, 2**64 - 1), rng.random(),
        rng.randint(-10, 20), rng.randint(0, 2**64 - 1), buckets(), buckets(),
        rng.choice([0, 1]), rng.random(), rng.random(), exemplars(rng))


def random_data(seed: int) -> MetricsData:
    rng = random.Random(seed)
    resources = []
    for r in range(rng.randint(1, 4)):
        scopes = []
        for _ in range(rng.randint(1, 3)):
            metrics = [
                Metric("sum" * rng.randint(1, 50), rng.choice(["", "d", "é" * 300]), "{x}",
                       Sum([number(rng) for _ in range(rng.randint(1, 5))], CUMULATIVE,
                           rng.choice([True, False]))),
                Metric("gauge", "", "", Gauge([number(rng) for _ in range(rng.randint(1, 5))])),
                Metric("exp", "d", "s", ExponentialHistogram(
                    [exponential(rng) for _ in range(rng.randint(1, 5))], CUMULATIVE))]
            scope = InstrumentationScope(rng.choice(["a", "é" * 100]),
                                         rng.choice([None, "", "1.2.3"]),
                                         rng.choice([None, "https://s"]),
                                         rng.choice([None, attributes(rng, 2)]))
            scopes.append(ScopeMetrics(scope, metrics, rng.choice(["", "https://x"])))
        resources.append(ResourceMetrics(Resource({**attributes(rng, 5), "r": r}), scopes,
                                         rng.choice(["", "https://y"])))
    return MetricsData(resources)


@pytest.mark.parametrize("seed", range(40))
def test_the_bound_is_never_under_the_encoded_size(seed: int) -> None:
    data = random_data(seed)
    bound = size_bound(data)
    assert bound is not None
    assert bound >= request_size(data)


def test_the_bound_is_close_for_the_agents_own_metrics() -> None:
    points = [ExponentialHistogramDataPoint(
        {"linux.syscall.name": f"call{i % 40}", "process.pid": 1000 + i // 40,
         "process.executable.name": f"worker-{i // 40}"}, 1_700_000_000_000_000_000,
        1_700_000_010_000_000_000, 1234, 0.5, 2, 0, Buckets(-80, [3] * 24),
        Buckets(0, []), 0, 1e-7, 3e-3) for i in range(400)]
    resource = Resource({"host.name": "node-1", "host.id": "ab" * 16, "os.type": "linux",
                         "service.name": "otel-ebpf"})
    data = MetricsData([ResourceMetrics(resource, [ScopeMetrics(
        InstrumentationScope("otel-ebpf", "0.1.0"),
        [Metric("linux.syscall.duration", "Duration of syscalls.", "s",
                ExponentialHistogram(points, CUMULATIVE))], "")], "")])
    bound = size_bound(data)
    assert bound is not None
    assert request_size(data) <= bound <= 1.3 * request_size(data)


def test_what_it_does_not_know_is_left_to_the_encoder() -> None:
    scope = InstrumentationScope("a")
    explicit = Metric("h", "", "s", Histogram([HistogramDataPoint(
        {}, 1, 2, 1, 1.0, [1, 0], [1.0], 1.0, 1.0)], CUMULATIVE))
    binary = Metric("c", "", "1", Sum([NumberDataPoint({"b": b"x"}, 1, 2, 1)], CUMULATIVE,
                                      True))
    for metric in (explicit, binary):
        data = MetricsData([ResourceMetrics(Resource({}), [ScopeMetrics(scope, [metric], "")],
                                            "")])
        assert size_bound(data) is None
