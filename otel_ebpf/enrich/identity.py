"""Workload identity: one answer to "who is this pid / cgroup id", the same for metrics,
spans and profiles.

The Resource is the container when there is one (container, pod, host, cloud) and the
process otherwise; the process within a container goes on each data point, span and
sample. Lookups that touch /proc or the cgroup tree are blocking and run in the exporters'
threads; the Docker and Kubernetes clients are asyncio tasks that keep caches warm, and a
lookup never waits for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Mapping

from otel_ebpf import __version__
from otel_ebpf.config import Config
from otel_ebpf.enrich.cloud import detect as detect_cloud
from otel_ebpf.enrich.container import CgroupIdentity, ContainerResolver
from otel_ebpf.enrich.docker import DockerMetadata
from otel_ebpf.enrich.kubernetes import KubernetesPods
from otel_ebpf.enrich.process import ProcessEnricher, pid_alive
from otel_ebpf.enrich.selection import WorkloadSelection
from otel_ebpf.model import AttributeValue, Identity, Workload

log = logging.getLogger(__name__)

AGENT = Workload(pid=-1, comm="otel-ebpf")  # the agent's own resource


class IdentityResolver:
    def __init__(self, config: Config, host: Mapping[str, AttributeValue]) -> None:
        self.config = config
        ident = config.identity
        self.processes = ProcessEnricher(command_args=ident.process.command_args)
        self.containers = ContainerResolver()
        self.docker = DockerMetadata(ident.docker) if ident.docker.enabled else None
        self.kubernetes = KubernetesPods(ident.kubernetes)
        self.selection = WorkloadSelection(ident.filter, self.docker, self.kubernetes)
        self.cloud: dict[str, AttributeValue] = {}
        user = {k: v for k, v in config.resource_attributes.items() if k != "service.name"}
        self.base: dict[str, AttributeValue] = {**host, **user}
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Detect the cloud (bounded by its timeout) and start the metadata clients."""
        if self.config.identity.cloud.detectors:
            self.cloud = dict(await detect_cloud(self.config.identity.cloud))
            self.base = {**self.base, **self.cloud}
        if self.docker is not None:
            await self.docker.start()
        if self.kubernetes.enabled:
            self._tasks.append(asyncio.create_task(self.kubernetes.run(), name="kubernetes"))
            # the first export should already carry pod names: wait for the first list,
            # but never longer than the API timeout (the watch keeps trying after that)
            try:
                await asyncio.wait_for(self.kubernetes.synced.wait(),
                                       self.config.identity.kubernetes.timeout)
            except TimeoutError:
                log.warning("kubernetes: no pod list within %.0fs; pods get their names "
                            "once the API server answers",
                            self.config.identity.kubernetes.timeout)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.docker is not None:
            await self.docker.close()
        await self.kubernetes.close()

    def agent_resource(self) -> dict[str, AttributeValue]:
        return {**self.base, "service.name": self.config.service_name,
                "service.version": __version__, "process.pid": os.getpid()}

    def container_attributes(self, cg: CgroupIdentity | None) -> dict[str, AttributeValue]:
        if cg is None or (cg.container_id is None and cg.pod_uid is None):
            return {}
        attrs: dict[str, AttributeValue] = dict(cg.attributes())
        if cg.container_id and self.docker is not None:
            attrs.update(self.docker.lookup(cg.container_id))
        if self.kubernetes.enabled:
            attrs.update(self.kubernetes.lookup(cg.pod_uid, cg.container_id))
        return attrs

    def workload_resource(self, cg: CgroupIdentity | None, cgroup_id: int = 0
                          ) -> dict[str, AttributeValue]:
        """The resource of a workload outside containers: its cgroup (on a systemd host,
        its unit, which also names the service); a cgroup gone before its path was read
        keeps its id, so that it is not taken for the root's."""
        resource = dict(self.base)
        if cg is None and cgroup_id:
            resource["linux.cgroup.id"] = cgroup_id
        if cg is not None and cg.path not in ("", "/"):
            resource["linux.cgroup.path"] = cg.path
            if cg.systemd_unit:
                resource["service.name"] = cg.systemd_unit.removesuffix(".service")
        return resource

    def identify(self, workload: Workload) -> Identity:
        """Blocking (/proc, cgroup tree)."""
        if workload == AGENT:
            return Identity(self.agent_resource())
        cg = self.containers.identify(workload.pid, workload.cgroup_id)
        container = self.container_attributes(cg)
        point: dict[str, AttributeValue] = {}
        if workload.pid > 0:
            point = dict(self.processes.lookup(workload).attributes())
        if container:
            name = (container.get("k8s.container.name") or container.get("container.name")
                    or point.get("process.executable.name"))
            resource = {**self.base, **container}
            if name:
                resource["service.name"] = name
            # the process is a point attribute within the container's resource
            return Identity(resource, {k: point[k] for k in ("process.pid",
                                       "process.executable.name") if k in point})
        if workload.pid <= 0:
            return Identity(self.workload_resource(cg, workload.cgroup_id))
        resource = {**self.base, **point}
        if "process.executable.name" in point:
            resource["service.name"] = point["process.executable.name"]
        return Identity(resource, {k: point[k] for k in ("process.pid",
                                   "process.executable.name") if k in point})

    def alive(self, workload: Workload) -> bool:
        """Blocking: whether a workload is still there - a process by its pid, an
        aggregated workload (pid 0) by its cgroup, assumed there when its cgroup is not
        known; the agent's own and the overflow series always (pid < 0)."""
        if workload.pid != 0:
            return pid_alive(workload)
        if not workload.cgroup_id:
            return True  # the whole system
        return self.containers.paths.exists(workload.cgroup_id) is not False

    def sample_resolver(self, workloads: Iterable[Workload]
                        ) -> Callable[[Workload], Identity]:
        """For profile samples: the resource is the process's workload (its container,
        else its cgroup), the process (pid, executable) goes on each sample. One resource
        per workload, however many processes it ran."""
        known: dict[Workload, Identity] = {}
        for w in set(workloads):
            resource = self.identify(Workload(0, "", w.cgroup_id)).resource
            known[w] = Identity(resource, self.identify(w).point)
        return lambda w: known.get(w) or Identity(
            self.identify(Workload(0, "", w.cgroup_id)).resource, self.identify(w).point)

    def resolver(self, workloads: Iterable[Workload]) -> Callable[[Workload], Identity]:
        """Resolve a batch once (blocking) and answer from that batch."""
        known = {w: self.identify(w) for w in set(workloads)}

        def identity_of(workload: Workload) -> Identity:
            found = known.get(workload)
            return found if found is not None else self.identify(workload)

        return identity_of
