"""A guard for tests that talk to fake services: no connection may leave loopback."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any

import pytest


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any connection to a non-loopback address before a packet leaves: defaults such
    as 169.254.169.254 or a Kubernetes API address must never be contacted from a test.
    Import it into a test module to apply it to every test there."""
    loop_cls = asyncio.selector_events.BaseSelectorEventLoop
    real = loop_cls.sock_connect

    async def guarded(self: Any, sock: socket.socket, address: Any) -> None:
        if sock.family != socket.AF_UNIX:
            assert ipaddress.ip_address(address[0]).is_loopback, f"refused {address}"
        await real(self, sock, address)

    monkeypatch.setattr(loop_cls, "sock_connect", guarded)
