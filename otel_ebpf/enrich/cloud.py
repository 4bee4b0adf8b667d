"""Cloud identity from instance metadata services, like the Collector's resourcedetection.

Opt-in: with no detector configured nothing here opens a connection, so the agent never
touches a link-local address unless asked. Configured detectors run concurrently, each
bounded by the configured timeout; the first one (in configured order) that answers gives
the whole attribute set, because mixing one provider's region with another's host id
would describe no machine at all.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from otel_ebpf.config import CloudConfig

if TYPE_CHECKING:  # imported where used: a host without it never loads aiohttp (~15 MB)
    import aiohttp

log = logging.getLogger(__name__)

Detector = Callable[["aiohttp.ClientSession", str], Awaitable[dict[str, str]]]


class MetadataError(Exception):
    """A metadata service answered, but not like the one we asked for."""


async def detect(config: CloudConfig) -> dict[str, str]:
    if not config.detectors:
        return {}
    import aiohttp

    urls = {"ec2": config.ec2_url, "gcp": config.gcp_url, "azure": config.azure_url}
    # trust_env=False: metadata must never travel through an HTTP proxy from the environment
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=config.timeout), trust_env=False
    ) as session:
        found = await asyncio.gather(*(
            _attempt(name, DETECTORS[name], session, urls[name].rstrip("/"), config.timeout)
            for name in config.detectors
        ))
    attrs = next((a for a in found if a), {})
    if attrs:
        log.info("cloud: %s", ", ".join(f"{k}={v}" for k, v in sorted(attrs.items())))
    else:
        log.info("cloud: no metadata service answered (tried %s)", ", ".join(config.detectors))
    return attrs


async def _attempt(
    name: str, detector: Detector, session: aiohttp.ClientSession, base: str, timeout: float
) -> dict[str, str]:
    import aiohttp

    try:
        # a bound on the whole detector, not only on each of its requests
        async with asyncio.timeout(timeout):
            attrs = await detector(session, base)
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError, MetadataError) as exc:
        log.debug("cloud: %s detector at %s: %s", name, base, str(exc) or type(exc).__name__)
        return {}
    return {k: v for k, v in attrs.items() if v}


async def ec2(session: aiohttp.ClientSession, base: str) -> dict[str, str]:
    """IMDSv2: a session token first (PUT), then the instance identity document."""
    async with session.put(f"{base}/latest/api/token",
                           headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"}) as resp:
        token = (await _ok_text(resp)).strip()
    if not token:
        raise MetadataError("empty IMDSv2 token")
    async with session.get(f"{base}/latest/dynamic/instance-identity/document",
                           headers={"X-aws-ec2-metadata-token": token}) as resp:
        doc = _object(await _ok_text(resp))  # served as text/plain
    return {
        "cloud.provider": "aws",
        "cloud.platform": "aws_ec2",
        "cloud.region": _str(doc, "region"),
        "cloud.availability_zone": _str(doc, "availabilityZone"),
        "cloud.account.id": _str(doc, "accountId"),
        "host.id": _str(doc, "instanceId"),
        "host.type": _str(doc, "instanceType"),
    }


GOOGLE = {"Metadata-Flavor": "Google"}


async def gcp(session: aiohttp.ClientSession, base: str) -> dict[str, str]:
    # one after the other: gather() would leave the second request running, unowned, when
    # the first fails; both are local and quick, and the detector's timeout bounds the pair
    doc = _object(await _gcp_get(session, f"{base}/computeMetadata/v1/instance/?recursive=true"))
    project = await _gcp_get(session, f"{base}/computeMetadata/v1/project/project-id")
    # "projects/123456789/zones/us-central1-a": the zone is the last segment, the region
    # the zone without its final "-a"
    zone = _str(doc, "zone").rpartition("/")[2]
    return {
        "cloud.provider": "gcp",
        "cloud.platform": "gcp_compute_engine",
        "cloud.region": zone.rpartition("-")[0],
        "cloud.availability_zone": zone,
        "cloud.account.id": project.strip(),
        "host.id": _str(doc, "id"),
        "host.name": _str(doc, "name"),
        "host.type": _str(doc, "machineType").rpartition("/")[2],
    }


async def _gcp_get(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url, headers=GOOGLE) as resp:
        text = await _ok_text(resp)
        # the real server always says so; anything else at this name is not Google's
        if resp.headers.get("Metadata-Flavor") != "Google":
            raise MetadataError("answer without Metadata-Flavor: Google")
        return text


async def azure(session: aiohttp.ClientSession, base: str) -> dict[str, str]:
    url = f"{base}/metadata/instance/compute?api-version=2021-12-13&format=json"
    async with session.get(url, headers={"Metadata": "true"}) as resp:
        doc = _object(await _ok_text(resp))
    return {
        "cloud.provider": "azure",
        "cloud.platform": "azure_vm",
        "cloud.region": _str(doc, "location"),
        "cloud.availability_zone": _str(doc, "zone"),
        "cloud.account.id": _str(doc, "subscriptionId"),
        "host.id": _str(doc, "vmId"),
        "host.name": _str(doc, "name"),
        "host.type": _str(doc, "vmSize"),
    }


DETECTORS: Mapping[str, Detector] = {"ec2": ec2, "gcp": gcp, "azure": azure}


async def _ok_text(resp: aiohttp.ClientResponse) -> str:
    if resp.status != 200:
        raise MetadataError(f"HTTP {resp.status} from {resp.url}")
    return await resp.text()


def _object(text: str) -> dict[str, Any]:
    doc = json.loads(text)
    if not isinstance(doc, dict):
        raise MetadataError("the metadata document is not a JSON object")
    return doc


def _str(doc: Mapping[str, Any], key: str) -> str:
    value = doc.get(key)
    # GCP's recursive JSON gives the instance id as a number
    return str(value) if isinstance(value, str | int) and not isinstance(value, bool) else ""
