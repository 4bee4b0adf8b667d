"""Which workloads to observe, as cgroup ids the kernel side can check.

The filter names containers (by id or name) and pods (by namespace and labels); the
kernel only knows cgroup ids. So the cgroup v2 tree is walked, each cgroup's path is read
for its container and pod, and the ids of the cgroups that match (with every cgroup below
them) go into the probes' in-kernel filter maps: a filtered-out workload then costs one
map lookup per event and nothing else. Recomputed periodically as containers come and go.
"""

from __future__ import annotations

import logging
from pathlib import Path

from otel_ebpf.config import WorkloadFilter
from otel_ebpf.enrich.container import CgroupIdentity, parse_cgroup_path
from otel_ebpf.enrich.docker import DockerMetadata
from otel_ebpf.enrich.kubernetes import KubernetesPods
from otel_ebpf.kernel.cgroupfs import cgroup2_root, scan_cgroup_tree

log = logging.getLogger(__name__)


class WorkloadSelection:
    def __init__(self, config: WorkloadFilter, docker: DockerMetadata | None,
                 kubernetes: KubernetesPods, root: Path | None = None) -> None:
        self.config = config
        self.docker = docker
        self.kubernetes = kubernetes
        self.root = root

    @property
    def active(self) -> bool:
        c = self.config
        return bool(c.container_ids or c.container_names or c.pod_namespaces or c.pod_labels)

    def matches(self, cg: CgroupIdentity, pods: set[str] | None) -> bool:
        """Every non-empty criterion must hold (OR within a list)."""
        c = self.config
        cid = cg.container_id
        if c.container_ids and not (cid and any(cid.startswith(p.lower())
                                                for p in c.container_ids)):
            return False
        if c.container_names:
            names: set[str] = set()
            if cid and self.docker is not None:
                names.add(self.docker.lookup(cid).get("container.name", ""))
            if cid or cg.pod_uid:
                names.add(self.kubernetes.lookup(cg.pod_uid, cid).get("k8s.container.name", ""))
            if not names & set(c.container_names):
                return False
        return pods is None or (cg.pod_uid is not None and cg.pod_uid in pods)

    def cgroup_ids(self) -> set[int]:
        """Blocking (walks the cgroup tree)."""
        pods = None
        if self.config.pod_namespaces or self.config.pod_labels:
            pods = self.kubernetes.pods_matching(self.config.pod_namespaces,
                                                 self.config.pod_labels)
        tree = scan_cgroup_tree(self.root or cgroup2_root())
        return {cgroup_id for cgroup_id, path in tree.items()
                if self.matches(parse_cgroup_path(path), pods)}
