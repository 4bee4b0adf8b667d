"""Container names and images from a Docker-compatible Engine API (docker, podman) over its
unix socket.

`lookup` never waits: it answers from the cache and, for an id it does not know yet, starts
one background GET /containers/{id}/json so that the next collection has the answer. The
unversioned path is served by docker (latest API) and by podman's compat API alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from otel_ebpf.config import DockerConfig
from otel_ebpf.enrich.container import bounded_put

if TYPE_CHECKING:  # imported where used: a host without it never loads aiohttp (~15 MB)
    import aiohttp

log = logging.getLogger(__name__)

# what a cgroup path yields (64 hex) or a user may give (a short id); nothing that could
# change the request path
_CONTAINER_ID = re.compile(r"[0-9a-f]{12,64}")
_IMAGE_ID = re.compile(r"(?:sha256:)?[0-9a-f]{64}")


class DockerMetadata:
    """Names and images of docker/podman containers, fetched in the background.

    A 404 (not a docker/podman container: a CRI one, or already removed) is remembered for
    `not_found_ttl` seconds, other failures (timeouts, a stale socket file, 5xx) for
    `error_ttl`, so a broken daemon costs one request per id per interval, not per lookup.
    """

    def __init__(self, config: DockerConfig, *, not_found_ttl: float = 300.0,
                 error_ttl: float = 30.0, max_entries: int = 4096, concurrency: int = 8,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.not_found_ttl = not_found_ttl
        self.error_ttl = error_ttl
        self.max_entries = max_entries
        self.socket: str | None = None
        self.requests = 0
        self.failures = 0
        self._clock = clock
        self._limit = asyncio.Semaphore(concurrency)  # a node can start hundreds at once
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._known: dict[str, dict[str, str]] = {}
        self._retry_at: dict[str, float] = {}
        self._inflight: dict[str, asyncio.Task[None]] = {}

    @property
    def enabled(self) -> bool:
        return self._session is not None

    async def start(self) -> None:
        if not self.config.enabled:
            log.debug("docker metadata disabled by identity.docker.enabled")
            return
        self.socket = next((s for s in self.config.sockets if _is_socket(s)), None)
        if self.socket is None:
            log.debug("no Docker-compatible API socket at %s: no container names or images",
                      ", ".join(self.config.sockets) or "(none configured)")
            return
        import aiohttp

        self._session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=self.socket),
            timeout=aiohttp.ClientTimeout(total=self.config.timeout))
        self._loop = asyncio.get_running_loop()
        log.debug("container names and images from %s", self.socket)

    async def close(self) -> None:
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loop = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def lookup(self, container_id: str) -> dict[str, str]:
        """Cached attributes ({} when not known yet or not a docker/podman container).

        Safe from any thread (the identity resolver runs in an executor): the fetch it
        starts runs on the loop that called `start`."""
        attrs = self._known.get(container_id)
        if attrs is not None:
            return dict(attrs)
        loop = self._loop
        if loop is None or not self._wanted(container_id):
            return {}
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._schedule(container_id)
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed: we are shutting down
                loop.call_soon_threadsafe(self._schedule, container_id)
        return {}

    def _wanted(self, container_id: str) -> bool:
        return (self._session is not None and container_id not in self._known
                and container_id not in self._inflight
                and _CONTAINER_ID.fullmatch(container_id) is not None
                and self._clock() >= self._retry_at.get(container_id, float("-inf")))

    def _schedule(self, container_id: str) -> None:
        # on the loop thread only: the in-flight map is the one-request-per-id guarantee
        if self._loop is not None and self._wanted(container_id):
            self._inflight[container_id] = self._loop.create_task(
                self._fetch(container_id), name=f"docker inspect {container_id[:12]}")

    async def prefetch(self, container_ids: Iterable[str]) -> None:
        """Fetch what is not known yet and wait for it (failures only leave it unknown)."""
        ids = list(container_ids)
        for container_id in ids:
            self.lookup(container_id)
        tasks = [t for i in ids if (t := self._inflight.get(i)) is not None]
        if tasks:
            await asyncio.wait(tasks)  # unlike gather, a cancelled caller leaves them running

    async def _fetch(self, container_id: str) -> None:
        import aiohttp

        try:
            async with self._limit:
                if self._session is not None:  # None: closed while waiting
                    await self._inspect(self._session, container_id)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self.failures += 1
            self._retry_later(container_id, self.error_ttl)
            # the first failure is worth a warning (stale socket file, daemon down); the
            # same cause for every other id is not
            level = logging.WARNING if self.failures == 1 else logging.DEBUG
            log.log(level, "container %s: %s did not answer: %s", container_id[:12],
                    self.socket, exc or type(exc).__name__)
        finally:
            self._inflight.pop(container_id, None)

    async def _inspect(self, session: aiohttp.ClientSession, container_id: str) -> None:
        self.requests += 1
        # the host part is ignored over a unix socket but required by the URL
        url = f"http://localhost/containers/{container_id}/json"
        async with session.get(url) as resp:
            if resp.status == 404:
                log.debug("container %s: unknown to %s", container_id[:12], self.socket)
                self._retry_later(container_id, self.not_found_ttl)
                return
            resp.raise_for_status()
            body = await resp.json(content_type=None)
        self._retry_at.pop(container_id, None)
        bounded_put(self._known, container_id, container_attributes(body), self.max_entries)

    def _retry_later(self, container_id: str, ttl: float) -> None:
        bounded_put(self._retry_at, container_id, self._clock() + ttl, self.max_entries)


def container_attributes(inspect: Any) -> dict[str, str]:
    """GET /containers/{id}/json body -> semconv attributes. Pure."""
    attrs: dict[str, str] = {}
    if not isinstance(inspect, dict):
        return attrs
    name = inspect.get("Name")
    if isinstance(name, str) and name.strip("/"):
        attrs["container.name"] = name.lstrip("/")  # the API prefixes names with '/'
    config = inspect.get("Config")
    reference = config.get("Image") if isinstance(config, dict) else None
    if isinstance(reference, str) and (repository := image_repository(reference)):
        attrs["container.image.name"] = repository
    image_id = inspect.get("Image")
    if isinstance(image_id, str) and image_id:
        attrs["container.image.id"] = image_id
    return attrs


def image_repository(reference: str) -> str | None:
    """'nginx:1.25' -> 'nginx', 'localhost:5000/app:v1@sha256:...' -> 'localhost:5000/app';
    None for a container started from a bare image id, which names no repository."""
    reference = reference.split("@", 1)[0]
    if reference.rfind(":") > reference.rfind("/"):  # a tag, not a registry port
        reference = reference[: reference.rfind(":")]
    if not reference or reference == "sha256" or _IMAGE_ID.fullmatch(reference):
        return None
    return reference


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False

