"""Docker/podman names and images: a real aiohttp server on a unix socket replays the Engine
API's GET /containers/{id}/json shapes; plus a 404, a socket that never answers, a stale
socket file and no socket at all."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from otel_ebpf.config import DockerConfig
from otel_ebpf.enrich.docker import DockerMetadata, container_attributes, image_repository


def cid(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


IMAGE_ID = "sha256:" + cid("nginx:1.25")


def docker_inspect(container_id: str) -> dict[str, Any]:
    """Docker 24's answer, trimmed to a representative subset of its keys."""
    return {
        "Id": container_id, "Created": "2024-05-14T09:21:53.412345678Z",
        "Path": "/docker-entrypoint.sh", "Args": ["nginx", "-g", "daemon off;"],
        "State": {"Status": "running", "Running": True, "Paused": False, "Restarting": False,
                  "OOMKilled": False, "Dead": False, "Pid": 41234, "ExitCode": 0, "Error": "",
                  "StartedAt": "2024-05-14T09:21:53.912345678Z",
                  "FinishedAt": "0001-01-01T00:00:00Z"},
        "Image": IMAGE_ID,
        "LogPath": f"/var/lib/docker/containers/{container_id}/{container_id}-json.log",
        "Name": "/web-1", "RestartCount": 0, "Driver": "overlay2", "Platform": "linux",
        "HostConfig": {"NetworkMode": "compose_default",
                       "RestartPolicy": {"Name": "no", "MaximumRetryCount": 0}},
        "Config": {"Hostname": container_id[:12], "Env": ["NGINX_VERSION=1.25.5"],
                   "Cmd": ["nginx", "-g", "daemon off;"], "Image": "nginx:1.25",
                   "Entrypoint": ["/docker-entrypoint.sh"], "StopSignal": "SIGQUIT",
                   "Labels": {"com.docker.compose.project": "compose",
                              "com.docker.compose.service": "web"}},
        "NetworkSettings": {"Networks": {"compose_default": {"IPAddress": "172.18.0.2"}}},
    }


def podman_inspect(container_id: str) -> dict[str, Any]:
    """Podman 4's compat API: fully qualified image references."""
    body = docker_inspect(container_id)
    body["Config"] = {**body["Config"], "Image": "docker.io/library/nginx:1.25"}
    body["Driver"] = "overlay"
    return body


class Engine:
    """A Docker-compatible API on a unix socket; knows `containers`, 404s the rest."""

    def __init__(self, containers: dict[str, dict[str, Any]]) -> None:
        self.containers = containers
        self.requests: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def inspect(self, request: web.Request) -> web.Response:
        container_id = request.match_info["id"]
        self.requests.append(request.path)
        await self.gate.wait()
        if container_id not in self.containers:
            return web.json_response({"message": f"No such container: {container_id}"},
                                     status=404)
        return web.json_response(self.containers[container_id])


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # unix socket paths are limited to 107 bytes: pytest's tmp_path can be longer
    path = Path(tempfile.mkdtemp(prefix="oeb-docker-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def serve(engine: Engine, path: Path) -> web.AppRunner:
    app = web.Application()
    app.router.add_get("/containers/{id}/json", engine.inspect)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, str(path)).start()
    return runner


@pytest.fixture
async def engine(sock_dir: Path) -> AsyncIterator[Engine]:
    engine = Engine({cid("web"): docker_inspect(cid("web")),
                     cid("pod"): podman_inspect(cid("pod"))})
    runner = await serve(engine, sock_dir / "docker.sock")
    yield engine
    engine.gate.set()
    await runner.cleanup()


def config(*sockets: Path, timeout: float = 2.0) -> DockerConfig:
    return DockerConfig(sockets=[str(s) for s in sockets], timeout=timeout)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_names_and_images(engine: Engine, sock_dir: Path) -> None:
    stale = sock_dir / "stale.sock"
    stale.write_text("")  # a leftover regular file is not a socket
    meta = DockerMetadata(config(sock_dir / "missing.sock", stale, sock_dir / "docker.sock"))
    await meta.start()
    try:
        assert meta.socket == str(sock_dir / "docker.sock")
        assert meta.lookup(cid("web")) == {}  # not known yet: fetched in the background
        await meta.prefetch([cid("web"), cid("pod")])
        assert meta.lookup(cid("web")) == {
            "container.name": "web-1", "container.image.name": "nginx",
            "container.image.id": IMAGE_ID}
        assert meta.lookup(cid("pod"))["container.image.name"] == "docker.io/library/nginx"
        assert engine.requests == [f"/containers/{cid('web')}/json",
                                   f"/containers/{cid('pod')}/json"]
    finally:
        await meta.close()


async def test_one_request_per_id_in_flight(engine: Engine, sock_dir: Path) -> None:
    meta = DockerMetadata(config(sock_dir / "docker.sock"))
    await meta.start()
    try:
        engine.gate.clear()
        for _ in range(5):
            assert meta.lookup(cid("web")) == {}
        # the identity resolver calls from an executor thread
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, meta.lookup, cid("web")) == {}
        await asyncio.sleep(0.05)
        assert len(engine.requests) == 1
        engine.gate.set()
        await meta.prefetch([cid("web")])
        assert meta.lookup(cid("web"))["container.name"] == "web-1"
        assert len(engine.requests) == 1
    finally:
        await meta.close()


async def test_lookup_from_a_thread_starts_the_fetch(engine: Engine, sock_dir: Path) -> None:
    meta = DockerMetadata(config(sock_dir / "docker.sock"))
    await meta.start()
    try:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, meta.lookup, cid("web"))
        for _ in range(100):
            if meta.lookup(cid("web")):
                break
            await asyncio.sleep(0.01)
        assert meta.lookup(cid("web"))["container.name"] == "web-1"
    finally:
        await meta.close()


async def test_404_is_remembered(engine: Engine, sock_dir: Path) -> None:
    clock = FakeClock()
    meta = DockerMetadata(config(sock_dir / "docker.sock"), not_found_ttl=300, clock=clock)
    await meta.start()
    try:
        cri = cid("a containerd container")
        await meta.prefetch([cri])
        await meta.prefetch([cri])
        assert meta.lookup(cri) == {} and len(engine.requests) == 1
        clock.now += 300
        await meta.prefetch([cri])
        assert len(engine.requests) == 2  # asked again once the ttl ran out
    finally:
        await meta.close()


async def test_ids_that_are_not_ids_are_not_requested(engine: Engine, sock_dir: Path) -> None:
    meta = DockerMetadata(config(sock_dir / "docker.sock"))
    await meta.start()
    try:
        await meta.prefetch(["../../info", "web-1", cid("web").upper()])
        assert engine.requests == []
    finally:
        await meta.close()


async def test_a_socket_that_never_answers(sock_dir: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    connections = 0

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.read()  # until the client gives up and closes
        writer.close()

    server = await asyncio.start_unix_server(hang, path=str(sock_dir / "docker.sock"))
    clock = FakeClock()
    meta = DockerMetadata(config(sock_dir / "docker.sock", timeout=0.2), error_ttl=30,
                          clock=clock)
    await meta.start()
    try:
        started = time.monotonic()
        await meta.prefetch([cid("web"), cid("pod")])
        assert time.monotonic() - started < 1.5
        assert meta.lookup(cid("web")) == {} and connections == 2 and meta.failures == 2
        assert sum(r.levelno == logging.WARNING for r in caplog.records) == 1
        await meta.prefetch([cid("web")])
        assert connections == 2  # backed off
        clock.now += 30
        await meta.prefetch([cid("web")])
        assert connections == 3
    finally:
        await meta.close()
        server.close()
        await server.wait_closed()


async def test_no_socket(sock_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="otel_ebpf.enrich.docker")
    meta = DockerMetadata(config(sock_dir / "docker.sock", sock_dir / "podman.sock"))
    await meta.start()
    assert not meta.enabled and meta.socket is None
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    assert meta.lookup(cid("web")) == {}
    await meta.prefetch([cid("web")])
    await meta.close()


async def test_close_cancels_fetches_in_flight(engine: Engine, sock_dir: Path) -> None:
    meta = DockerMetadata(config(sock_dir / "docker.sock"))
    await meta.start()
    engine.gate.clear()  # the daemon never answers before we shut down
    meta.lookup(cid("web"))
    await asyncio.sleep(0.05)
    await asyncio.wait_for(meta.close(), 1.0)
    assert not meta.enabled and meta.lookup(cid("web")) == {}


@pytest.mark.parametrize(("reference", "repository"), [
    ("nginx:1.25", "nginx"),
    ("nginx", "nginx"),
    ("docker.io/library/nginx:1.25", "docker.io/library/nginx"),
    ("localhost:5000/team/app:v1", "localhost:5000/team/app"),
    ("localhost:5000/team/app", "localhost:5000/team/app"),
    (f"nginx:1.25@sha256:{cid('x')}", "nginx"),
    (f"ghcr.io/org/app@sha256:{cid('x')}", "ghcr.io/org/app"),
    (f"sha256:{cid('x')}", None),  # started from an image id: no repository to name
    (cid("x"), None),
])
def test_image_repository(reference: str, repository: str | None) -> None:
    assert image_repository(reference) == repository


def test_container_attributes_tolerate_odd_bodies() -> None:
    assert container_attributes([]) == {}
    assert container_attributes({"Name": "/", "Config": None, "Image": ""}) == {}
    assert container_attributes({"Name": "db", "Config": {"Image": "postgres:16"}}) == {
        "container.name": "db", "container.image.name": "postgres"}
