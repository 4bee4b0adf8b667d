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
