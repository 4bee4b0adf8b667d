"""Pods on this node, from the Kubernetes API server: list, then watch, like a reflector.

One LIST (`fieldSelector=spec.nodeName=<node>`) fills the state, a WATCH from its
resourceVersion keeps it current. An expired resourceVersion (410 Gone) or the periodic
resync relists; a dropped connection re-watches from the last version seen, after a capped,
jittered backoff. Lookups are plain dictionary reads and never wait for the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import ssl
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from otel_ebpf.config import KubernetesConfig

if TYPE_CHECKING:  # imported where used: a host without it never loads aiohttp (~15 MB)
    import aiohttp

log = logging.getLogger(__name__)

PODS_PATH = "/api/v1/pods"
# etcd refuses objects over ~1.5 MiB: a longer watch line is garbage, not a pod
MAX_LINE = 16 << 20


@dataclass(frozen=True, slots=True)
class PodInfo:
    name: str
    namespace: str
    uid: str
    node: str
    labels: Mapping[str, str] = field(default_factory=dict)
    containers: Mapping[str, str] = field(default_factory=dict)  # container id -> name


def normalize_container_id(raw: str) -> str:
    """'containerd://ABC…' (also docker://, cri-o://) -> 'abc…', the form cgroup paths use."""
    return raw.rpartition("://")[2].strip().lower()


def parse_pod(obj: Mapping[str, Any]) -> PodInfo | None:
    meta = _dict(obj, "metadata")
    uid = str(meta.get("uid") or "")
    if not uid:
        return None
    status = _dict(obj, "status")
    containers: dict[str, str] = {}
    for key in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
        for cs in status.get(key) or ():
            if not isinstance(cs, dict) or not cs.get("name"):
                continue
            # the previous instance of a restarted container may still have measurements
            # in flight: keep its id too
            last = _dict(_dict(cs, "lastState"), "terminated").get("containerID")
            for raw in (last, cs.get("containerID")):
                if isinstance(raw, str) and (cid := normalize_container_id(raw)):
                    containers[cid] = str(cs["name"])
    labels = meta.get("labels") or {}
    return PodInfo(
        name=str(meta.get("name") or ""),
        namespace=str(meta.get("namespace") or ""),
        uid=uid,
        node=str(_dict(obj, "spec").get("nodeName") or ""),
        labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
        containers=containers,
    )


class ApiError(Exception):
    def __init__(self, status: int, message: str, verb: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.verb = verb  # what we asked for: list or watch


class _Expired(Exception):
    """The resourceVersion is too old to watch from (410 Gone): relist."""


class KubernetesPods:
    def __init__(self, config: KubernetesConfig, *, env: Mapping[str, str] | None = None,
                 backoff_base: float = 0.5, backoff_cap: float = 30.0,
                 deleted_grace: float = 60.0) -> None:
        env = os.environ if env is None else env
        self.config = config
        self.api_url = (config.api_url or _service_url(env) or "").rstrip("/") or None
        self._pods_url = f"{self.api_url}{PODS_PATH}"
        self.node = config.node_name or env.get("NODE_NAME") or socket.gethostname()
        self.synced = asyncio.Event()
        self._backoff = (backoff_base, backoff_cap)
        self._pods: dict[str, PodInfo] = {}
        self._by_container: dict[str, str] = {}  # container id -> pod uid
        self._deleted: dict[str, float] = {}  # pod uid -> when its deletion was seen
        self._grace = deleted_grace
        self._outage = False
        self._denied: tuple[int, str] | None = None  # (401 or 403, verb) said once
        self._failures = 0
        self._version: str | None = None  # where the watch resumes; None: list first
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        if self.config.mode == "auto":
            return self.config.token_path.is_file()  # a service account: we run in a pod
        return self.config.mode == "on"

    def lookup(self, pod_uid: str | None, container_id: str | None) -> dict[str, str]:
        cid = normalize_container_id(container_id) if container_id else ""
        # the systemd cgroup driver writes the uid with '_' for '-' (pod1a2b_…slice)
        pod = self._pods.get(pod_uid.replace("_", "-")) if pod_uid else None
        if pod is None and cid:
            pod = self._pods.get(self._by_container.get(cid, ""))
        if pod is None:
            return {}
        attrs = {"k8s.pod.name": pod.name, "k8s.pod.uid": pod.uid,
                 "k8s.namespace.name": pod.namespace, "k8s.node.name": pod.node or self.node}
        if cid and (container := pod.containers.get(cid)):
            attrs["k8s.container.name"] = container
        attrs.update({f"k8s.pod.label.{k}": pod.labels[k]
                      for k in self.config.labels if k in pod.labels})
        return attrs

    def pods_matching(
        self, namespaces: Collection[str] = (), labels: Mapping[str, str] | None = None
    ) -> set[str]:
        """Uids of live pods in any of `namespaces` (empty: any) carrying all of `labels`."""
        wanted = (labels or {}).items()
        return {
            uid for uid, pod in self._pods.items()
            if uid not in self._deleted and (not namespaces or pod.namespace in namespaces)
            and all(pod.labels.get(k) == v for k, v in wanted)
        }

    async def run(self) -> None:
        """List and watch until close() or cancellation; the daemon runs this as a task."""
        if not self.enabled:
            return
        if self.api_url is None:
            log.warning("kubernetes: no API server address; set identity.kubernetes.api_url "
                        "or KUBERNETES_SERVICE_HOST. Pods will not be named")
            return
        self._task = asyncio.current_task()
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.config.timeout)
        connector = aiohttp.TCPConnector(ssl=self._ssl_context())
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            await self._loop(session)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
            await asyncio.wait([task])  # unlike `await task`, never re-raises our cancel

    async def _loop(self, session: aiohttp.ClientSession) -> None:
        import aiohttp

        deadline = 0.0
        while True:
            try:
                if self._version is None:
                    await self._list(session)
                    deadline = asyncio.get_running_loop().time() + self.config.resync
                events = await self._watch(session, deadline)
                if not events and self._version is not None:
                    # a watch that ends without a single event must not spin; re-watching
                    # later loses nothing, the server replays from the version
                    await self._back_off()
            except (_Expired, ApiError, ValueError, aiohttp.ClientError, OSError,
                    TimeoutError) as exc:
                if isinstance(exc, _Expired | ApiError | ValueError):
                    self._version = None  # expired, or an answer that made no sense: relist
                if not isinstance(exc, _Expired):  # 410 is how long watches normally end
                    self._failed(exc)
                # even after a 410: a server answering 410 to every fresh version must not
                # make us relist in a tight loop
                await self._back_off()

    async def _list(self, session: aiohttp.ClientSession) -> None:
        import aiohttp

        # a node runs a few hundred pods at most: one page, no `limit`/`continue`
        async with session.get(
            self._pods_url, params={"fieldSelector": f"spec.nodeName={self.node}"},
            headers=self._headers(), timeout=aiohttp.ClientTimeout(total=self.config.timeout),
        ) as resp:
            body = await _json_body(resp, "list")
        items = [parse_pod(i) for i in body.get("items") or () if isinstance(i, dict)]
        self._pods = {pod.uid: pod for pod in items if pod}
        self._by_container = {c: p.uid for p in self._pods.values() for c in p.containers}
        self._deleted.clear()
        self._version = str(_dict(body, "metadata").get("resourceVersion") or "")
        self.synced.set()
        self._recovered()
        self._allowed("list")
        log.debug("kubernetes: listed %d pods on node %s (version %s)", len(self._pods),
                  self.node, self._version)

    async def _watch(self, session: aiohttp.ClientSession, deadline: float) -> int:
        """Apply events until the stream ends; at the resync deadline, drop the version so
        that the caller relists. Returns the number of events."""
        remaining = deadline - asyncio.get_running_loop().time()
        params = {"fieldSelector": f"spec.nodeName={self.node}", "watch": "1",
                  "resourceVersion": self._version or "", "allowWatchBookmarks": "true",
                  # the server ends the watch cleanly at the deadline; the client-side
                  # timeout below also bounds a connection that died silently
                  "timeoutSeconds": str(max(1, int(remaining)))}
        events = 0
        timer = asyncio.timeout_at(deadline)
        try:
            async with timer, session.get(
                self._pods_url, params=params, headers=self._headers()
            ) as resp:
                if resp.status != 200:
                    await _json_body(resp, "watch")  # raises, with the server's message
                self._allowed("watch")
                async for line in _lines(resp.content):
                    self._apply(json.loads(line))
                    events += 1
        except TimeoutError:
            if not timer.expired():
                raise
            self._version = None
        return events

    def _apply(self, event: Mapping[str, Any]) -> None:
        kind, obj = event.get("type"), _dict(event, "object")
        if kind == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise _Expired
            raise ApiError(int(code) if isinstance(code, int) else 0,
                           str(obj.get("message") or "watch error"), "watch")
        # data, not just a 200: only this ends an outage and resets the backoff
        self._recovered()
        self._failures = 0
        now = asyncio.get_running_loop().time()
        while self._deleted and now - next(iter(self._deleted.values())) >= self._grace:
            self._forget(next(iter(self._deleted)))
        if kind in ("ADDED", "MODIFIED", "DELETED") and (pod := parse_pod(obj)):
            self._forget(pod.uid)
            self._pods[pod.uid] = pod
            self._by_container.update(dict.fromkeys(pod.containers, pod.uid))
            if kind == "DELETED":
                # the last measurements of its containers are exported after the deletion:
                # keep naming them for a while
                self._deleted[pod.uid] = now
        # kept across reconnects: a dropped watch resumes here instead of relisting
        if version := _dict(obj, "metadata").get("resourceVersion"):
            self._version = str(version)

    def _forget(self, uid: str) -> None:
        self._deleted.pop(uid, None)
        old = self._pods.pop(uid, None)
        for cid in old.containers if old else ():
            if self._by_container.get(cid) == uid:
                del self._by_container[cid]

    def _headers(self) -> dict[str, str]:
        # read on every connection: projected service-account tokens rotate (about hourly)
        try:
            token = self.config.token_path.read_text().strip()
        except OSError:
            return {}  # e.g. `kubectl proxy`, which authenticates for us
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _ssl_context(self) -> ssl.SSLContext | bool:
        if not (self.api_url or "").startswith("https:"):
            return True  # plain http (tests, `kubectl proxy`): nothing to verify
        ca = self.config.ca_path  # verified always; the system CAs when there is no ca.crt
        return ssl.create_default_context(cafile=str(ca) if ca.is_file() else None)

    async def _back_off(self) -> None:
        # reset by every good watch event: only consecutive trouble grows the delay
        self._failures += 1
        base, cap = self._backoff
        delay = min(cap, base * 2 ** min(self._failures - 1, 30))
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    def _failed(self, exc: BaseException) -> None:
        if isinstance(exc, ApiError) and exc.status in (401, 403):
            self._refused(exc)
            return
        if self._outage:
            log.debug("kubernetes: still failing: %r", exc)
            return
        self._outage = True
        log.warning("kubernetes: API server %s: %s; retrying with backoff, pod names may "
                    "be stale until it answers", self.api_url, str(exc) or type(exc).__name__)

    def _refused(self, exc: ApiError) -> None:
        """One error per refusal, however often the retries meet it: a missing permission
        stays missing until someone changes the RBAC objects."""
        if self._denied == (exc.status, exc.verb):
            log.debug("kubernetes: still refused: %s", exc)
            return
        self._denied = (exc.status, exc.verb)
        if exc.status == 401:
            log.error("kubernetes: API server %s does not accept the service account token "
                      "read from %s (HTTP 401: %s); pods will not be named until a valid "
                      "token is there", self.api_url, self.config.token_path, exc.message)
            return
        until = (f"pods are listed again every {self._backoff[1]:.0f} s or so, and changes "
                 "in between are missed" if exc.verb == "watch" else "pods will not be named")
        log.error("kubernetes: API server %s refuses to %s pods (HTTP 403: %s). The agent "
                  "needs exactly list and watch on pods, cluster-wide: grant them with a "
                  "ClusterRole bound to its service account (deploy/kubernetes/rbac.yaml); "
                  "until then %s", self.api_url, exc.verb, exc.message, until)

    def _allowed(self, verb: str) -> None:
        if self._denied is None:
            return
        status, refused = self._denied
        if status == 401:
            log.info("kubernetes: API server %s accepts the token now", self.api_url)
        elif refused == verb:
            log.info("kubernetes: API server %s allows %s on pods now", self.api_url, verb)
        else:
            return
        self._denied = None

    def _recovered(self) -> None:
        if self._outage:
            self._outage = False
            log.info("kubernetes: API server %s answers again", self.api_url)


def _service_url(env: Mapping[str, str]) -> str | None:
    if not (host := env.get("KUBERNETES_SERVICE_HOST")):
        return None
    host = f"[{host}]" if ":" in host else host  # IPv6
    return f"https://{host}:{env.get('KUBERNETES_SERVICE_PORT') or '443'}"


async def _json_body(resp: aiohttp.ClientResponse, verb: str) -> dict[str, Any]:
    text = await resp.text()
    if resp.status == 410:
        raise _Expired
    if resp.status != 200:
        with contextlib.suppress(ValueError, AttributeError):
            text = str(json.loads(text).get("message") or text)  # from a Status object
        raise ApiError(resp.status, text[:300], verb)
    body = json.loads(text)
    if not isinstance(body, dict):
        raise ValueError("the API server answered with JSON that is not an object")
    return body


async def _lines(stream: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """Newline-delimited watch events. Split here rather than by StreamReader.readline,
    whose line limit (128 KiB by default) is smaller than a pod with big annotations."""
    pending = b""
    async for chunk in stream.iter_any():
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.strip():
                yield line
        if len(pending) > MAX_LINE:
            raise ValueError(f"watch event longer than {MAX_LINE} bytes")
    if pending.strip():
        yield pending


def _dict(obj: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = obj.get(key)
    return value if isinstance(value, dict) else {}
