"""Cloud detectors against local fakes of IMDSv2, the GCE metadata server and Azure IMDS on
127.0.0.1, replaying their real answers; plus timeouts, 404s, impostors and "off"."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from otel_ebpf.config import CloudConfig
from otel_ebpf.enrich.cloud import detect
from tests.helpers.network import loopback_only  # noqa: F401 (autouse fixture)

FIXTURES = Path(__file__).parents[1] / "fixtures" / "cloud"
TOKEN = "AQAEAFTm7bDn0fM5bQ8x3X0ZkVb1Sv4oUjzCpmtmxQ2mFsW9JwhV8w=="
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class FakeMetadata:
    """All three metadata services on one loopback port, each checking the headers its real
    counterpart insists on. `override[path]` replaces a route's answer."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.override: dict[str, Handler] = {}
        self.url = ""

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.method, request.path))
        if handler := self.override.get(request.path):
            return await handler(request)
        route = ROUTES.get((request.method, request.path))
        if route is None:
            return web.Response(status=404, text="Not Found")
        return await route(request)


async def ec2_token(request: web.Request) -> web.StreamResponse:
    ttl = request.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
    if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
        return web.Response(status=400, text="Missing or invalid TTL")
    return web.Response(text=TOKEN, headers={"X-aws-ec2-metadata-token-ttl-seconds": ttl})


async def ec2_document(request: web.Request) -> web.StreamResponse:
    if request.headers.get("X-aws-ec2-metadata-token") != TOKEN:
        return web.Response(status=401, text="Unauthorized")  # IMDSv1 is switched off
    return web.Response(text=(FIXTURES / "ec2-identity-document.json").read_text(),
                        content_type="text/plain")


def google(body: str, content_type: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Metadata-Flavor") != "Google":
            return web.Response(status=403, text="Missing Metadata-Flavor:Google header.")
        return web.Response(text=body, content_type=content_type,
                            headers={"Metadata-Flavor": "Google"})

    return handler


async def azure_compute(request: web.Request) -> web.StreamResponse:
    if request.headers.get("Metadata") != "true":
        return web.json_response({"error": "Bad request. Required metadata header not "
                                  "specified"}, status=400)
    if not request.query.get("api-version") or request.query.get("format") != "json":
        return web.json_response({"error": "Bad request. api-version was not specified"},
                                 status=400)
    return web.Response(text=(FIXTURES / "azure-compute.json").read_text(),
                        content_type="application/json")


ROUTES: dict[tuple[str, str], Handler] = {
    ("PUT", "/latest/api/token"): ec2_token,
    ("GET", "/latest/dynamic/instance-identity/document"): ec2_document,
    ("GET", "/computeMetadata/v1/instance/"):
        google((FIXTURES / "gcp-instance.json").read_text(), "application/json"),
    ("GET", "/computeMetadata/v1/project/project-id"):
        google("my-project-4242", "application/text"),
    ("GET", "/metadata/instance/compute"): azure_compute,
}


@pytest.fixture
async def fake() -> AsyncIterator[FakeMetadata]:
    server = FakeMetadata()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.dispatch)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield server
    await runner.cleanup()


def config(fake: FakeMetadata, *detectors: str, timeout: float = 2.0) -> CloudConfig:
    return CloudConfig.model_validate({"detectors": list(detectors), "timeout": timeout,
                                       "ec2_url": fake.url, "gcp_url": fake.url + "/",
                                       "azure_url": fake.url})


def answer(status: int = 200, body: str = "", delay: float = 0.0) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(delay)
        return web.Response(status=status, text=body, headers={"Metadata-Flavor": "Google"})

    return handler


EC2 = {
    "cloud.provider": "aws", "cloud.platform": "aws_ec2", "cloud.region": "eu-west-1",
    "cloud.availability_zone": "eu-west-1b", "cloud.account.id": "123456789012",
    "host.id": "i-0b22a22eec53b9321", "host.type": "m5.xlarge",
}
GCP = {
    "cloud.provider": "gcp", "cloud.platform": "gcp_compute_engine",
    "cloud.region": "us-central1", "cloud.availability_zone": "us-central1-a",
    "cloud.account.id": "my-project-4242", "host.id": "4520031799277581759",
    "host.name": "instance-1", "host.type": "e2-standard-4",
}
AZURE = {
    "cloud.provider": "azure", "cloud.platform": "azure_vm", "cloud.region": "westeurope",
    "cloud.availability_zone": "2", "cloud.account.id": "8d10da13-8125-4ba9-a717-bf7490507b3d",
    "host.id": "02aab8a4-74ef-476e-8182-f6d2ba4166a6", "host.name": "agent-vm-01",
    "host.type": "Standard_D4s_v5",
}


# ---- each provider ------------------------------------------------------------------

async def test_ec2_imdsv2(fake: FakeMetadata, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "otel_ebpf.enrich.cloud")
    assert await detect(config(fake, "ec2")) == EC2
    assert fake.seen == [("PUT", "/latest/api/token"),
                         ("GET", "/latest/dynamic/instance-identity/document")]
    (line,) = [r.message for r in caplog.records if r.levelno == logging.INFO]
    assert "cloud.provider=aws" in line and "cloud.region=eu-west-1" in line


async def test_the_fake_refuses_imdsv1(fake: FakeMetadata) -> None:
    # the proof that test_ec2_imdsv2 really went through the token flow
    async with aiohttp.ClientSession() as session, session.get(
        f"{fake.url}/latest/dynamic/instance-identity/document"
    ) as resp:
        assert resp.status == 401


async def test_ec2_without_a_token_service(fake: FakeMetadata) -> None:
    fake.override["/latest/api/token"] = answer(404)  # e.g. Azure at the same address
    assert await detect(config(fake, "ec2")) == {}
    assert ("GET", "/latest/dynamic/instance-identity/document") not in fake.seen


async def test_gcp(fake: FakeMetadata) -> None:
    assert await detect(config(fake, "gcp")) == GCP
    assert sorted(fake.seen) == [("GET", "/computeMetadata/v1/instance/"),
                                 ("GET", "/computeMetadata/v1/project/project-id")]


async def test_gcp_impostor_without_the_flavor_header(fake: FakeMetadata) -> None:
    async def impostor(request: web.Request) -> web.StreamResponse:
        return web.Response(text=(FIXTURES / "gcp-instance.json").read_text())

    fake.override["/computeMetadata/v1/instance/"] = impostor
    assert await detect(config(fake, "gcp")) == {}


async def test_azure(fake: FakeMetadata) -> None:
    assert await detect(config(fake, "azure")) == AZURE


async def test_azure_without_a_zone(fake: FakeMetadata) -> None:
    doc = json.loads((FIXTURES / "azure-compute.json").read_text())
    doc["zone"] = ""  # regions without availability zones
    fake.override["/metadata/instance/compute"] = answer(body=json.dumps(doc))
    attrs = await detect(config(fake, "azure"))
    assert "cloud.availability_zone" not in attrs
    assert attrs["cloud.region"] == "westeurope"


# ---- failures -----------------------------------------------------------------------

@pytest.mark.parametrize(("detector", "path"), [
    ("ec2", "/latest/dynamic/instance-identity/document"),
    ("gcp", "/computeMetadata/v1/instance/"),
    ("azure", "/metadata/instance/compute"),
])
async def test_404_and_bad_json_yield_nothing(
    fake: FakeMetadata, detector: str, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "otel_ebpf.enrich.cloud")
    fake.override[path] = answer(404, "Not Found")
    assert await detect(config(fake, detector)) == {}
    assert "HTTP 404" in caplog.text
    fake.override[path] = answer(200, "<html>captive portal</html>")
    assert await detect(config(fake, detector)) == {}
    fake.override[path] = answer(200, "[]")
    assert await detect(config(fake, detector)) == {}
    assert not [r for r in caplog.records if r.levelno > logging.INFO]


@pytest.mark.parametrize(("detector", "path"), [
    ("ec2", "/latest/api/token"),
    # the second request of two: the bound is on the whole detector
    ("ec2", "/latest/dynamic/instance-identity/document"),
    ("gcp", "/computeMetadata/v1/project/project-id"),
    ("azure", "/metadata/instance/compute"),
])
async def test_timeout(fake: FakeMetadata, detector: str, path: str) -> None:
    fake.override[path] = answer(delay=5.0)
    started = time.monotonic()
    assert await detect(config(fake, detector, timeout=0.3)) == {}
    assert time.monotonic() - started < 2.0


async def test_unreachable(unused_tcp_port: int) -> None:
    url = f"http://127.0.0.1:{unused_tcp_port}"
    cfg = CloudConfig(detectors=["ec2", "gcp", "azure"], ec2_url=url, gcp_url=url,
                      azure_url=url, timeout=1.0)
    assert await detect(cfg) == {}


# ---- several detectors --------------------------------------------------------------

async def test_detectors_run_concurrently_and_the_first_configured_wins(
    fake: FakeMetadata,
) -> None:
    arrived: set[str] = set()
    both = asyncio.Event()

    def rendezvous(name: str, real: Handler) -> Handler:
        # answers only once the other detector's request has arrived too: run one after
        # the other, both would time out
        async def handler(request: web.Request) -> web.StreamResponse:
            arrived.add(name)
            if len(arrived) == 2:
                both.set()
            await both.wait()
            return await real(request)

        return handler

    fake.override["/metadata/instance/compute"] = rendezvous("azure", azure_compute)
    fake.override["/latest/api/token"] = rendezvous("ec2", ec2_token)
    # both answer; azure is listed first, and its set is not mixed with ec2's
    assert await detect(config(fake, "azure", "ec2", timeout=1.0)) == AZURE


async def test_a_failing_first_detector_leaves_the_next(fake: FakeMetadata) -> None:
    fake.override["/computeMetadata/v1/instance/"] = answer(404)
    assert await detect(config(fake, "gcp", "ec2")) == EC2


# ---- off ----------------------------------------------------------------------------

def test_off_by_default() -> None:
    assert CloudConfig().detectors == []


async def test_no_detectors_no_network(
    fake: FakeMetadata, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_session(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a client session was created with no detector configured")

    monkeypatch.setattr(aiohttp, "ClientSession", no_session)
    caplog.set_level(logging.DEBUG, "otel_ebpf.enrich.cloud")
    assert await detect(config(fake)) == {}
    assert await detect(CloudConfig()) == {}
    assert fake.seen == []
    assert caplog.records == []
