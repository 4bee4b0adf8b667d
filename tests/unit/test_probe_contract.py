"""The probe contract, held for every registered probe: what each declares matches its
BPF source and its config, and the counters' names come from the C enum alone."""

from __future__ import annotations

import re

import pytest

from otel_ebpf import config as cfg
from otel_ebpf import probes as registry
from otel_ebpf.config_base import ProbeConfig, ProfilesProbeConfig
from otel_ebpf.kernel.engine import bpf_source
from otel_ebpf.kernel.syscalls import SyscallTable
from otel_ebpf.probes.base import HOOK_KINDS, Hook, Signal
from otel_ebpf.probes.stats import StatsError, stat_names
from otel_ebpf.signals import needed

PROBES = list(registry.PROBE_TYPES.values())


@pytest.mark.parametrize("probe", PROBES, ids=lambda p: p.name)
def test_declared_hooks_are_functions_of_its_program(probe: type[registry.AnyProbe]) -> None:
    source = bpf_source(probe.name)
    assert probe.hooks, "a probe attaches somewhere"
    for hook in probe.hooks:
        assert hook.kind in HOOK_KINDS
        assert re.search(rf"^int {hook.function}\(", source, re.M), hook.function
    if probe.filters_cgroups:
        assert '#include "cgroup_filter.h"' in source


@pytest.mark.parametrize("probe", PROBES, ids=lambda p: p.name)
def test_counters_come_from_the_c_enum_and_losses_are_among_them(
    probe: type[registry.AnyProbe]
) -> None:
    names = probe.stat_names()
    assert names == stat_names(bpf_source(probe.name))
    assert set(probe.lost_stats) <= set(names)
    assert '#include "probe_stats.h"' in bpf_source(probe.name)


def test_counter_names_follow_the_values_not_the_order_of_the_text() -> None:
    source = """
    enum probe_stat {
        STAT_LATE = 2,  /* a comment, = 7, */
        STAT_HITS = 0,
        STAT_MAP_FULL,  // 1: one past the previous
        STAT_COUNT = 3
    };"""
    assert stat_names(source) == ("hits", "map_full", "late")


@pytest.mark.parametrize("body", [
    "STAT_A = 0, STAT_B = 2, STAT_COUNT = 3",  # a gap: index 1 has no name
    "STAT_A = 0, STAT_B = 0, STAT_COUNT = 2",  # a repeated value
    "STAT_A = 0, STAT_B = 1",  # no STAT_COUNT
    "STAT_A = 0, OTHER = 1, STAT_COUNT = 2",  # not a counter
])
def test_an_enum_that_would_mislabel_a_counter_is_refused(body: str) -> None:
    with pytest.raises(StatsError):
        stat_names(f"enum probe_stat {{ {body} }};")
    with pytest.raises(StatsError):
        stat_names("enum other { STAT_A = 0, STAT_COUNT = 1 };")


@pytest.mark.parametrize("probe", PROBES, ids=lambda p: p.name)
def test_each_probe_has_its_config_section(probe: type[registry.AnyProbe]) -> None:
    config = cfg.Config()
    section = config.probes.section(probe.name)
    assert type(section) is probe.config_class
    assert issubclass(probe.config_class, ProbeConfig)
    assert section.interval > 0
    for key in probe.wired_at_start:
        node: object = section
        for part in key.split("."):
            node = getattr(node, part)  # the key exists
    if Signal.PROFILES in probe.signals:
        assert issubclass(probe.config_class, ProfilesProbeConfig)
        assert probe.profile_type is not None
    assert probe.produces(section.model_copy(update={"enabled": False})) == frozenset()


def test_the_probes_section_is_made_of_the_registry() -> None:
    assert list(cfg.ProbesConfig.model_fields) == list(registry.PROBE_TYPES)
    with pytest.raises(cfg.ConfigError, match="did you mean 'syscall_latency'"):
        cfg.load(overrides={("probes", "syscall_latncy"): {}}, env={})


def test_every_enabled_probe_is_built_the_same_way() -> None:
    config = cfg.Config()
    table = SyscallTable({0: "read"}, "test")
    built = registry.build(config, registry.ProbeContext(table, select_cgroups=True))
    assert [p.name for p in built] == registry.enabled_names(config)
    for probe in built:
        assert probe.config is config.probes.section(probe.name)
        assert probe.select_cgroups == probe.filters_cgroups


def test_signals_are_wired_as_the_probes_declare_them() -> None:
    def config(**tree: object) -> cfg.Config:
        return cfg.Config.model_validate(tree)

    everything = {Signal.METRICS, Signal.SPANS, Signal.PROFILES}
    assert needed(config()) == everything
    no_slow = {"syscall_latency": {"slow_spans": {"enabled": False}}}
    assert needed(config(probes=no_slow)) == {Signal.METRICS, Signal.PROFILES}
    # nothing exported: profiles only for the live page's flame graph or where folded
    # stacks are written
    assert needed(config(exporter={"enabled": False})) == {Signal.METRICS, Signal.PROFILES}
    quiet = {"exporter": {"enabled": False}, "endpoints": {"enabled": False}}
    assert needed(config(**quiet)) == {Signal.METRICS}
    folded = config(**quiet, probes={"cpu_profile": {"folded_path": "/tmp/f"}})
    assert needed(folded) == {Signal.METRICS, Signal.PROFILES}
    assert needed(config(), ["tcp_retransmit"]) == {Signal.METRICS}


def test_hooks_say_what_they_are() -> None:
    assert str(Hook("raw_tracepoint", "sched/sched_switch", "on_switch")) == (
        "raw_tracepoint:sched/sched_switch")
    assert str(Hook("raw_tracepoint", "sched/sched_wakeup_new", "f", required=False,
                    note="new tasks")) == (
        "raw_tracepoint:sched/sched_wakeup_new (optional; new tasks)")
    with pytest.raises(ValueError):
        Hook("kprobe", "x/y", "f")
    with pytest.raises(ValueError):
        Hook("perf_event", "sched/sched_switch", "f")


def test_a_registry_line_names_a_probe_of_its_module() -> None:
    from otel_ebpf.probes import _probe_type

    assert _probe_type("tcp_retransmit:TcpRetransmit").name == "tcp_retransmit"
    for entry in ("cpu_profile:ON_CPU", "cpu_profile:StackProfiler"):  # not a probe; unnamed
        with pytest.raises(TypeError, match=entry):
            _probe_type(entry)
