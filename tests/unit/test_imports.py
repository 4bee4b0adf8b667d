"""What the agent process loads at start: optional clients stay out of memory until used."""

from __future__ import annotations

import subprocess
import sys


def test_agent_does_not_load_aiohttp_until_an_enricher_or_the_endpoints_need_it() -> None:
    # aiohttp costs ~15 MB of RSS; the Docker, Kubernetes and cloud enrichers import it when
    # they open a session, the endpoints server (on by default) when it starts: an agent
    # with `endpoints.enabled: false` and no enricher in use never loads it (checked on a
    # running agent in tests/e2e/test_endpoints.py)
    code = ("import sys, otel_ebpf.cli, otel_ebpf.daemon, otel_ebpf.enrich.identity, "
            "otel_ebpf.endpoints.server; "
            "print('aiohttp' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
