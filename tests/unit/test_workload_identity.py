"""The resource of a workload series (no pid): its container, else its cgroup."""

from __future__ import annotations

from otel_ebpf.config import Config
from otel_ebpf.enrich.container import parse_cgroup_path
from otel_ebpf.enrich.identity import IdentityResolver

HOST = {"host.name": "node-1"}


def resolver() -> IdentityResolver:
    return IdentityResolver(Config(), HOST)


def test_a_systemd_unit_names_the_service() -> None:
    cg = parse_cgroup_path("/system.slice/nginx.service")
    assert resolver().workload_resource(cg) == {
        "host.name": "node-1", "linux.cgroup.path": "/system.slice/nginx.service",
        "service.name": "nginx"}


def test_other_cgroups_keep_their_path_and_the_root_none() -> None:
    cg = parse_cgroup_path("/user.slice/user-0.slice/session-3.scope")
    assert resolver().workload_resource(cg)["linux.cgroup.path"] == cg.path
    assert resolver().workload_resource(parse_cgroup_path("/")) == HOST
    assert resolver().workload_resource(None) == HOST
    # a cgroup removed before its path was read: its id, never the root's resource
    assert resolver().workload_resource(None, 777) == {**HOST, "linux.cgroup.id": 777}


def test_profile_samples_share_their_workloads_resource() -> None:
    """Two processes of one cgroup: one resource (the cgroup's), each sample its pid."""
    from otel_ebpf.model import Workload

    r = resolver()
    path = "/system.slice/otel-ebpf-test.service"
    r.containers._by_id[4242] = parse_cgroup_path(path)  # as the cgroup tree would say
    a, b = Workload(10**7 + 1, "a", 4242), Workload(10**7 + 2, "b", 4242)
    identity_of = r.sample_resolver([a, b])
    assert identity_of(a).resource == identity_of(b).resource
    assert identity_of(a).resource["linux.cgroup.path"] == path
    assert "process.pid" not in identity_of(a).resource
