"""KubernetesPods against a fake API server on 127.0.0.1 that replays real response shapes
(a PodList, watch event lines, Status objects): list, watch, 410 Gone, drops, resync."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import socket
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from otel_ebpf.config import KubernetesConfig
from otel_ebpf.enrich.kubernetes import KubernetesPods, normalize_container_id, parse_pod
from tests.helpers.network import loopback_only  # noqa: F401 (autouse fixture)

FIXTURES = Path(__file__).parents[1] / "fixtures" / "k8s"
POD_LIST: dict[str, Any] = json.loads((FIXTURES / "pod-list.json").read_text())
EVENTS: list[dict[str, Any]] = [
    json.loads(line) for line in (FIXTURES / "watch-events.jsonl").read_text().splitlines()
]
GONE_EVENT = json.loads((FIXTURES / "watch-error-gone.json").read_text())
GONE_STATUS = json.loads((FIXTURES / "status-gone.json").read_text())
FORBIDDEN = json.loads((FIXTURES / "status-forbidden.json").read_text())

WEB_UID = "5c6a0b0e-3f44-4f0b-9b7a-1d2c3e4f5a6b"
DNS_UID = "9e1d7c3a-6b2f-4a8e-b5d4-2f3e4a5b6c7d"
JOB_UID = "1f2e3d4c-5b6a-4978-8a9b-0c1d2e3f4a5b"
NGINX = "6964b8eed26e69eb9aefe2fbacf8f7d4a2a81075a1fa34738bc3ca5cb1daf48f"
NGINX_BEFORE_RESTART = "28aba5cb1997a8a1dfe15e3caf7a14c7e17ddfdb9d6d5214f9280484b3967843"
INIT = "b95a4163351e37eea9f4ebf79808f5ce9819d7a26b3e989373b83bcc1bde0ec6"
COREDNS = "8a32e516d7415be524a7fcec482ad2918f2b6ef2a7f4cb8e2e232b361436b20b"
WORKER = "87eba76e7f3164534045ba922e7770fb58bbd14ad732bbf5ba6f11cc56989e6e"

Script = Callable[[web.Request], Awaitable[web.StreamResponse]]


class FakeApiServer:
    """GET /api/v1/pods: LIST answers pop from `lists` (the last one repeats), WATCH answers
    run the next script from `watches` (none left: hold the stream open)."""

    def __init__(self) -> None:
        self.lists: deque[tuple[int, dict[str, Any]]] = deque([(200, POD_LIST)])
        self.watches: deque[Script] = deque()
        self.seen: list[tuple[str, dict[str, str], str | None]] = []
        self.stop = asyncio.Event()
        self.url = ""

    def of(self, kind: str) -> list[dict[str, str]]:
        return [query for k, query, _ in self.seen if k == kind]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        kind = "watch" if request.query.get("watch") else "list"
        self.seen.append((kind, dict(request.query), request.headers.get("Authorization")))
        if kind == "list":
            status, body = self.lists.popleft() if len(self.lists) > 1 else self.lists[0]
            return web.json_response(body, status=status)
        script = self.watches.popleft() if self.watches else stream(self.stop)
        return await script(request)


def stream(*steps: dict[str, Any] | bytes | asyncio.Event | str) -> Script:
    """A watch response: event objects as JSON lines, raw bytes, waits on events, then a
    normal end, or "drop" (connection cut mid-stream)."""

    async def script(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        for step in steps:
            if isinstance(step, asyncio.Event):
                await step.wait()
            elif step == "drop":
                assert request.transport is not None
                request.transport.abort()
                return resp
            elif isinstance(step, bytes):
                await resp.write(step)
            else:
                await resp.write(json.dumps(step).encode() + b"\n")
        with contextlib.suppress(ConnectionError):  # the client may be gone by now
            await resp.write_eof()
        return resp

    return script


def status(code: int, body: dict[str, Any]) -> Script:
    async def script(request: web.Request) -> web.StreamResponse:
        return web.json_response(body, status=code)

    return script


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    server = FakeApiServer()
    app = web.Application()
    app.router.add_get("/api/v1/pods", server.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server.url = f"http://127.0.0.1:{port}"
    yield server
    server.stop.set()
    await runner.cleanup()


@pytest.fixture
def token(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("token-1\n")
    return path


@pytest.fixture
async def start(
    api: FakeApiServer, token: Path
) -> AsyncIterator[Callable[..., KubernetesPods]]:
    started: list[tuple[KubernetesPods, asyncio.Task[None]]] = []

    def make(deleted_grace: float = 60.0, **overrides: Any) -> KubernetesPods:
        config = KubernetesConfig(**{
            "mode": "on", "api_url": api.url, "token_path": token, "node_name": "worker-1",
            "labels": ["app", "tier", "absent"], **overrides})
        pods = KubernetesPods(config, env={}, backoff_base=0.01, backoff_cap=0.05,
                              deleted_grace=deleted_grace)
        started.append((pods, asyncio.get_running_loop().create_task(pods.run())))
        return pods

    yield make
    for pods, task in started:
        if pods._task is not None:  # not closed by the test itself
            assert not task.done(), "run() must keep going until closed"
        await pods.close()
        assert task.cancelled()


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def synced(pods: KubernetesPods) -> None:
    await asyncio.wait_for(pods.synced.wait(), 5.0)


# ---- list, lookup -------------------------------------------------------------------

async def test_list_fills_state_and_watches_from_its_version(
    api: FakeApiServer, start: Callable[..., KubernetesPods]
) -> None:
    pods = start()
    await synced(pods)
    await eventually(lambda: len(api.of("watch")) == 1)
    (listed,), (watch,) = api.of("list"), api.of("watch")
    assert listed["fieldSelector"] == "spec.nodeName=worker-1"
    assert watch["fieldSelector"] == "spec.nodeName=worker-1"
    assert watch["resourceVersion"] == "184237"
    assert watch["allowWatchBookmarks"] == "true"
    assert watch["watch"] == "1"
    assert {auth for _, _, auth in api.seen} == {"Bearer token-1"}

    assert pods.lookup(WEB_UID, f"containerd://{NGINX}") == {
        "k8s.pod.name": "web-7d9f8b6c5d-x2x4k",
        "k8s.pod.uid": WEB_UID,
        "k8s.namespace.name": "shop",
        "k8s.node.name": "worker-1",
        "k8s.container.name": "nginx",
        "k8s.pod.label.app": "web",
        "k8s.pod.label.tier": "frontend",
    }


async def test_lookup_variants(api: FakeApiServer, start: Callable[..., KubernetesPods]) -> None:
    pods = start(labels=[])
    await synced(pods)
    # the container id alone finds the pod; the restarted container's old id still counts
    assert pods.lookup(None, NGINX_BEFORE_RESTART)["k8s.container.name"] == "nginx"
    assert pods.lookup(None, INIT)["k8s.container.name"] == "init-config"
    assert pods.lookup(None, COREDNS.upper())["k8s.pod.name"] == "coredns-5d78c9869d-8kq2v"
    # the systemd cgroup driver's spelling of the uid
    assert pods.lookup(WEB_UID.replace("-", "_"), None)["k8s.pod.uid"] == WEB_UID
    # a container id this pod does not know: the pod, without a container name
    attrs = pods.lookup(WEB_UID, "f" * 64)
    assert attrs["k8s.pod.name"] == "web-7d9f8b6c5d-x2x4k"
    assert "k8s.container.name" not in attrs
    assert not any(k.startswith("k8s.pod.label.") for k in attrs)
    assert pods.lookup("0000", "f" * 64) == {}
    assert pods.lookup(None, None) == {}


async def test_pods_matching(api: FakeApiServer, start: Callable[..., KubernetesPods]) -> None:
    pods = start()
    await synced(pods)
    assert pods.pods_matching() == {WEB_UID, DNS_UID}
    assert pods.pods_matching(["shop"]) == {WEB_UID}
    assert pods.pods_matching(["shop", "kube-system"], {"k8s-app": "kube-dns"}) == {DNS_UID}
    assert pods.pods_matching(labels={"app": "web", "tier": "frontend"}) == {WEB_UID}
    assert pods.pods_matching(labels={"app": "web", "tier": "backend"}) == set()
    assert pods.pods_matching(["jobs"]) == set()


# ---- watch --------------------------------------------------------------------------

async def test_watch_events_then_410_relists(
    api: FakeApiServer, start: Callable[..., KubernetesPods]
) -> None:
    release = asyncio.Event()
    api.watches.append(stream(*EVENTS, release, GONE_EVENT, api.stop))
    relisted = copy.deepcopy(POD_LIST)
    relisted["metadata"]["resourceVersion"] = "184500"
    relisted["items"] = [i for i in relisted["items"] if i["metadata"]["uid"] == WEB_UID]
    api.lists.append((200, relisted))
    pods = start()
    await synced(pods)

    # ADDED (waiting, no id yet), MODIFIED (running, cri-o id), DELETED coredns, BOOKMARK
    await eventually(lambda: pods.pods_matching() == {WEB_UID, JOB_UID})
    assert pods.lookup(None, f"cri-o://{WORKER}") == {
        "k8s.pod.name": "report-28571460-q7w8e", "k8s.pod.uid": JOB_UID,
        "k8s.namespace.name": "jobs", "k8s.node.name": "worker-1",
        "k8s.container.name": "worker", "k8s.pod.label.app": "report",
    }
    # deleted, but its containers' last measurements are still to be named
    assert pods.lookup(None, COREDNS)["k8s.container.name"] == "coredns"
    assert len(api.of("list")) == 1

    release.set()  # ERROR 410: the client must list again and watch from the new version
    await eventually(lambda: len(api.of("watch")) == 2)
    assert len(api.of("list")) == 2
    assert api.of("watch")[1]["resourceVersion"] == "184500"
    assert pods.pods_matching() == {WEB_UID}  # the relist replaced, not merged
    assert pods.lookup(None, WORKER) == {}


async def test_deleted_pods_are_forgotten_after_the_grace(
    api: FakeApiServer, start: Callable[..., KubernetesPods]
) -> None:
    api.watches.append(stream(*EVENTS, api.stop))
    pods = start(deleted_grace=0.0)
    await synced(pods)
    # purged at the next event after the deletion (here the bookmark)
    await eventually(lambda: not pods.lookup(DNS_UID, None))
    assert pods.lookup(None, COREDNS) == {}  # its container ids went with it
    assert pods.lookup(None, WORKER)["k8s.pod.uid"] == JOB_UID


async def test_http_410_on_watch_relists(
    api: FakeApiServer, start: Callable[..., KubernetesPods]
) -> None:
    api.watches.append(status(410, GONE_STATUS))
    start()
    await eventually(lambda: len(api.of("watch")) == 2)
    assert len(api.of("list")) == 2


async def test_drop_rewatches_from_last_version_and_logs_once(
    api: FakeApiServer, start: Callable[..., KubernetesPods], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "otel_ebpf.enrich.kubernetes")
    api.watches.extend([stream(EVENTS[0], EVENTS[3], "drop"), stream("drop"),
                        stream(EVENTS[3], api.stop)])
    pods = start()
    await eventually(lambda: len(api.of("watch")) == 3)
    # after the bookmark: no relist, the next watch resumes where the last one got to
    assert len(api.of("list")) == 1
    assert [w["resourceVersion"] for w in api.of("watch")] == ["184237", "184300", "184300"]
    assert pods.pods_matching(["jobs"]) == {JOB_UID}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, "one warning per outage, not per attempt"
    await eventually(lambda: any("answers again" in r.message for r in caplog.records))


async def test_forbidden_list_retries_with_backoff_and_one_error(
    api: FakeApiServer, start: Callable[..., KubernetesPods], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "otel_ebpf.enrich.kubernetes")
    api.lists = deque([(403, FORBIDDEN)] * 3 + [(200, POD_LIST)])
    pods = start()
    await synced(pods)
    assert len(api.of("list")) == 4
    (error,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "refuses to list pods (HTTP 403" in error and "cannot list resource" in error
    assert "exactly list and watch on pods" in error and "get" not in error.split("(")[0]
    assert any("allows list on pods now" in r.getMessage() for r in caplog.records)
    assert pods.lookup(WEB_UID, None)


async def test_forbidden_watch_is_one_error_across_relists(
    api: FakeApiServer, start: Callable[..., KubernetesPods], caplog: pytest.LogCaptureFixture
) -> None:
    """Each refused watch relists (which works) and watches again: one error for all of
    them, and no "answers again" chatter from the lists in between."""
    caplog.set_level(logging.INFO, "otel_ebpf.enrich.kubernetes")
    refused = {**FORBIDDEN, "message": FORBIDDEN["message"].replace("cannot list",
                                                                    "cannot watch")}
    api.watches.extend([status(403, refused)] * 4)
    pods = start()
    await eventually(lambda: len(api.of("watch")) == 5)
    assert len(api.of("list")) == 5
    (error,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "refuses to watch pods" in error and "cannot watch resource" in error
    assert "listed again" in error
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == [
        f"kubernetes: API server {api.url} allows watch on pods now"]
    assert pods.lookup(WEB_UID, None)


async def test_rejected_token_is_one_error_naming_its_file(
    api: FakeApiServer, start: Callable[..., KubernetesPods], token: Path,
    caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "otel_ebpf.enrich.kubernetes")
    unauthorized = {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "message": "Unauthorized", "reason": "Unauthorized", "code": 401}
    api.lists = deque([(401, unauthorized)] * 4 + [(200, POD_LIST)])
    pods = start()
    await synced(pods)
    (error,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert f"does not accept the service account token read from {token}" in error
    assert "HTTP 401: Unauthorized" in error
    assert sum("accepts the token now" in r.getMessage() for r in caplog.records) == 1


async def test_token_is_read_again_on_every_connection(
    api: FakeApiServer, start: Callable[..., KubernetesPods], token: Path
) -> None:
    release = asyncio.Event()
    api.watches.append(stream(EVENTS[3], release))  # then a normal end: the server's timeout
    start()
    await eventually(lambda: len(api.of("watch")) == 1)
    token.write_text("token-2")  # the kubelet rotated the projected token
    release.set()
    await eventually(lambda: len(api.of("watch")) == 2)
    assert [auth for _, _, auth in api.seen] == ["Bearer token-1"] * 2 + ["Bearer token-2"]


async def test_periodic_resync_relists(
    api: FakeApiServer, start: Callable[..., KubernetesPods]
) -> None:
    start(resync=0.3)
    await eventually(lambda: len(api.of("list")) >= 2)
    assert api.of("watch")[0]["timeoutSeconds"] == "1"  # the server is asked to end it too


async def test_a_pod_bigger_than_the_default_line_limit(
    api: FakeApiServer, start: Callable[..., KubernetesPods]
) -> None:
    added = copy.deepcopy(EVENTS[1])
    added["object"]["metadata"]["annotations"] = {"big": "x" * (300 << 10)}
    raw = json.dumps(added).encode() + b"\n"
    chunks = [raw[i:i + 7000] for i in range(0, len(raw), 7000)]
    api.watches.append(stream(*chunks, api.stop))
    pods = start()
    await eventually(lambda: bool(pods.lookup(None, WORKER)))


async def test_close_ends_run(api: FakeApiServer, start: Callable[..., KubernetesPods]) -> None:
    pods = start()
    await synced(pods)
    task = pods._task
    assert task is not None
    await pods.close()
    assert task.done()


# ---- switches and defaults ----------------------------------------------------------

def test_enabled_modes(tmp_path: Path) -> None:
    missing, present = tmp_path / "none", tmp_path / "token"
    present.write_text("t")
    assert not KubernetesPods(KubernetesConfig(mode="auto", token_path=missing)).enabled
    assert KubernetesPods(KubernetesConfig(mode="auto", token_path=present)).enabled
    assert KubernetesPods(KubernetesConfig(mode="on", token_path=missing)).enabled
    assert not KubernetesPods(KubernetesConfig(mode="off", token_path=present)).enabled


async def test_off_or_without_address_does_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_session(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("no network expected")

    monkeypatch.setattr(aiohttp, "ClientSession", no_session)
    await KubernetesPods(KubernetesConfig(mode="off"), env={}).run()
    pods = KubernetesPods(KubernetesConfig(mode="on", token_path=tmp_path / "t"), env={})
    await pods.run()
    assert "no API server address" in caplog.text
    assert not pods.synced.is_set()


def test_defaults_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443",
           "NODE_NAME": "node-a"}
    pods = KubernetesPods(KubernetesConfig(), env=env)
    assert (pods.api_url, pods.node) == ("https://10.96.0.1:443", "node-a")
    pods = KubernetesPods(KubernetesConfig(), env={"KUBERNETES_SERVICE_HOST": "fd00::1"})
    assert pods.api_url == "https://[fd00::1]:443"
    configured = KubernetesConfig(api_url="https://api.example:6443/", node_name="node-b")
    pods = KubernetesPods(configured, env=env)
    assert (pods.api_url, pods.node) == ("https://api.example:6443", "node-b")
    monkeypatch.setattr(socket, "gethostname", lambda: "host-c")
    pods = KubernetesPods(KubernetesConfig(), env={})
    assert (pods.api_url, pods.node) == (None, "host-c")


# ---- parsing ------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [
    f"containerd://{NGINX}", f"docker://{NGINX}", f"cri-o://{NGINX}", NGINX, NGINX.upper(),
])
def test_normalize_container_id(raw: str) -> None:
    assert normalize_container_id(raw) == NGINX


def test_parse_pod() -> None:
    web_pod = parse_pod(POD_LIST["items"][1])
    assert web_pod is not None
    assert (web_pod.name, web_pod.namespace, web_pod.node) == (
        "web-7d9f8b6c5d-x2x4k", "shop", "worker-1")
    assert web_pod.containers == {
        INIT: "init-config", NGINX_BEFORE_RESTART: "nginx", NGINX: "nginx",
        "e7562220aee1d6e38c5633d241fdb4c1716fb104b37b1ab2abd0b7a2254ac0b2": "log-shipper",
    }
    waiting = parse_pod(EVENTS[0]["object"])
    assert waiting is not None and waiting.containers == {}
    assert parse_pod({"metadata": {"name": "no-uid"}}) is None
    assert parse_pod(EVENTS[3]["object"]) is None  # a bookmark carries no pod
